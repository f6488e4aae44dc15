"""HeldWrites: what the proxy collects while relaying one read goes out as one write."""

from gateway.imap.fastio import HeldWrites


def test_not_held_the_caller_writes_at_once():
    held = HeldWrites()
    assert held.add(b"a") is False
    assert held.release() == b""


def test_held_writes_come_back_joined_in_order_once():
    held = HeldWrites()
    held.hold()
    held.hold()  # holding twice keeps what was held
    assert held.add(b"A1 OK\r\n") and held.add(b"* 1 EXISTS\r\n")
    assert held.release() == b"A1 OK\r\n* 1 EXISTS\r\n"
    assert held.release() == b""
    assert held.add(b"x") is False
