"""The upstream pass-through fast path gives exactly what the framer path gives."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.imap import upstream as up
from gateway.imap.parser import FramerSink, LiteralInfo

_LOOK = (b"* CAPABILITY ", b"* OK [CAPABILITY", b"* PREAUTH", b"* BYE", b"* OK [UIDVALIDITY")


class FakeRelay(up.RelaySink):
    """Acts like the session's relay: looks at tagged lines and the untagged lines it rewrites."""

    def __init__(self):
        self.out = bytearray()
        self.looked: list[bytes] = []

    def segment(self, data: bytes, first: bool, literal: LiteralInfo | None) -> None:
        if first and literal is None:
            if data[:2] == b"* ":
                if data[:24].upper().startswith(_LOOK):
                    self.looked.append(data)
                    data = data.replace(b"IMAP4rev1", b"IMAP4rev1 X-PROXY")
            elif data[:1] != b"+":
                self.looked.append(data)
        self.out += data

    def literal_data(self, data: bytes) -> None:
        self.out += data

    def verbatim(self, data: bytes) -> None:
        self.out += data


class Sink(FramerSink):
    def __init__(self):
        self.out = bytearray()

    def segment(self, data, first, literal):
        self.out += data

    def literal_data(self, data):
        self.out += data


def _upstream(fast: bool) -> tuple[up.UpstreamProtocol, FakeRelay]:
    proto = up.UpstreamProtocol()
    proto._got_greeting = True
    relay = FakeRelay()
    proto.relay = relay
    if not fast:
        proto._pass_through = lambda data: False
    return proto, relay


LINES = [
    b"* 1 FETCH (UID 1 FLAGS (\\Seen))\r\n",
    b"* 22 FETCH (UID 40 FLAGS ())\r\n",
    b"* 3 EXISTS\r\n",
    b"* 1 RECENT\r\n",
    b"* OK [UIDVALIDITY 1700000000] UIDs valid\r\n",
    b"* ok [uidvalidity 5] lower case\r\n",
    b"* CAPABILITY IMAP4rev1 IDLE MOVE\r\n",
    b"* capability IMAP4rev1 lower\r\n",
    b"* OK [CAPABILITY IMAP4rev1 ID] hi\r\n",
    b"* OK Still here\r\n",
    b"* BYE going away\r\n",
    b"* PREAUTH odd\r\n",
    b"+ idling\r\n",
    b"+\r\n",
    b"a1 OK FETCH completed\r\n",
    b"t22 OK [READ-WRITE] Select completed (0.001 + 0.000 secs).\r\n",
    b"A BAD no\r\n",
    b"*\r\n",
    b"* 5 FETCH (UID 9 BODY[] {12}\r\nhello\r\nworld)\r\n",
    b"* 6 FETCH (ENVELOPE (NIL {3}\r\n}\r\n NIL))\r\n",
    b"* 7 FETCH (BODY[] {0}\r\n)\r\n",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(LINES), min_size=1, max_size=40), st.lists(st.integers(1, 200), max_size=40))
def test_fast_path_equals_framer_path(lines, cuts):
    stream = b"".join(lines)
    reads, i = [], 0
    for c in cuts:
        if i >= len(stream):
            break
        reads.append(stream[i : i + c])
        i += c
    reads.append(stream[i:])
    reads = [r for r in reads if r] + [b"x9 OK done\r\n" * 3]  # whole lines at the end too
    results = []
    for fast in (True, False):
        proto, relay = _upstream(fast)
        for r in reads:
            proto.dataReceived(r)
        assert not proto.closed
        results.append((bytes(relay.out), relay.looked))
    assert results[0] == results[1]


def test_plain_read_is_relayed_as_one_object_with_only_the_completion_looked_at():
    proto, relay = _upstream(True)
    chunk = b"".join(LINES[:2]) * 10 + b"a7 OK FETCH completed\r\n"
    sent: list[bytes] = []
    relay.verbatim = sent.append
    proto.dataReceived(chunk)
    assert relay.looked == [b"a7 OK FETCH completed\r\n"]
    assert b"".join(sent) + bytes(relay.out) == chunk and len(sent) == 1


def test_a_completion_that_installs_a_chooser_hands_the_rest_to_it():
    proto, relay = _upstream(True)
    claimed = Sink()
    proto.hold()  # no transport here: the command stays in the held writes
    done = proto.send(b"UID FETCH 1:* (UID)\r\n")  # tag ~mg1
    done.addCallback(lambda _: setattr(proto, "chooser", lambda first: claimed if b"FETCH" in first else None))
    proto.dataReceived(b"* 2 EXISTS\r\n~mg1 OK done\r\n* 1 FETCH (UID 5)\r\n* 3 EXPUNGE\r\n")
    assert bytes(claimed.out) == b"* 1 FETCH (UID 5)\r\n"
    assert bytes(relay.out) == b"* 2 EXISTS\r\n* 3 EXPUNGE\r\n"


@pytest.mark.parametrize("bad", [b"* 1 EXISTS\n", b"* 1 EXISTS\r\n* 2 EXISTS\n"])
def test_bare_lf_still_fails_the_session(bad):
    proto, relay = _upstream(True)
    failures = []
    proto.fail = failures.append
    proto.dataReceived(bad)
    assert failures and "CRLF" in failures[0]
