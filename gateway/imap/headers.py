"""Message-header surgery: find address fields, tag display names, splice bytes.

A tag changes only the address fields it touches.  The change is recorded as
*splices* (offset, old field bytes, new field bytes) on the original header, so
the rewritten header is a pure function of the upstream bytes and the stored
decision — later code or config changes cannot move sizes already served.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.header import decode_header

#: Header fields tagged in ordinary folders and in \Sent / \Drafts.
READER_FIELDS = ("from", "sender", "reply-to")
SENT_FIELDS = ("to", "cc")
_MAX_WORD_BYTES = 45  # base64 of 45 bytes = 60 chars; "=?UTF-8?B?" + 60 + "?=" = 72 <= 75


@dataclass(frozen=True, slots=True)
class Splice:
    offset: int
    old: bytes
    new: bytes


@dataclass(frozen=True, slots=True)
class Field:
    start: int
    end: int  # after the CRLF/LF of the field's last line
    name: str  # lower case
    colon: int  # index of ":" in the header


def iter_fields(header: bytes) -> Iterator[Field]:
    """The fields of a header block (continuation lines folded into their field)."""
    pos = 0
    n = len(header)
    while pos < n:
        if header[pos] in (0x0D, 0x0A):  # blank line: end of header
            return
        start = pos
        while True:
            nl = header.find(b"\n", pos)
            if nl < 0:
                pos = n
                break
            pos = nl + 1
            if pos >= n or header[pos] not in (0x20, 0x09):
                break
        colon = header.find(b":", start, pos)
        if colon <= start:
            continue  # not a field (malformed line): left alone
        name = header[start:colon].rstrip(b" \t").decode("latin-1").lower()
        yield Field(start, pos, name, colon)


def header_length(message_start: bytes) -> int | None:
    """Length of the header including the blank line, if it ends inside ``message_start``."""
    if message_start.startswith(b"\r\n"):
        return 2
    if message_start.startswith(b"\n"):
        return 1
    i = message_start.find(b"\n\r\n")
    j = message_start.find(b"\n\n")
    ends = [x for x in ((i + 3) if i >= 0 else -1, (j + 2) if j >= 0 else -1) if x >= 0]
    return min(ends) if ends else None


# -- address lists ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AddressPiece:
    start: int  # span of the piece's core (no surrounding whitespace) in the value
    end: int
    address: str  # lower-case addr-spec
    display: bytes  # raw display-name bytes ("" when bare)


def _split_pieces(value: bytes) -> list[tuple[int, int]]:
    """Spans of comma-separated pieces, honouring quotes, comments and <...>."""
    spans = []
    depth = 0
    in_quote = False
    in_angle = False
    start = 0
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if in_quote:
            if c == 0x5C:
                i += 2
                continue
            if c == 0x22:
                in_quote = False
        elif depth:
            if c == 0x5C:
                i += 2
                continue
            if c == 0x28:
                depth += 1
            elif c == 0x29:
                depth -= 1
        elif c == 0x22:
            in_quote = True
        elif c == 0x28:
            depth = 1
        elif c == 0x3C:
            in_angle = True
        elif c == 0x3E:
            in_angle = False
        elif c in (0x2C, 0x3B) and not in_angle:  # "," or ";" (end of group)
            spans.append((start, i))
            start = i + 1
        elif c == 0x3A and not in_angle:  # "group:" — the group name is not an address
            start = i + 1
        i += 1
    spans.append((start, n))
    return spans


def _strip_comments(data: bytes) -> bytes:
    out = bytearray()
    depth = 0
    in_quote = False
    for c in data:
        if in_quote:
            out.append(c)
            if c == 0x22:
                in_quote = False
        elif c == 0x28:
            depth += 1
        elif c == 0x29 and depth:
            depth -= 1
        elif depth:
            continue
        else:
            if c == 0x22:
                in_quote = True
            out.append(c)
    return bytes(out)


def parse_addresses(value: bytes) -> list[AddressPiece]:
    """Mailboxes of an address-list field value (the bytes after the colon)."""
    pieces = []
    ws = b" \t\r\n"
    for s, e in _split_pieces(value):
        while s < e and value[s] in ws:
            s += 1
        while e > s and value[e - 1] in ws:
            e -= 1
        if s >= e:
            continue
        piece = value[s:e]
        lt = _find_angle(piece)
        if lt >= 0:
            gt = piece.find(b">", lt)
            if gt < 0:
                continue
            addr = piece[lt + 1 : gt].strip()
            if b":" in addr:  # obsolete source route
                addr = addr.rpartition(b":")[2]
            display = piece[:lt].strip(ws)
        else:
            addr = _strip_comments(piece).strip(ws)
            display = b""
        if b"@" not in addr or any(c in addr for c in b" \t\"<>"):
            continue
        pieces.append(AddressPiece(s, e, addr.decode("utf-8", "replace").lower(), display))
    return pieces


def _find_angle(piece: bytes) -> int:
    in_quote = False
    depth = 0
    i = 0
    while i < len(piece):
        c = piece[i]
        if in_quote:
            if c == 0x5C:
                i += 2
                continue
            if c == 0x22:
                in_quote = False
        elif depth:
            if c == 0x28:
                depth += 1
            elif c == 0x29:
                depth -= 1
        elif c == 0x22:
            in_quote = True
        elif c == 0x28:
            depth = 1
        elif c == 0x3C:
            return i
        i += 1
    return -1


# -- display names ---------------------------------------------------------------------

_CHARSET_ALIASES = {"gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030", "ks_c_5601-1987": "cp949"}
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")


def _one_line(text: str) -> str:
    """``text`` with control characters (CR, LF, NUL … an encoded-word may decode to) as spaces,
    runs of white space as one: a tagged name is written back as a quoted string when ASCII, and
    a CR or NUL there would be a raw byte in the header the client reads."""
    return " ".join(_CONTROLS.sub(" ", text).split())


def decode_phrase(raw: bytes) -> str:
    """Human text of a display name: unquoted, encoded-words decoded."""
    text = raw.strip()
    if len(text) >= 2 and text[:1] == b'"' and text[-1:] == b'"':
        inner = text[1:-1]
        out = bytearray()
        i = 0
        while i < len(inner):
            if inner[i] == 0x5C and i + 1 < len(inner):
                i += 1
            out.append(inner[i])
            i += 1
        text = bytes(out)
    s = _one_line(text.decode("utf-8", "replace"))
    if "=?" not in s:
        return s
    try:
        parts = decode_header(s)
    except Exception:  # noqa: BLE001 - anything undecodable stays as it was
        return s
    out_s = []
    for part, charset in parts:
        if isinstance(part, str):
            out_s.append(part)
            continue
        cs = (charset or "ascii").lower()
        cs = _CHARSET_ALIASES.get(cs, cs)
        try:
            out_s.append(part.decode(cs, "replace"))
        except LookupError:
            out_s.append(part.decode("utf-8", "replace"))
    return _one_line("".join(out_s))


def encode_phrase(text: str) -> bytes:
    """A display name for a header: quoted string if ASCII, else UTF-8 encoded-words."""
    if text.isascii():
        return b'"' + text.encode("ascii").replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    words = []
    chunk = b""
    for ch in text:
        b = ch.encode("utf-8")
        if len(chunk) + len(b) > _MAX_WORD_BYTES:
            words.append(chunk)
            chunk = b""
        chunk += b
    if chunk:
        words.append(chunk)
    return b" ".join(b"=?UTF-8?B?" + base64.b64encode(w) + b"?=" for w in words)


def envelope_name(phrase: bytes) -> bytes:
    """The ENVELOPE name for an encoded phrase (quoted-string content unquoted)."""
    if phrase.startswith(b'"') and phrase.endswith(b'"'):
        inner = phrase[1:-1]
        return inner.replace(b'\\"', b'"').replace(b"\\\\", b"\\")
    return phrase


def strip_tags(name: str, tags: tuple[str, ...]) -> str:
    """``name`` without the tags it already starts with: a message a client stored back (a reply
    saved to Sent, a copy made by APPEND) carries the name as the proxy served it."""
    stripped = True
    while stripped:
        stripped = False
        for tag in tags:
            if tag and name.startswith(tag):
                name = name[len(tag):].lstrip()
                stripped = True
    return name


def tagged_text(tag: str, display: bytes, address: str, known_tags: tuple[str, ...] = ()) -> str:
    name = strip_tags(decode_phrase(display), known_tags) if display else ""
    return f"{tag} {name or address}"


# -- planning and applying ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HeaderPlan:
    splices: tuple[Splice, ...]
    names: tuple[tuple[str, str, bytes], ...]  # (field, address, encoded phrase)


def plan(header: bytes, fields: tuple[str, ...], tag_for: Callable[[str], str | None],
         known_tags: tuple[str, ...] = ()) -> HeaderPlan:
    """Splices that tag the display names in ``fields``; ``tag_for(address)`` picks the tag.
    A name that already starts with one of ``known_tags`` gets the right tag instead of a
    second one, and is left alone when it already reads as the tagged name would."""
    splices = []
    names = []
    for f in iter_fields(header):
        if f.name not in fields:
            continue
        value_start = f.colon + 1
        value = header[value_start : f.end]
        # Keep the line ending out of the value.
        body_end = len(value)
        if value.endswith(b"\r\n"):
            body_end -= 2
        elif value.endswith(b"\n"):
            body_end -= 1
        value_core = value[:body_end]
        new_value = bytearray()
        last = 0
        changed = False
        for piece in parse_addresses(value_core):
            tag = tag_for(piece.address)
            if not tag:
                continue
            text = tagged_text(tag, piece.display, piece.address, known_tags)
            if piece.display and decode_phrase(piece.display) == text:
                continue  # stored back as served: already tagged so
            phrase = encode_phrase(text)
            addr = value_core[piece.start : piece.end]
            lt = _find_angle(addr)
            if lt >= 0:
                addr_spec = addr[lt:]
            else:
                addr_spec = b"<" + _strip_comments(addr).strip() + b">"
            new_value += value_core[last : piece.start] + phrase + b" " + addr_spec
            last = piece.end
            names.append((f.name, piece.address, phrase))
            changed = True
        if not changed:
            continue
        new_value += value_core[last:]
        # Unfold what we touched: a tagged field is written on one line.
        if b"\n" in new_value:
            new_value = bytearray(bytes(new_value).replace(b"\r\n", b"").replace(b"\n", b""))
        old = header[f.start : f.end]
        new = header[f.start : value_start] + bytes(new_value) + value[body_end:]
        splices.append(Splice(f.start, old, new))
    return HeaderPlan(tuple(splices), tuple(names))


def untag(header: bytes, fields: tuple[str, ...], known_tags: tuple[str, ...]) -> tuple[Splice, ...]:
    """Splices that take ``known_tags`` off the display names in ``fields``: the reverse of
    ``plan`` for outgoing mail, whose To/Cc a client filled in from a tagged name (a reply)."""
    splices = []
    for f in iter_fields(header):
        if f.name not in fields:
            continue
        value_start = f.colon + 1
        value = header[value_start : f.end]
        body_end = len(value) - (2 if value.endswith(b"\r\n") else 1 if value.endswith(b"\n") else 0)
        value_core = value[:body_end]
        new_value = bytearray()
        last = 0
        for piece in parse_addresses(value_core):
            if not piece.display:
                continue
            name = decode_phrase(piece.display)
            bare = strip_tags(name, known_tags)
            if bare == name:
                continue
            addr = value_core[piece.start : piece.end]
            addr_spec = addr[_find_angle(addr) :]
            if bare and bare.lower() != piece.address:
                addr_spec = encode_phrase(bare) + b" " + addr_spec
            new_value += value_core[last : piece.start] + addr_spec
            last = piece.end
        if not last:
            continue
        new_value += value_core[last:]
        new_value = bytearray(bytes(new_value).replace(b"\r\n", b"").replace(b"\n", b""))
        splices.append(Splice(f.start, header[f.start : f.end], header[f.start : value_start] + bytes(new_value)
                              + value[body_end:]))
    return tuple(splices)


def apply(header: bytes, splices: tuple[Splice, ...] | list[Splice]) -> bytes:
    """Apply splices to the very header they were planned on (by offset, verified)."""
    if not splices:
        return header
    out = bytearray()
    last = 0
    for sp in splices:
        if header[sp.offset : sp.offset + len(sp.old)] != sp.old or sp.offset < last:
            return apply_by_content(header, splices)
        out += header[last : sp.offset]
        out += sp.new
        last = sp.offset + len(sp.old)
    out += header[last:]
    return bytes(out)


def apply_by_content(block: bytes, splices: tuple[Splice, ...] | list[Splice]) -> bytes:
    """Apply splices to a header subset (HEADER.FIELDS) or a re-encoded header: field by field."""
    if not splices:
        return block
    replacements: dict[bytes, list[bytes]] = {}
    for sp in splices:
        replacements.setdefault(sp.old, []).append(sp.new)
    used: dict[bytes, int] = {}
    out = bytearray()
    last = 0
    for f in iter_fields(block):
        old = block[f.start : f.end]
        news = replacements.get(old)
        if news is None:
            continue
        k = used.get(old, 0)
        new = news[min(k, len(news) - 1)]
        used[old] = k + 1
        out += block[last : f.start] + new
        last = f.end
    out += block[last:]
    return bytes(out)


def delta(splices: tuple[Splice, ...] | list[Splice]) -> int:
    return sum(len(s.new) - len(s.old) for s in splices)
