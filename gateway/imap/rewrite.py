"""Rewriting FETCH responses of tagged messages — streaming, item by item.

``FetchRewriter`` receives one untagged response (segments and literal data
from the framer).  Items without a handler are re-emitted byte for byte; a
top-level literal (BODY[] of 50 MB) is streamed through its handler, never
held.  ``FetchCollector`` gathers the small responses of the proxy's own
look-ahead fetches (UID, BODY.PEEK[HEADER]).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from gateway.imap import headers
from gateway.imap.decisions import MAX_HEADER, Decision
from gateway.imap.fetchitems import normalize_section
from gateway.imap.parser import (
    ATOM,
    LIST,
    LITERAL,
    NIL,
    NUMBER,
    STRING,
    Incomplete,
    LiteralInfo,
    ParseError,
    Parser,
    Value,
    nstring,
)

Emit = Callable[[bytes], None]
_NAME = re.compile(rb"^(BODY|BINARY|BINARY\.SIZE)\[([^\]]*)\](?:<(\d+)>)?$", re.I)
_FETCH_HEAD = re.compile(rb"^\* (\d+) FETCH \(", re.I)

#: ENVELOPE fields (index in the envelope list) that carry addresses.
ENVELOPE_FIELDS = {2: "from", 3: "sender", 4: "reply-to", 5: "to", 6: "cc", 7: "bcc"}


def item_key(name: bytes) -> tuple[bytes, bytes, int | None]:
    """(base, normalized section, origin) of a response item name."""
    m = _NAME.match(name)
    if not m:
        return (name.upper(), b"", None)
    origin = int(m.group(3)) if m.group(3) is not None else None
    return (m.group(1).upper(), normalize_section(m.group(2)), origin)


def literal_bytes(data: bytes, binary: bool = False) -> bytes:
    return (b"~" if binary else b"") + b"{%d}\r\n" % len(data) + data


def fetch_seq(first_segment: bytes) -> int | None:
    m = _FETCH_HEAD.match(first_segment)
    return int(m.group(1)) if m else None


# -- ENVELOPE ----------------------------------------------------------------------------

def rewrite_envelope(buf: bytes, env: Value, decision: Decision, fields: tuple[str, ...]) -> bytes:
    """The ENVELOPE with tagged names in ``fields``; untouched parts stay byte for byte."""
    if env.kind != LIST or len(env.items) < 8:
        raise ParseError("ENVELOPE is not a 10-item list")
    out = bytearray()
    last = env.start
    for idx, fname in ENVELOPE_FIELDS.items():
        if fname not in fields:
            continue
        addrs = env.items[idx]
        if addrs.kind != LIST:
            continue
        seen: dict[str, int] = {}  # appearances of each address in this field so far
        for addr in addrs.items:
            if addr.kind != LIST or len(addr.items) != 4:
                raise ParseError("bad address in ENVELOPE")
            mailbox, host = addr.items[2], addr.items[3]
            if mailbox.kind == NIL or host.kind == NIL:
                continue  # group syntax
            address = (mailbox.data + b"@" + host.data).decode("utf-8", "replace").lower()
            occurrence = seen.get(address, 0)
            seen[address] = occurrence + 1
            name = decision.envelope_name(fname, address, occurrence)
            if name is None:
                continue
            nm = addr.items[0]
            out += buf[last : nm.start] + nstring(name)
            last = nm.end
    out += buf[last : env.end]
    return bytes(out)


# -- item handlers -----------------------------------------------------------------------------

class LiteralStream:
    """Receives a top-level literal's bytes."""

    def data(self, chunk: bytes) -> None:
        raise NotImplementedError

    def end(self) -> None:
        pass


class Handler:
    """What to do with one response item of a tagged message."""

    def value(self, name: bytes, v: Value, buf: bytes) -> bytes:
        """Whole item bytes (name SP value) for a value that is complete in ``buf``."""
        return buf[v.start - len(name) - 1 : v.end]

    def stream(self, name: bytes, lit: LiteralInfo, emit: Emit) -> LiteralStream:
        emit(name + b" " + (b"~" if lit.binary else b"") + b"{%d}\r\n" % lit.size)
        return _Pass(emit)


