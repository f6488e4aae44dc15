"""The FETCH rewriter: byte identity when nothing is tagged, correct sizes when something is."""

from __future__ import annotations

import re
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.imap import headers
from gateway.imap.decisions import EMPTY, Decision
from gateway.imap.fetchitems import parse_fetch
from gateway.imap.parser import Framer, FramerSink, ParseError, Parser
from gateway.imap.plan import plan_message
from gateway.imap.rewrite import Envelope, FetchRewriter, SizeDelta, Whole, item_key, rewrite_envelope

HEADER = b'From: "Buyer" <buyer@buyer.test>\r\nTo: alice@acme.test\r\nSubject: x\r\n\r\n'
BODY = b"line one\r\nline two\r\n" * 50
MESSAGE = HEADER + BODY


def decision() -> Decision:
    p = headers.plan(HEADER, headers.READER_FIELDS, lambda a: "[客户]" if a == "buyer@buyer.test" else None)
    return Decision(len(HEADER), p.splices, p.names, ("[客户]",))


REWRITTEN = headers.apply(HEADER, decision().splices) + BODY


class Router(FramerSink):
    """Feeds each response to a fresh FetchRewriter (or passes non-FETCH lines)."""

    def __init__(self, handlers):
        self.handlers = handlers
        self.out: list[bytes] = []
        self.current = None

    def segment(self, data, first, literal):
        if first:
            self.current = FetchRewriter(self.handlers, self.out.append) if data.startswith(b"* ") and \
                b" FETCH (" in data[:20] else None
        if self.current is None:
            self.out.append(data)
        else:
            self.current.segment(data, first, literal)

    def literal_data(self, data):
        (self.current.literal_data if self.current else self.out.append)(data)

    def literal_end(self):
        if self.current:
            self.current.literal_end()


def run(data: bytes, handlers, step: int = 7) -> bytes:
    r = Router(handlers)
    f = Framer(r, 1 << 20)
    for i in range(0, len(data), step):
        f.feed(data[i : i + step])
    return b"".join(r.out)


def quote(b: bytes) -> bytes:
    return b'"' + b.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


safe = st.binary(max_size=40).filter(lambda b: not (set(b) & {0, 10, 13}))
nstr = st.one_of(st.just(b"NIL"), safe.map(quote), st.binary(max_size=40).map(lambda b: b"{%d}\r\n" % len(b) + b))
address = st.tuples(nstr, st.just(b"NIL"), nstr, nstr).map(lambda t: b"(" + b" ".join(t) + b")")
addresses = st.one_of(
    st.just(b"NIL"), st.lists(address, min_size=1, max_size=3).map(lambda a: b"(" + b"".join(a) + b")"))
envelope = st.tuples(nstr, nstr, addresses, addresses, addresses, addresses, addresses, addresses, nstr, nstr).map(
    lambda t: b"(" + b" ".join(t) + b")")
flags = st.lists(st.sampled_from([b"\\Seen", b"\\Answered", b"$Forwarded", b"\\Flagged"]), max_size=3).map(
    lambda f: b"(" + b" ".join(f) + b")")
literal = st.binary(max_size=300).map(lambda b: b"{%d}\r\n" % len(b) + b)
item = st.one_of(
    st.integers(1, 10**9).map(lambda n: b"UID %d" % n),
    st.integers(0, 10**9).map(lambda n: b"RFC822.SIZE %d" % n),
    flags.map(lambda f: b"FLAGS " + f),
    envelope.map(lambda e: b"ENVELOPE " + e),
    literal.map(lambda v: b"BODY[] " + v),
    literal.map(lambda v: b"BODY[HEADER.FIELDS (FROM TO)] " + v),
    st.one_of(literal, safe.map(quote), st.just(b"NIL")).map(lambda v: b"BODY[TEXT]<0> " + v),
    st.just(b'BODYSTRUCTURE ("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 10 1 NIL NIL NIL NIL)'),
    st.integers(0, 10**6).map(lambda n: b"MODSEQ (%d)" % n),
)
response = st.tuples(st.integers(1, 10**6), st.lists(item, min_size=1, max_size=6)).map(
    lambda t: b"* %d FETCH (" % t[0] + b" ".join(t[1]) + b")\r\n")
