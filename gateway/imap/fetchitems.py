"""The client's FETCH command: sequence set, items, modifiers — and what each item needs.

A tagged message changes only its top-level header, so only items that carry
that header, its size or its addresses are "content" items; everything else
(FLAGS, UID, BODYSTRUCTURE, BODY[TEXT], BODY[1] …) is relayed untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.imap.parser import ATOM, LIST, Incomplete, ParseError, Parser

OTHER = "other"
ENVELOPE = "envelope"
SIZE = "size"  # RFC822.SIZE, BINARY.SIZE[], BINARY.SIZE[HEADER]
HEADER = "header"  # RFC822.HEADER, BODY[HEADER], BODY[HEADER.FIELDS(.NOT) (...)], the same as BINARY[…]
WHOLE = "whole"  # RFC822, BODY[], BINARY[]

_MACROS = {
    b"ALL": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE"),
    b"FAST": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE"),
    b"FULL": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE", b"BODY"),
}
_SECTION = re.compile(
    rb"^(BODY|BODY\.PEEK|BINARY|BINARY\.PEEK|BINARY\.SIZE)\[([^\]]*)\](?:<(\d+)(?:\.(\d+))?>)?$", re.I)
_SET = re.compile(rb"^(\$|[0-9*:,]+)$")


def normalize_section(section: bytes) -> bytes:
    """Canonical section text: upper case, no quotes, single spaces."""
    s = section.upper().replace(b'"', b"")
    s = re.sub(rb"\s+", b" ", s).replace(b"( ", b"(").replace(b" )", b")")
    return s.strip()


@dataclass(frozen=True, slots=True)
class Item:
    raw: bytes  # as the client wrote it
    kind: str
    base: bytes = b""  # BODY, BINARY, RFC822, RFC822.HEADER, RFC822.SIZE, BINARY.SIZE, ENVELOPE
    section: bytes = b""  # normalized
    peek: bool = False
    partial: tuple[int, int | None] | None = None

    @property
    def key(self) -> tuple[bytes, bytes, int | None]:
        """How the upstream names this item in a response (partial origin included)."""
        return (self.base, self.section, self.partial[0] if self.partial else None)


def classify(raw: bytes) -> Item:
    up = raw.upper()
    if up == b"ENVELOPE":
        return Item(raw, ENVELOPE, b"ENVELOPE")
    if up == b"RFC822.SIZE":
        return Item(raw, SIZE, b"RFC822.SIZE")
    if up == b"RFC822":
        return Item(raw, WHOLE, b"RFC822")
    if up == b"RFC822.HEADER":
        return Item(raw, HEADER, b"RFC822.HEADER", peek=True)
    m = _SECTION.match(raw)
    if not m:
        return Item(raw, OTHER)
    att = m.group(1).upper()
    section = normalize_section(m.group(2))
    partial = None
    if m.group(3) is not None:
        partial = (int(m.group(3)), int(m.group(4)) if m.group(4) is not None else None)
    peek = att.endswith(b".PEEK")
    base = att.replace(b".PEEK", b"")
    if base == b"BINARY.SIZE":
        # The whole header grows by the decision's delta, as the whole message does.
        return Item(raw, SIZE if section in (b"", b"HEADER") else OTHER, base, section)
    if section == b"":
        return Item(raw, WHOLE, base, section, peek, partial)
    # BINARY[HEADER…] is outside RFC 3516's grammar, but Dovecot answers it: the same header.
    if base in (b"BODY", b"BINARY") and (section == b"HEADER" or section.startswith(b"HEADER.FIELDS")):
        return Item(raw, HEADER, base, section, peek, partial)
    return Item(raw, OTHER, base, section, peek, partial)


@dataclass(frozen=True, slots=True)
class FetchCommand:
    tag: bytes
    uid: bool
    sequence: bytes
    items: tuple[Item, ...]
    modifiers: bytes  # raw tail after the items (e.g. " (CHANGEDSINCE 5)"), "" if none
    items_raw: bytes

    @property
    def has_content(self) -> bool:
        return any(i.kind != OTHER for i in self.items)

    def command(self, tag: bytes, sequence: bytes, items: bytes | None = None) -> bytes:
        verb = b"UID FETCH" if self.uid else b"FETCH"
        return b"%s %s %s %s%s\r\n" % (tag, verb, sequence, items if items is not None else self.items_raw,
                                       self.modifiers)


def parse_fetch(line: bytes, max_depth: int = 32) -> FetchCommand | None:
    """Parse a complete one-line FETCH / UID FETCH command; None if it is not one we understand."""
    if not line.endswith(b"\r\n"):
        return None
    body = line[:-2]
    parts = body.split(b" ", 3)
    if len(parts) < 3:
        return None
    tag = parts[0]
    if parts[1].upper() == b"UID":
        rest = body.split(b" ", 4)
        if len(rest) < 5 or rest[2].upper() != b"FETCH":
            return None
        uid, sequence, tail_start = True, rest[3], len(b" ".join(rest[:4])) + 1
    elif parts[1].upper() == b"FETCH" and len(parts) == 4:
        rest = body.split(b" ", 3)
        uid, sequence, tail_start = False, rest[2], len(b" ".join(rest[:3])) + 1
    else:
        return None
    if not _SET.match(sequence):
        return None
    p = Parser(line, tail_start, max_depth)
    try:
        v = p.value()
    except (ParseError, Incomplete):
        return None
    if v.kind == LIST:
        raws = []
        for it in v.items:
            if it.kind not in (ATOM,):
                return None
            raws.append(it.data)
    elif v.kind == ATOM:
        raws = list(_MACROS.get(v.data.upper(), (v.data,)))
    else:
        return None
    items_raw = line[v.start : v.end]
    modifiers = line[v.end : len(line) - 2]
    return FetchCommand(tag, uid, sequence, tuple(classify(r) for r in raws), modifiers, items_raw)


# -- sequence sets -----------------------------------------------------------------

def compress(numbers: list[int]) -> bytes:
    """1,2,3,5 -> b"1:3,5"."""
    nums = sorted(set(numbers))
    out = []
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(b"%d" % nums[i] if i == j else b"%d:%d" % (nums[i], nums[j]))
        i = j + 1
    return b",".join(out)


def explicit_uids(sequence: bytes, limit: int = 1000) -> list[int] | None:
    """The numbers of a set without "*" or "$", if there are at most ``limit``."""
    if b"*" in sequence or b"$" in sequence:
        return None
    out: list[int] = []
    for part in sequence.split(b","):
        if b":" in part:
            a, _, b = part.partition(b":")
            lo, hi = sorted((int(a), int(b)))
            if hi - lo + len(out) >= limit:
                return None
            out.extend(range(lo, hi + 1))
        else:
            out.append(int(part))
        if len(out) > limit:
            return None
    return out
