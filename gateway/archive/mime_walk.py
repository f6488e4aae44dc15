"""A lean MIME parser for text extraction (and the SMTP handler's header view, ``parse_headers``):
the same message tree as the email package's, faster.

``email.message_from_bytes`` (compat32) reads a message line by line in Python — each line
through a buffered sub-file, a stack of end-of-part predicates and a regular expression —
and compiles a regular expression for every multipart boundary it meets (Python's regex
cache holds 512, and every message has its own boundary): about a third of a worker's
extraction time.  ``parse(raw)`` builds the very same tree — ``email.message.Message``
objects with the same ``_headers`` (name and raw value, folding kept), ``_unixfrom``,
payloads (text with ``surrogateescape`` for 8-bit bytes, or the list of sub-parts),
default types, preamble and epilogue — by finding header ends and boundary lines with
``str.find`` and slicing, so everything ``extraction.extract`` asks of the tree afterwards
(``get``, ``get_param``, ``get_filename``, ``get_payload(decode=True)``, ``walk``) runs the
email package's own code on the same data.

It follows ``email.feedparser`` rule by rule for the shapes real mail has (header fields
with continuation lines, a blank line or a non-header line ending them, multipart parts
between boundary lines — quoted or not, with preamble and epilogue, nested, the close
delimiter missing — message/* bodies parsed as messages, a leading ``From `` line) and
returns None for everything else, where the caller parses with the email package:
a lone CR (the feed parser treats it as a line end), a header section the feed parser
would repair (a continuation or ``:`` line first, a ``From `` line inside), multipart/digest
and message/delivery-status, a boundary that is empty or contains a line break, a multipart
whose first boundary line is missing or followed by another boundary line, nesting deeper
than ``MAX_DEPTH``.  ``tests/unit/archive/test_mime_walk.py`` compares the trees (and
``extract``'s output) with the email package's on the benchmark corpus, hand-written odd
cases and generated ones.
"""

from __future__ import annotations

import re
from email import errors
from email.message import Message

from gateway.mimeparts import SafeParamsMessage

__all__ = ["MAX_DEPTH", "parse", "parse_headers"]

MAX_DEPTH = 40  # nested parts; deeper: the email package

# A header field: its name (the feed parser's header pattern, at least one character), the
# colon, the rest of its line and its continuation lines (starting with a space or a tab).
_FIELD = re.compile(r"([\041-\071\073-\176]+):[^\n]*(?:\n|\Z)(?:[ \t][^\n]*(?:\n|\Z))*")
_LONE_CR = re.compile(r"\r(?!\n)")
_BLANKS = " \t"


class _Unsupported(Exception):  # noqa: N818 - internal signal: let the email package parse this
    """A shape this parser does not reproduce."""


def parse(raw: bytes) -> Message | None:
    """``email.message_from_bytes(raw)``'s tree (compat32), or None where this parser does
    not follow the email package (see the module's docstring)."""
    text = raw.decode("ascii", "surrogateescape")
    if "\r" in text and _LONE_CR.search(text) is not None:
        return None
    try:
        msg, _ = _entity(text, 0, len(text), "text/plain", 0)
    except Exception:  # noqa: BLE001 - _Unsupported, or an error the email package reports its own way
        return None
    return msg


def _line_end(text: str, pos: int, end: int) -> int:
    """The index after the line starting at ``pos`` (its newline included) within ``end``."""
    nl = text.find("\n", pos, end)
    return end if nl < 0 else nl + 1


def _strip_eol(value: str) -> str:
    """``value`` without one trailing line break (the feed parser's ``NLCRE_eol``)."""
    if value.endswith("\r\n"):
        return value[:-2]
    if value.endswith("\n"):
        return value[:-1]
    return value


def parse_headers(raw: bytes) -> Message | None:
    """``BytesHeaderParser(policy=compat32).parsebytes(raw)`` (the header fields, the rest as
    the payload, unparsed), or None where this parser does not follow the email package.
    The SMTP handler's view of a submitted message's header block — which the handler has
    written as Postfix reads it first (gateway/rules/headerblock.py ``as_postfix_reads``):
    plain fields and continuations, read here as Postfix reads them, never declined."""
    text = raw.decode("ascii", "surrogateescape")
    if "\r" in text and _LONE_CR.search(text) is not None:
        return None
    msg = SafeParamsMessage()
    try:
        pos, separated = _header_section(msg, text, 0, len(text))
    except _Unsupported:
        return None
    if not separated:  # the feed parser notes a body that begins without the blank line
        msg.defects.append(errors.MissingHeaderBodySeparatorDefect())
    msg._payload = text[pos:]  # noqa: SLF001 - as the feed parser's headers-only set_payload
    return msg