class _Pass(LiteralStream):
    __slots__ = ("emit",)

    def __init__(self, emit: Emit):
        self.emit = emit

    def data(self, chunk: bytes) -> None:
        self.emit(chunk)


class SizeDelta(Handler):
    def __init__(self, delta: int):
        self.delta = delta

    def value(self, name: bytes, v: Value, buf: bytes) -> bytes:
        if v.kind != NUMBER:
            return super().value(name, v, buf)
        return name + b" %d" % (int(v.data) + self.delta)


class Envelope(Handler):
    def __init__(self, decision: Decision, fields: tuple[str, ...]):
        self.decision = decision
        self.fields = fields

    def value(self, name: bytes, v: Value, buf: bytes) -> bytes:
        return name + b" " + rewrite_envelope(buf, v, self.decision, self.fields)


class _Collect(LiteralStream):
    def __init__(self, size: int, done: Callable[[bytes], None]):
        if size > MAX_HEADER * 4:
            raise ParseError("header section too large to rewrite")
        self.parts: list[bytes] = []
        self.done = done

    def data(self, chunk: bytes) -> None:
        self.parts.append(chunk)

    def end(self) -> None:
        self.done(b"".join(self.parts))


class HeaderBlock(Handler):
    """A header section (whole, HEADER.FIELDS subset, …), rewritten then sliced.

    ``full`` applies the splices by offset (the complete header); otherwise
    field by field (subsets).  ``out_name`` renames the item (partials).
    """

    def __init__(self, decision: Decision, out_name: bytes | None = None,
                 partial: tuple[int, int | None] | None = None, full: bool = False):
        self.decision = decision
        self.out_name = out_name
        self.partial = partial
        self.full = full

    def _transform(self, data: bytes) -> bytes:
        if self.full:
            data = headers.apply(data, self.decision.splices)
        else:
            data = headers.apply_by_content(data, self.decision.splices)
        if self.partial is not None:
            o, n = self.partial
            data = data[o : (o + n) if n is not None else None]
        return data

    def value(self, name: bytes, v: Value, buf: bytes) -> bytes:
        if v.kind == NIL:
            return super().value(name, v, buf)
        return (self.out_name or name) + b" " + literal_bytes(self._transform(v.data))

    def stream(self, name: bytes, lit: LiteralInfo, emit: Emit) -> LiteralStream:
        def done(data: bytes) -> None:
            emit((self.out_name or name) + b" " + literal_bytes(self._transform(data), lit.binary))

        return _Collect(lit.size, done)


class TextAsWhole(Handler):
    """BODY[TEXT]<x> fetched upstream, served as BODY[]<o> with a header prefix."""

    def __init__(self, out_name: bytes, prefix: bytes):
        self.out_name = out_name
        self.prefix = prefix

    def value(self, name: bytes, v: Value, buf: bytes) -> bytes:
        data = b"" if v.kind == NIL else v.data
        return self.out_name + b" " + literal_bytes(self.prefix + data)

    def stream(self, name: bytes, lit: LiteralInfo, emit: Emit) -> LiteralStream:
        emit(self.out_name + b" {%d}\r\n" % (len(self.prefix) + lit.size) + self.prefix)
        return _Pass(emit)


class Whole(Handler):
    """The whole message (BODY[], RFC822, BINARY[]): header rewritten, body streamed.

    For BODY[]/RFC822 the header length is known from the decision; for
    BINARY[] it is found in the stream.  The literal's size is written once
    the header is rewritten.  ``partial`` slices the rewritten stream.
    """

    def __init__(self, decision: Decision, binary: bool, out_name: bytes | None = None,
                 partial: tuple[int, int | None] | None = None):
        self.decision = decision
        self.binary = binary
        self.out_name = out_name
        self.partial = partial

    def value(self, name: bytes, v: Value, buf: bytes) -> bytes:
        if v.kind == NIL:
            return super().value(name, v, buf)
        data = self._rewrite_header(v.data, complete=True)
        if self.partial is not None:
            o, n = self.partial
            data = data[o : (o + n) if n is not None else None]
        return (self.out_name or name) + b" " + literal_bytes(data, v.binary)

    def _rewrite_header(self, data: bytes, complete: bool) -> bytes:
        if self.binary:
            hl = headers.header_length(data[: MAX_HEADER + 4]) or len(data)
            return headers.apply_by_content(data[:hl], self.decision.splices) + data[hl:]
        hl = self.decision.header_len
        return headers.apply(data[:hl], self.decision.splices) + data[hl:]

    def stream(self, name: bytes, lit: LiteralInfo, emit: Emit) -> LiteralStream:
        return _WholeStream(self, (self.out_name or name), lit, emit)


