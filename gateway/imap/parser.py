"""IMAP wire syntax: a streaming framer and a parser for complete values.

The framer splits a byte stream into *segments* (one line up to CRLF, which may
end in a literal announcement ``{n}`` / ``~{n}`` / ``{n+}``) and literal data,
without ever holding a literal: literal bytes are handed on as they arrive.

The parser works on a complete buffer in which literals are inline
(``{5}\\r\\nhello``) and keeps raw spans, so anything it does not change can be
re-emitted byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

CRLF = b"\r\n"
_MAX_LITERAL_DIGITS = 19
OVERSIZED = 10**_MAX_LITERAL_DIGITS  # the size of a literal announced with more digits


class ParseError(ValueError):
    """The input is not valid IMAP syntax (or breaks a limit)."""


class Incomplete(Exception):
    """The parser ran off the end of the buffer: more input is needed."""


@dataclass(frozen=True, slots=True)
class LiteralInfo:
    size: int
    binary: bool = False  # literal8: ~{n}
    nonsync: bool = False  # LITERAL+ / LITERAL-: {n+}


def literal_at_end(line: bytes | bytearray) -> LiteralInfo | None:
    """The literal announced at the end of ``line`` (which ends with CRLF), if any.  One with
    more than 19 digits is announced all the same, with size ``OVERSIZED`` (larger than any
    limit): the proxy refuses it as too large rather than relaying the line as one without
    a literal, which the upstream would read differently."""
    n = len(line)
    if n < 5 or line[n - 3] != 0x7D:  # "}"
        return None
    start = line.rfind(b"{", max(0, n - 3 - _MAX_LITERAL_DIGITS - 2), n - 3)
    if start < 0:
        start = _long_announcement(line, n - 3)
        if start < 0:
            return None
    digits = bytes(line[start + 1 : n - 3])
    nonsync = digits.endswith(b"+")
    if nonsync:
        digits = digits[:-1]
    if not digits or not digits.isdigit():
        return None
    binary = start > 0 and line[start - 1] == 0x7E  # "~"
    return LiteralInfo(int(digits) if len(digits) <= _MAX_LITERAL_DIGITS else OVERSIZED, binary, nonsync)


def _long_announcement(line: bytes | bytearray, close: int) -> int:
    """The index of the "{" of a literal announcement with more digits than
    ``literal_at_end`` looks back over, whose "}" is at ``close``; -1 if there is none."""
    head = bytes(line[:close])
    if head.endswith(b"+"):
        head = head[:-1]
    rest = head.rstrip(b"0123456789")
    return len(rest) - 1 if len(rest) < len(head) and rest.endswith(b"{") else -1


def refuse_oversized(literal: LiteralInfo) -> None:
    """A Framer ``literal_check`` for the upstream's responses: a literal announced with more
    than 19 digits is a protocol error (ParseError), not a size to stream."""
    if literal.size >= OVERSIZED:
        raise ParseError("literal announced with more than 19 digits")


class FramerSink:
    """Receives the framer's events (override what you need)."""

    def segment(self, data: bytes, first: bool, literal: LiteralInfo | None) -> None:
        raise NotImplementedError

    def literal_data(self, data: bytes) -> None:
        raise NotImplementedError

    def literal_end(self) -> None:
        pass