other = st.sampled_from([b"* 3 EXISTS\r\n", b"* OK [UIDNEXT 9] Predicted next UID\r\n", b"* 2 EXPUNGE\r\n"])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(response, other), min_size=1, max_size=4), st.integers(3, 500))
def test_untagged_responses_come_back_byte_identical(responses, step):
    data = b"".join(responses)
    assert run(data, {}, step) == data
    # handlers for a message with nothing to tag change nothing either
    handlers = {item_key(b"RFC822.SIZE"): SizeDelta(0), item_key(b"ENVELOPE"): Envelope(EMPTY, headers.READER_FIELDS),
                item_key(b"BODY[]"): Whole(EMPTY, binary=False)}
    assert run(data, handlers, step) == data


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=200))
def test_malformed_input_raises_parse_error_only(garbage):
    data = b"* 1 FETCH (" + garbage + b"\r\n"
    try:
        run(data, {}, 5)
    except ParseError:
        pass


@pytest.mark.parametrize("bad", [b"* 1 FETCH (UID 5\r\n", b"* 1 FETCH (UID 5)) \r\n", b'* 1 FETCH (X "a)\r\n',
                                 b"* 1 FETCH (FLAGS (\\Seen)\r\n", b"* 1 FETCH ((((((((((((((((((((((((((((((((((("
                                 b"(((((((1)))))))))))))))))))))))))))))))))))))))\r\n"])
def test_malformed_examples(bad):
    with pytest.raises(ParseError):
        run(bad, {})


def _served(command: bytes, response: bytes, new_header: bytes | None = None) -> bytes:
    fc = parse_fetch(command)
    plan = plan_message(fc, decision(), headers.READER_FIELDS, new_header)
    return run(response, plan.handlers, 11), plan.items


def test_whole_message_is_rewritten_and_sized():
    out, items = _served(b"a UID FETCH 5 (UID RFC822.SIZE BODY.PEEK[])\r\n",
                         b"* 1 FETCH (UID 5 RFC822.SIZE %d BODY[] {%d}\r\n" % (len(MESSAGE), len(MESSAGE))
                         + MESSAGE + b")\r\n")
    assert items == b"(UID RFC822.SIZE BODY.PEEK[])"
    assert out == b"* 1 FETCH (UID 5 RFC822.SIZE %d BODY[] {%d}\r\n" % (len(REWRITTEN), len(REWRITTEN)) \
        + REWRITTEN + b")\r\n"


@pytest.mark.parametrize("o,n", [(0, 10), (5, 200), (len(REWRITTEN) - 5, 100), (len(REWRITTEN) + 3, 10)])
def test_partial_fetch_translation(o, n):
    d = decision()
    hn = d.new_header_len
    fc = parse_fetch(b"a UID FETCH 5 (BODY.PEEK[]<%d.%d>)\r\n" % (o, n))
    new_header = headers.apply(HEADER, d.splices)
    plan = plan_message(fc, d, headers.READER_FIELDS, new_header)
    # play the upstream's part for whatever the plan asked
    if plan.items == b"(BODY.PEEK[HEADER])":
        resp = b"* 1 FETCH (UID 5 BODY[HEADER] {%d}\r\n" % len(HEADER) + HEADER + b")\r\n"
    else:
        start = max(0, o - hn)
        want = (o + n - hn) if o < hn else n
        text = BODY[start : start + want]
        assert plan.items == b"(BODY.PEEK[TEXT]<%d.%d>)" % (start, want)
        resp = b"* 1 FETCH (UID 5 BODY[TEXT]<%d> {%d}\r\n" % (start, len(text)) + text + b")\r\n"
    out = run(resp, plan.handlers, 13)
    expect = REWRITTEN[o : o + n]
    assert out == b"* 1 FETCH (UID 5 BODY[]<%d> {%d}\r\n" % (o, len(expect)) + expect + b")\r\n"