class _WholeStream(LiteralStream):
    def __init__(self, owner: Whole, name: bytes, lit: LiteralInfo, emit: Emit):
        self.owner = owner
        self.name = name
        self.lit = lit
        self.emit = emit
        self.head = bytearray()
        self.started = False
        self.pos = 0  # position in the rewritten stream
        self.lo = 0
        self.hi: int | None = None

    def _header_done(self, final: bool) -> int | None:
        if self.owner.binary:
            hl = headers.header_length(bytes(self.head[: MAX_HEADER + 4]))
            if hl is None and (final or len(self.head) > MAX_HEADER):
                return len(self.head)
            return hl
        hl = self.owner.decision.header_len
        if len(self.head) >= hl or final:
            return min(hl, len(self.head))
        return None

    def data(self, chunk: bytes) -> None:
        if self.started:
            self._out(chunk)
            return
        self.head += chunk
        self._try_start(final=False)

    def _try_start(self, final: bool) -> None:
        hl = self._header_done(final)
        if hl is None:
            return
        head = bytes(self.head)
        new_header = headers.apply_by_content(head[:hl], self.owner.decision.splices) if self.owner.binary \
            else headers.apply(head[:hl], self.owner.decision.splices)
        total = self.lit.size - hl + len(new_header)
        if self.owner.partial is not None:
            o, n = self.owner.partial
            self.lo = o
            self.hi = total if n is None else min(total, o + n)
            size = max(0, self.hi - self.lo)
        else:
            self.lo, self.hi, size = 0, None, total
        self.emit(self.name + b" " + (b"~" if self.lit.binary else b"") + b"{%d}\r\n" % size)
        self.started = True
        self.head = bytearray()
        self._out(new_header)
        if len(head) > hl:
            self._out(head[hl:])

    def _out(self, chunk: bytes) -> None:
        if self.hi is None and not self.lo:
            self.emit(chunk)
            return
        start, end = self.pos, self.pos + len(chunk)
        self.pos = end
        a = max(start, self.lo)
        b = end if self.hi is None else min(end, self.hi)
        if a < b:
            self.emit(chunk[a - start : b - start])

    def end(self) -> None:
        if not self.started:
            self._try_start(final=True)


# -- the response rewriter ---------------------------------------------------------------------

