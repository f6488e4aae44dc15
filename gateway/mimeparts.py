"""A MIME part's Content-Disposition and file name as text, whatever the sending client wrote.

Many clients (phone mail apps, some webmail, older Foxmail and Outlook builds) write a file
name such as ``报价单.pdf`` as bare UTF-8 or GBK bytes in ``Content-Disposition`` /
``Content-Type`` instead of RFC 2231 or RFC 2047.  The email package's compat32 policy, which
the gateway parses with, keeps such bytes as surrogate escapes, and ``Message.get`` then
answers an ``email.header.Header`` — no ``split``, and whose ``str`` turns the bytes into
U+FFFD — and ``get_filename`` a name of U+FFFD characters.  These helpers decode the raw bytes
(UTF-8, else GB18030, else cp1252) before the parameters are parsed.  Used by the policy's
attachment conditions (gateway/rules/content.py), the archive's search index
(gateway/archive/index.py) and its attachment downloads (gateway/archive/export.py).
"""

from __future__ import annotations

import email.message
import email.utils
import re
from email.header import Header

# compat32 keeps a header's raw 8-bit bytes as these surrogates.
SURROGATE = re.compile("[\udc80-\udcff]")


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