class Framer:
    """Split a stream of IMAP lines and literals.

    ``first`` is true for the first segment of a response/command (a segment
    that does not continue after a literal).  ``literal_check`` may refuse a
    literal before any of its bytes are consumed by raising ParseError.
    Setting ``paused`` from a sink callback stops delivery after that event;
    ``resume()`` continues with the buffered bytes.
    """

    __slots__ = ("_buf", "_pos", "_remaining", "_first", "max_line", "sink", "literal_check", "_scan", "paused")

    def __init__(self, sink: FramerSink, max_line: int,
                 literal_check: Callable[[LiteralInfo], None] | None = None):
        self.sink = sink
        self.max_line = max_line
        self.literal_check = literal_check
        self._buf = bytearray()
        self._pos = 0
        self._remaining = 0  # literal bytes still expected
        self._first = True
        self._scan = 0
        self.paused = False

    @property
    def in_literal(self) -> bool:
        return self._remaining > 0

    @property
    def idle(self) -> bool:
        """At a response/command boundary with nothing buffered (the next byte starts a new line)."""
        return self._first and not self._remaining and not self._buf and not self.paused

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def take_buffer(self) -> bytes:
        """Remove and return unprocessed bytes (e.g. after STARTTLS)."""
        data = bytes(self._buf[self._pos :])
        del self._buf[:]
        self._pos = 0
        self._scan = 0
        return data

    def feed(self, data: bytes) -> None:
        if self._remaining and not self._buf and not self.paused:
            # Fast path: literal data straight through, no copy into the buffer.
            if len(data) <= self._remaining:
                self._remaining -= len(data)
                self.sink.literal_data(data)
                if not self._remaining:
                    self.sink.literal_end()
                return
            head = data[: self._remaining]
            data = data[self._remaining :]
            self._remaining = 0
            self.sink.literal_data(head)
            self.sink.literal_end()
        self._buf += data
        self._drain()

    def cancel_literal(self) -> None:
        """Forget the literal just announced (a refused synchronising literal)."""
        self._remaining = 0
        self._first = True

    def resume(self) -> None:
        self.paused = False
        self._drain()

    def _drain(self) -> None:
        buf = self._buf
        try:
            while self._pos < len(buf) and not self.paused:
                pos = self._pos
                if self._remaining:
                    take = min(self._remaining, len(buf) - pos)
                    chunk = bytes(buf[pos : pos + take])
                    self._pos = pos + take
                    self._remaining -= take
                    self.sink.literal_data(chunk)
                    if not self._remaining:
                        self.sink.literal_end()
                    continue
                nl = buf.find(b"\n", max(pos, self._scan))
                if nl < 0:
                    if len(buf) - pos > self.max_line:
                        raise ParseError("line too long")
                    self._scan = len(buf)
                    break
                self._scan = 0
                if nl - pos + 1 > self.max_line:
                    raise ParseError("line too long")
                if nl == pos or buf[nl - 1] != 0x0D:
                    raise ParseError("line not terminated by CRLF")
                line = bytes(buf[pos : nl + 1])
                self._pos = nl + 1
                lit = literal_at_end(line)
                first = self._first
                if lit is not None:
                    if self.literal_check is not None:
                        self.literal_check(lit)
                    self._first = False
                    self._remaining = lit.size
                else:
                    self._first = True
                self.sink.segment(line, first, lit)
                if lit is not None and lit.size == 0 and not self._first:
                    self.sink.literal_end()
        finally:
            if self._pos:
                del buf[: self._pos]
                self._scan = max(0, self._scan - self._pos)
                self._pos = 0


# -- values -------------------------------------------------------------------

ATOM = "atom"
NUMBER = "number"
STRING = "string"  # quoted
LITERAL = "literal"
NIL = "nil"
LIST = "list"


@dataclass(slots=True)
class Value:
    kind: str
    start: int
    end: int
    data: bytes = b""  # atom text, string/literal content
    items: list[Value] = field(default_factory=list)
    binary: bool = False

    def text(self) -> bytes | None:
        """Content of a string-like value (None for NIL)."""
        if self.kind == NIL:
            return None
        return self.data


_ATOM_STOP = frozenset(b' ()"\r\n{')