class FetchRewriter:
    """Rewrites one ``* n FETCH (...)`` response with per-item handlers.

    ``handlers`` maps item keys (see ``item_key``) to a Handler, or to a tuple of them
    for an item the upstream answers several times (the n-th answer, the n-th); items without
    a handler (and whole responses where ``handlers`` is empty) pass byte for byte.
    """

    def __init__(self, handlers: dict[tuple[bytes, bytes, int | None], Handler | tuple[Handler, ...]], emit: Emit,
                 max_depth: int = 32, max_buffer: int = 4 * 1024 * 1024):
        self.handlers = handlers
        self.emit = emit
        self.max_depth = max_depth
        self.max_buffer = max_buffer
        self.buf = bytearray()
        self.started = False
        self.after_item = False
        self.done = False
        self.stream: LiteralStream | None = None
        self.occurrences: dict[tuple[bytes, bytes, int | None], int] = {}

    # framer events ---------------------------------------------------------------
    def segment(self, data: bytes, first: bool, lit: LiteralInfo | None) -> None:
        if self.done:
            raise ParseError("data after the end of a FETCH response")
        self.buf += data
        self._process(lit)

    def literal_data(self, chunk: bytes) -> None:
        if self.stream is not None:
            self.stream.data(chunk)
            return
        self.buf += chunk
        if len(self.buf) > self.max_buffer:
            raise ParseError("nested literal too large")

    def literal_end(self) -> None:
        if self.stream is not None:
            self.stream.end()
            self.stream = None

    # parsing ---------------------------------------------------------------------------
    def _process(self, lit: LiteralInfo | None) -> None:
        buf = bytes(self.buf)
        p = Parser(buf, 0, self.max_depth)
        if not self.started:
            m = _FETCH_HEAD.match(buf)
            if not m:
                raise ParseError("not a FETCH response")
            self.emit(buf[: m.end()])
            p.pos = m.end()
            self.started = True
        out = bytearray()
        consumed = p.pos
        try:
            while True:
                if p.pos >= len(buf):
                    raise Incomplete()
                c = buf[p.pos]
                if c == 0x29:  # ")"
                    p.pos += 1
                    p.crlf()
                    if p.pos != len(buf) or lit is not None:
                        raise ParseError("garbage after FETCH response")
                    out += buf[consumed:]
                    consumed = len(buf)
                    self.done = True
                    break
                if self.after_item:
                    p.sp()
                name_v = p.atom()
                if name_v.kind not in (ATOM, NUMBER):
                    raise ParseError("bad FETCH item name")
                name = name_v.data
                p.sp()
                key = item_key(name)
                handler = self.handlers.get(key)
                if isinstance(handler, tuple):  # one upstream item fetched for several client items
                    n = self.occurrences.get(key, 0)
                    self.occurrences[key] = n + 1
                    handler = handler[min(n, len(handler) - 1)]
                vstart = p.pos
                if lit is not None and buf[vstart:vstart + 1] in (b"{", b"~") \
                        and buf.find(b"\r\n", vstart) + 2 == len(buf):
                    # Top-level literal announced at the end of this segment: stream it.
                    out += buf[consumed:name_v.start]
                    self.emit(bytes(out))
                    out.clear()
                    self.stream = (handler or Handler()).stream(name, lit, self.emit)
                    self.after_item = True
                    consumed = len(buf)
                    break
                v = p.value()
                if v.kind not in (ATOM, NUMBER, STRING, LITERAL, NIL, LIST):
                    raise ParseError("bad FETCH value")
                if handler is not None:
                    out += buf[consumed:name_v.start] + handler.value(name, v, buf)
                else:
                    out += buf[consumed:v.end]
                consumed = p.pos
                self.after_item = True
        except Incomplete:
            if lit is None:
                raise ParseError("truncated FETCH response") from None
            # A nested literal: keep the unfinished item, wait for its data.
        if out:
            self.emit(bytes(out))
        del self.buf[:consumed]


@dataclass
class Collected:
    seq: int
    items: dict[bytes, Value]
    buf: bytes
    extra: list[tuple[bytes, Value]]


class FetchCollector:
    """Buffers a small FETCH response (the proxy's own look-ahead) and parses it.

    Literals larger than ``max_literal`` are dropped and read as NIL.
    """

    def __init__(self, max_literal: int = MAX_HEADER, max_depth: int = 32):
        self.buf = bytearray()
        self.max_literal = max_literal
        self.max_depth = max_depth
        self.skipping = False

    def segment(self, data: bytes, first: bool, lit: LiteralInfo | None) -> None:
        if lit is not None and lit.size > self.max_literal:
            head = data.rfind(b"~{" if lit.binary else b"{")
            self.buf += data[:head] + b"NIL"
            self.skipping = True
            return
        self.buf += data

    def literal_data(self, chunk: bytes) -> None:
        if not self.skipping:
            self.buf += chunk

    def literal_end(self) -> None:
        self.skipping = False

    def result(self) -> Collected:
        buf = bytes(self.buf)
        m = _FETCH_HEAD.match(buf)
        if not m:
            raise ParseError("not a FETCH response")
        p = Parser(buf, m.end() - 1, self.max_depth)
        try:
            v = p.value()
            p.crlf()
        except Incomplete:
            raise ParseError("truncated FETCH response") from None
        if p.pos != len(buf) or v.kind != LIST or len(v.items) % 2:
            raise ParseError("bad FETCH response")
        items: dict[bytes, Value] = {}
        extra = []
        for i in range(0, len(v.items), 2):
            name, val = v.items[i], v.items[i + 1]
            if name.kind not in (ATOM,):
                raise ParseError("bad FETCH item name")
            items[name.data.upper()] = val
            extra.append((name.data, val))
        return Collected(int(m.group(1)), items, buf, extra)