def _header_section(msg: Message, text: str, start: int, end: int) -> tuple[int, bool]:
    """Read the header fields of ``text[start:end]`` into ``msg`` as the feed parser's
    ``set_raw`` does; the index where its body starts, and False if a non-header line (not
    the blank line) ended the fields."""
    headers = msg._headers  # noqa: SLF001 - filled as the feed parser's set_raw does
    pos = start
    first = True
    while pos < end:
        c = text[pos]
        if c == "\n" or text.startswith("\r\n", pos):  # the blank line: the header section ends
            return _line_end(text, pos, end), True
        m = _FIELD.match(text, pos, end)
        if m is None:
            if first and text.startswith("From ", pos):  # an mbox envelope line
                line_end = _line_end(text, pos, end)
                msg.set_unixfrom(_strip_eol(text[pos:line_end]))
                pos = line_end
                first = False
                continue
            if c in _BLANKS or c == ":" or text.startswith("From ", pos):
                raise _Unsupported  # the feed parser repairs these (defects)
            return pos, False  # not a header line: the body starts here (no blank line)
        value = text[m.end(1) + 1:m.end()].lstrip(_BLANKS).rstrip("\r\n")
        headers.append((m.group(1), value))
        pos = m.end()
        first = False
    return pos, True


def _entity(text: str, start: int, end: int, default_type: str, depth: int) -> tuple[Message, Message]:
    """The message or part in ``text[start:end]`` and the message the feed parser created
    last while parsing it (its parent trims that one's trailing line break)."""
    if depth > MAX_DEPTH:
        raise _Unsupported
    msg = SafeParamsMessage()
    if default_type != "text/plain":
        msg.set_default_type(default_type)
    pos, _ = _header_section(msg, text, start, end)
    ctype = msg.get_content_type()
    if ctype in ("multipart/digest", "message/delivery-status"):
        raise _Unsupported
    maintype = ctype.split("/", 1)[0]
    if maintype == "message":
        inner, last = _entity(text, pos, end, "text/plain", depth + 1)
        msg.attach(inner)
        return msg, last
    if maintype == "multipart":
        boundary = msg.get_boundary()
        if boundary is not None:
            _multipart(msg, text, pos, end, boundary, depth)
            return msg, msg
    msg._payload = text[pos:end]  # noqa: SLF001 - set_payload of a str, as the feed parser does
    return msg, msg


def _boundary_line(text: str, sep: str, pos: int, end: int) -> tuple[int, int, bool] | None:
    """The next line in ``text[pos:end]`` that the feed parser's boundary pattern matches:
    (its start, the index after it, whether it is the close delimiter)."""
    n = len(sep)
    while True:
        at = text.find(sep, pos, end)
        if at < 0:
            return None
        pos = at + 1
        if at > 0 and text[at - 1] != "\n":
            continue
        line_end = _line_end(text, at, end)
        rest = text[at + n:line_end]
        if rest.endswith("\n"):
            rest = rest[:-2] if rest.endswith("\r\n") else rest[:-1]
        elif line_end != len(text):
            raise _Unsupported  # cannot happen: only the message's last line lacks a line break
        close = rest.startswith("--")
        if close:
            rest = rest[2:]
        if rest.strip(_BLANKS) == "":
            return at, line_end, close


def _multipart(msg: Message, text: str, pos: int, end: int, boundary: str, depth: int) -> None:
    """The parts of a multipart body ``text[pos:end]`` (``FeedParser._parsegen``)."""
    if not boundary or "\n" in boundary or "\r" in boundary:
        raise _Unsupported
    sep = "--" + boundary
    found = _boundary_line(text, sep, pos, end)
    if found is None or found[2]:
        raise _Unsupported  # no start boundary: the feed parser's StartBoundaryNotFound repair
    at, line_end, _ = found
    if at > pos:  # the preamble's last line break belongs to the boundary
        msg.preamble = _strip_eol(text[pos:at])
    while True:
        part_start = line_end
        nxt = _boundary_line(text, sep, part_start, end)
        if nxt is not None and nxt[0] == part_start:
            raise _Unsupported  # boundary lines in a row: the feed parser skips them
        part_end = nxt[0] if nxt is not None else end
        part, last = _entity(text, part_start, part_end, "text/plain", depth + 1)
        msg.attach(part)
        # The line break before a boundary line belongs to the boundary, not to the part.
        if last.get_content_maintype() == "multipart":
            if last.epilogue == "":
                last.epilogue = None
            elif last.epilogue is not None:
                last.epilogue = _strip_eol(last.epilogue)
        elif isinstance(last._payload, str):  # noqa: SLF001
            last._payload = _strip_eol(last._payload)  # noqa: SLF001
        if nxt is None:
            return  # the close delimiter is missing (the feed parser's CloseBoundaryNotFound)
        at, line_end, close = nxt
        if close:
            msg.epilogue = text[line_end:end]
            return
