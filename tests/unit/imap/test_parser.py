"""The framer and the value parser (including hypothesis properties)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.imap.parser import (
    LIST,
    LITERAL,
    NIL,
    OVERSIZED,
    STRING,
    Framer,
    FramerSink,
    ParseError,
    Parser,
    literal_at_end,
    refuse_oversized,
)


class Recorder(FramerSink):
    def __init__(self):
        self.events: list[tuple] = []

    def segment(self, data, first, literal):
        self.events.append(("seg", data, first, literal.size if literal else None))

    def literal_data(self, data):
        self.events.append(("lit", data))

    def literal_end(self):
        self.events.append(("end",))

    def joined(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] in ("seg", "lit"))


def test_literal_at_end():
    assert literal_at_end(b"* 1 FETCH (BODY[] {12}\r\n").size == 12
    lit = literal_at_end(b"a APPEND INBOX ~{5+}\r\n")
    assert lit.size == 5 and lit.binary and lit.nonsync
    assert literal_at_end(b"* OK done\r\n") is None
    assert literal_at_end(b"* OK {abc}\r\n") is None


@pytest.mark.parametrize("line, binary, nonsync", [
    (b"a APPEND INBOX {99999999999999999999}\r\n", False, False),  # 20 digits
    (b"a APPEND INBOX {99999999999999999999+}\r\n", False, True),
    (b"a APPEND INBOX ~{00000000000000000000005}\r\n", True, False),  # leading zeros count too
    (b"a LOGIN {" + b"9" * 5000 + b"}\r\n", False, False),  # more digits than int() takes
])
def test_a_literal_with_more_than_19_digits_is_announced_as_oversized(line, binary, nonsync):
    """Not a line without a literal (the upstream reads one there): a size over any limit."""
    lit = literal_at_end(line)
    assert lit is not None and lit.size == OVERSIZED and lit.binary is binary and lit.nonsync is nonsync
    assert literal_at_end(b"a APPEND INBOX {9999999999999999999}\r\n").size == 9_999_999_999_999_999_999
    assert OVERSIZED > 9_999_999_999_999_999_999


@pytest.mark.parametrize("line", [b"a SEARCH 99999999999999999999}\r\n", b"a X {1a99999999999999999999}\r\n",
                                  b"a X {99999999999999999999}}\r\n", b"a X {" + b"9" * 30 + b"++}\r\n"])
def test_digits_without_an_announcement_are_no_literal(line):
    assert literal_at_end(line) is None


def test_the_framer_hands_an_oversized_literal_on_and_the_upstream_check_refuses_it():
    r = Recorder()
    Framer(r, 1000).feed(b"a APPEND INBOX {99999999999999999999}\r\n")
    assert r.events == [("seg", b"a APPEND INBOX {99999999999999999999}\r\n", True, OVERSIZED)]
    with pytest.raises(ParseError):
        Framer(Recorder(), 1000, refuse_oversized).feed(b"* 1 FETCH (BODY[] {99999999999999999999}\r\n")
    r = Recorder()
    Framer(r, 1000, refuse_oversized).feed(b"* 1 FETCH (BODY[] {9999999999999999999}\r\n")
    assert r.events[0][3] == 9_999_999_999_999_999_999


def test_framer_splits_lines_and_streams_literals():
    r = Recorder()
    f = Framer(r, 1000)
    data = b"* 1 FETCH (BODY[] {5}\r\nhello)\r\na OK done\r\n"
    for i in range(len(data)):  # byte by byte
        f.feed(data[i : i + 1])
    assert r.joined() == data
    firsts = [e[2] for e in r.events if e[0] == "seg"]
    assert firsts == [True, False, True]


def test_framer_limits():
    f = Framer(Recorder(), 10)
    with pytest.raises(ParseError):
        f.feed(b"x" * 11)
    with pytest.raises(ParseError):
        Framer(Recorder(), 100).feed(b"a NOOP\n")  # bare LF


def test_parser_values():
    buf = b'(FLAGS (\\Seen) BODY[HEADER.FIELDS (FROM TO)] {3}\r\nabc X "q\\"s" NIL)'
    v = Parser(buf).value()
    assert v.kind == LIST and v.end == len(buf)
    kinds = [i.kind for i in v.items]
    assert kinds[3] == LITERAL and v.items[3].data == b"abc"
    assert v.items[2].data == b"BODY[HEADER.FIELDS (FROM TO)]"
    assert v.items[5].kind == STRING and v.items[5].data == b'q"s'
    assert v.items[6].kind == NIL


@pytest.mark.parametrize("bad", [b'("unterminated\r\n)', b"(a\x00b)", b'("bad \\x escape")', b"(a  b)", b"(a)(b"])
def test_parser_rejects_malformed(bad):
    with pytest.raises(ParseError):
        p = Parser(bad + b"\r\n")
        p.value()
        p.crlf()


def test_parser_nesting_limit():
    with pytest.raises(ParseError):
        Parser(b"(" * 40 + b")" * 40, max_depth=32).value()


atoms = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789\\.-", min_size=1, max_size=8)
quoted_text = st.binary(max_size=20).filter(lambda b: b"\r" not in b and b"\n" not in b and b"\x00" not in b)


def _quote(b: bytes) -> bytes:
    return b'"' + b.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


values = st.recursive(
    st.one_of(
        atoms.map(lambda s: s.encode()).filter(lambda s: s.upper() != b"NIL"),
        quoted_text.map(_quote),
        st.binary(max_size=30).map(lambda b: b"{%d}\r\n" % len(b) + b),
        st.just(b"NIL"),
    ),
    lambda children: st.lists(children, max_size=4).map(lambda xs: b"(" + b" ".join(xs) + b")"),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(values)
def test_parser_round_trips_raw_spans(v):
    parsed = Parser(v + b"\r\n", max_depth=64).value()
    assert parsed.start == 0 and parsed.end == len(v)


@settings(max_examples=200, deadline=None)
@given(st.lists(values, min_size=1, max_size=4), st.integers(min_value=1, max_value=7))
def test_framer_reassembles_any_chunking(vals, step):
    data = b"".join(b"* %d FETCH (X %s)\r\n" % (i + 1, v) for i, v in enumerate(vals))
    r = Recorder()
    f = Framer(r, 10_000)
    for i in range(0, len(data), step):
        f.feed(data[i : i + step])
    assert r.joined() == data