def test_envelope_names_are_tagged():
    env = (b'("Mon, 1 Jan 2024" "x" (("Buyer" NIL "buyer" "buyer.test")) (("Buyer" NIL "buyer" "buyer.test")) '
           b'(("Buyer" NIL "buyer" "buyer.test")) ((NIL NIL "alice" "acme.test")) NIL NIL NIL "<m@x>")')
    out, _ = _served(b"a FETCH 1 (ENVELOPE)\r\n", b"* 1 FETCH (ENVELOPE " + env + b")\r\n")
    assert out.count(b'"=?UTF-8?B?') == 3 and b'(NIL NIL "alice" "acme.test")' in out


def test_one_address_shown_twice_keeps_each_tagged_name_in_the_envelope():
    """To: "A" <x>, "B" <x>: the header tags each display name; the ENVELOPE named both
    entries after the first (names were looked up by address only), so the two disagreed."""
    header = (b'From: Alice <alice@acme.test>\r\nTo: "A" <buyer@buyer.test>, "B" <buyer@buyer.test>\r\n'
              b'Cc: "C" <buyer@buyer.test>\r\nSubject: x\r\n\r\n')
    p = headers.plan(header, headers.SENT_FIELDS, lambda a: "[客户]" if a == "buyer@buyer.test" else None)
    d = Decision.from_json(Decision(len(header), p.splices, p.names, ("[客户]",)).to_json())  # as stored
    assert display(headers.apply(header, d.splices), "To") == [
        "[客户] A <buyer@buyer.test>, [客户] B <buyer@buyer.test>"]
    env = (b'("Mon, 1 Jan 2024" "x" (("Alice" NIL "alice" "acme.test")) (("Alice" NIL "alice" "acme.test")) '
           b'(("Alice" NIL "alice" "acme.test")) (("A" NIL "buyer" "buyer.test")("B" NIL "BUYER" "buyer.test")) '
           b'(("C" NIL "buyer" "buyer.test")) NIL NIL "<m@x>")')
    v = Parser(env).value()
    out = rewrite_envelope(env, v, d, headers.SENT_FIELDS)
    names = [str(make_header(decode_header(n.decode()))) for n in re.findall(rb'"(=\?UTF-8\?B\?[^"]*)"', out)]
    assert names == ["[客户] A", "[客户] B", "[客户] C"]
    assert out.startswith(env[:env.index(b" ((\"A\"")])  # From, Sender, Reply-To: untouched
    # An ENVELOPE showing the address more often than the header did: the last name again.
    assert d.envelope_name("to", "buyer@buyer.test", 5) == d.envelope_name("to", "buyer@buyer.test", 1)
    assert d.envelope_name("bcc", "buyer@buyer.test") is None


def display(header: bytes, field: str) -> list[str]:
    msg = BytesHeaderParser().parsebytes(header)
    return [str(make_header(decode_header(v))) for v in msg.get_all(field, [])]


def test_parse_fetch_variants():
    fc = parse_fetch(b"x UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (From To)]<0.100>) (CHANGEDSINCE 4)\r\n")
    assert fc.uid and fc.sequence == b"1:*" and fc.modifiers == b" (CHANGEDSINCE 4)"
    assert [i.kind for i in fc.items] == ["other", "header"]
    assert parse_fetch(b"x FETCH 1 ALL\r\n").has_content
    assert not parse_fetch(b"x FETCH 1:5 (FLAGS UID BODY[TEXT] BODYSTRUCTURE)\r\n").has_content
    assert parse_fetch(b"x SEARCH ALL\r\n") is None
