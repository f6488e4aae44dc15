"""A MIME part's Content-Disposition and file name as text, whatever the sending client wrote.

Many clients (phone mail apps, some webmail, older Foxmail and Outlook builds) write a file
name such as ``报价单.pdf`` as bare UTF-8 or GBK bytes in ``Content-Disposition`` /
``Content-Type`` instead of RFC 2231 or RFC 2047.  The email package's compat32 policy, which
the gateway parses with, keeps such bytes as surrogate escapes, and ``Message.get`` then
answers an ``email.header.Header`` — no ``split``, and whose ``str`` turns the bytes into
U+FFFD — and ``get_filename`` a name of U+FFFD characters.  These helpers decode the raw bytes
(UTF-8, else GB18030, else cp1252) before the parameters are parsed.  Used by the policy's
attachment conditions (gateway/rules/content.py), the archive's search index
(gateway/archive/extraction.py) and its attachment downloads (gateway/archive/export.py).

``parse_bytes`` is ``email.message_from_bytes`` (compat32) whose parts survive a parameter
list the email package's RFC 2231 decoding raises on (``name*=…; name*0*=…``: a TypeError
from the parse itself for a multipart, or from every ``get_param`` of a part).
"""

from __future__ import annotations

import email
import email.message
import email.utils
import re
from email.header import Header
from email.policy import compat32

# compat32 keeps a header's raw 8-bit bytes as these surrogates.
SURROGATE = re.compile("[\udc80-\udcff]")


_CONTINUATION = re.compile(r"^(\w+)\*(?:([0-9]+)\*?)?$")


def _one_style(params: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``params`` without RFC 2231 parameters that mix a whole value (``name*``) with numbered
    sections (``name*0*``) of the same name: the first one's kind is kept."""
    numbered: dict[str, bool] = {}
    out = params[:1]
    for key, value in params[1:]:
        m = _CONTINUATION.match(key)
        if m is not None and numbered.setdefault(m.group(1), m.group(2) is not None) != (m.group(2) is not None):
            continue
        out.append((key, value))
    return out


class SafeParamsMessage(email.message.Message):
    """A compat32 ``Message`` whose parameter parsing never raises on a mixed RFC 2231 list."""

    def _get_params_preserve(self, failobj: object, header: str) -> object:
        try:
            return super()._get_params_preserve(failobj, header)
        except TypeError:  # email.utils.decode_params sorts None with ints
            pass
        if self.get(header) is None:
            return failobj
        pairs = []
        for p in email.message._parseparam(header_str(self, header)):  # noqa: SLF001
            name, _, val = p.partition("=")
            pairs.append((name.strip(), val.strip()))
        try:
            return email.utils.decode_params(_one_style(pairs))
        except Exception:  # noqa: BLE001 - no parameters rather than an exception
            return failobj


def parse_bytes(raw: bytes) -> email.message.Message:
    """``email.message_from_bytes(raw)`` (compat32) built of ``SafeParamsMessage`` parts."""
    return email.message_from_bytes(raw, _class=SafeParamsMessage, policy=compat32)


def decode_8bit(data: bytes) -> str:
    """Bytes of an undeclared charset: UTF-8, else GB18030 (China's clients), else cp1252."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("gb18030")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def header_str(part: email.message.Message, name: str) -> str:
    """The first ``name`` header of ``part`` as text ('' if absent), raw 8-bit bytes decoded;
    RFC 2047 encoded-words are left as they are."""
    value = part.get(name)
    if value is None:
        return ""
    if isinstance(value, Header):  # a raw non-ASCII value: chunks of surrogate-escaped text
        value = "".join(str(chunk) for chunk, _ in value._chunks)  # noqa: SLF001
    text = str(value)
    if SURROGATE.search(text) is not None:
        text = decode_8bit(text.encode("utf-8", "surrogateescape"))
    return text


def disposition(part: email.message.Message) -> str:
    """``attachment``, ``inline`` … (lower case; '' without the header)."""
    return header_str(part, "Content-Disposition").split(";")[0].strip().lower()


def filename(part: email.message.Message) -> str:
    """The part's file name as written (Content-Disposition filename, else Content-Type name),
    RFC 2231 continuations and charsets collapsed and raw 8-bit bytes decoded; an RFC 2047
    encoded-word is left for the caller's header decoding.  '' when there is none."""
    raw = [(h, header_str(part, h)) for h in ("Content-Disposition", "Content-Type")]
    source = part
    if any(not value.isascii() for _, value in raw):
        source = email.message.Message()  # the decoded values, for the email package to parse
        for header, value in raw:
            if value:
                source[header] = value
    try:
        name = source.get_filename()
        if not name:
            name = source.get_param("name")
    except Exception:  # noqa: BLE001 - a malformed parameter list has no usable name
        return ""
    if isinstance(name, tuple):  # an RFC 2231 value get_param could not collapse
        try:
            name = email.utils.collapse_rfc2231_value(name)
        except Exception:  # noqa: BLE001
            name = str(name[2])
    return str(name) if name else ""