class Parser:
    """Recursive-descent parser over a complete buffer (literals inline)."""

    __slots__ = ("buf", "pos", "max_depth")

    def __init__(self, buf: bytes, pos: int = 0, max_depth: int = 32):
        self.buf = buf
        self.pos = pos
        self.max_depth = max_depth

    def peek(self) -> int:
        if self.pos >= len(self.buf):
            raise Incomplete()
        return self.buf[self.pos]

    def expect(self, token: bytes) -> None:
        end = self.pos + len(token)
        if end > len(self.buf):
            if self.buf[self.pos :] == token[: len(self.buf) - self.pos]:
                raise Incomplete()
            raise ParseError(f"expected {token!r} at {self.pos}")
        if self.buf[self.pos : end].upper() != token.upper():
            raise ParseError(f"expected {token!r} at {self.pos}")
        self.pos = end

    def sp(self) -> None:
        if self.peek() != 0x20:
            raise ParseError(f"expected SP at {self.pos}")
        self.pos += 1

    def number(self) -> int:
        start = self.pos
        buf = self.buf
        while self.pos < len(buf) and 0x30 <= buf[self.pos] <= 0x39:
            self.pos += 1
        if self.pos == start:
            if self.pos >= len(buf):
                raise Incomplete()
            raise ParseError(f"expected number at {start}")
        if self.pos - start > 20:
            raise ParseError("number too long")
        return int(buf[start : self.pos])

    def atom(self) -> Value:
        """An atom; ``[...]`` sections (which may hold spaces and parens) are part of it."""
        buf = self.buf
        start = self.pos
        n = len(buf)
        i = start
        while i < n:
            c = buf[i]
            if c == 0x5B:  # "["
                close = buf.find(b"]", i)
                if close < 0:
                    nl = buf.find(b"\r", i)
                    if nl >= 0:
                        raise ParseError("unterminated [ in atom")
                    raise Incomplete()
                i = close + 1
                continue
            if c in _ATOM_STOP or c < 0x20 or c == 0x7F:
                break
            i += 1
        if i == n:
            raise Incomplete()
        if i == start:
            raise ParseError(f"unexpected byte {bytes([buf[start]])!r} at {start}")
        self.pos = i
        text = bytes(buf[start:i])
        if text.upper() == b"NIL":
            return Value(NIL, start, i, text)
        if text.isdigit():
            return Value(NUMBER, start, i, text)
        return Value(ATOM, start, i, text)

    def quoted(self) -> Value:
        buf = self.buf
        start = self.pos
        i = start + 1
        out = bytearray()
        n = len(buf)
        while True:
            if i >= n:
                raise Incomplete()
            c = buf[i]
            if c == 0x22:
                break
            if c == 0x5C:
                if i + 1 >= n:
                    raise Incomplete()
                nxt = buf[i + 1]
                if nxt not in (0x22, 0x5C):
                    raise ParseError("bad escape in quoted string")
                out.append(nxt)
                i += 2
                continue
            if c in (0x0D, 0x0A, 0x00):
                raise ParseError("CR/LF/NUL in quoted string")
            out.append(c)
            i += 1
        self.pos = i + 1
        return Value(STRING, start, self.pos, bytes(out))

    def literal(self) -> Value:
        buf = self.buf
        start = self.pos
        binary = False
        if buf[self.pos] == 0x7E:
            binary = True
            self.pos += 1
        self.expect(b"{")
        size = self.number()
        if self.pos < len(buf) and buf[self.pos] == 0x2B:  # "+"
            self.pos += 1
        self.expect(b"}\r\n")
        end = self.pos + size
        if end > len(buf):
            raise Incomplete()
        data = bytes(buf[self.pos : end])
        self.pos = end
        return Value(LITERAL, start, end, data, binary=binary)

    def value(self, depth: int = 0) -> Value:
        c = self.peek()
        if c == 0x28:  # "("
            return self.list(depth + 1)
        if c == 0x22:
            return self.quoted()
        if c == 0x7B or (c == 0x7E and self.pos + 1 < len(self.buf) and self.buf[self.pos + 1] == 0x7B):
            return self.literal()
        if c == 0x7E and self.pos + 1 >= len(self.buf):
            raise Incomplete()
        return self.atom()

    def list(self, depth: int) -> Value:
        if depth > self.max_depth:
            raise ParseError("nesting too deep")
        start = self.pos
        self.pos += 1
        items: list[Value] = []
        if self.peek() == 0x29:
            self.pos += 1
            return Value(LIST, start, self.pos, items=items)
        while True:
            items.append(self.value(depth))
            c = self.peek()
            if c == 0x29:
                self.pos += 1
                return Value(LIST, start, self.pos, items=items)
            if c == 0x28 and items[-1].kind == LIST:
                continue  # address lists and multipart bodies: "(...)(...)" without SP
            if c != 0x20:
                raise ParseError(f"expected SP or ) at {self.pos}")
            self.pos += 1

    def crlf(self) -> None:
        self.expect(CRLF)


# -- strings out ------------------------------------------------------------------

def quote(data: bytes) -> bytes:
    """An IMAP quoted string, or a literal when the data cannot be quoted."""
    if b"\r" in data or b"\n" in data or b"\x00" in data or len(data) > 4096:
        return b"{%d}\r\n" % len(data) + data
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def nstring(data: bytes | None) -> bytes:
    return b"NIL" if data is None else quote(data)


def parse_astrings(buf: bytes, pos: int, count: int, max_depth: int = 8) -> list[bytes]:
    """Parse ``count`` space-separated astrings (atoms, quoted, literals) from ``pos``."""
    p = Parser(buf, pos, max_depth)
    out = []
    for i in range(count):
        if i:
            p.sp()
        v = p.value()
        if v.kind == LIST:
            raise ParseError("expected a string")
        out.append(v.data)
    return out
