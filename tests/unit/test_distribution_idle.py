"""The watcher's IDLE wait, with a real IMAPClient against a scripted IMAP server on loopback."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest
from imapclient import IMAPClient

from gateway.distribute.settings import DistributionConfig
from gateway.distribute.watcher import MailboxWatcher


class ScriptedServer:
    """Answers LOGIN, CAPABILITY and IDLE; the IDLE continuation and an EXISTS go out in one send()."""

    def __init__(self, idle_reply: bytes) -> None:
        self.idle_reply = idle_reply
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.done_seen = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n")
            for line in lines:
                words = line.split()
                tag, command = (b"", words[0].upper()) if len(words) == 1 else (words[0], words[1].upper())
                if command == b"IDLE":
                    conn.sendall(self.idle_reply)
                elif command == b"DONE":
                    self.done_seen.set()
                    conn.sendall(b"%s OK Idle completed\r\n" % self.idle_tag)
                elif command == b"CAPABILITY":
                    conn.sendall(b"* CAPABILITY IMAP4rev1 IDLE\r\n%s OK done\r\n" % tag)
                elif command == b"LOGOUT":
                    conn.sendall(b"* BYE\r\n%s OK bye\r\n" % tag)
                    return
                else:
                    conn.sendall(b"%s OK done\r\n" % tag)
                if command == b"IDLE":
                    self.idle_tag = tag

    def close(self) -> None:
        self.listener.close()


def watcher(poll_interval: float) -> MailboxWatcher:
    dcfg = DistributionConfig(poll_interval=poll_interval)
    return MailboxWatcher(SimpleNamespace(dcfg=dcfg), connect=lambda _m: None, mailbox="sales@acme.test",
                          stop=threading.Event())


@pytest.mark.parametrize("reply", [b"+ idling\r\n* 4 EXISTS\r\n", b"+ idling\r\n* 4 EXISTS\r\n* 1 RECENT\r\n"])
def test_exists_in_the_same_segment_as_the_continuation_ends_the_wait(reply: bytes) -> None:
    server = ScriptedServer(reply)
    client = IMAPClient("127.0.0.1", port=server.port, ssl=False, timeout=10)
    try:
        client.login("u", "p")
        started = time.monotonic()
        watcher(poll_interval=20.0)._wait_idle(client)
        # Before the fix the EXISTS stayed in the reader's buffer and the wait ran to the rescan.
        assert time.monotonic() - started < 5.0
        assert server.done_seen.is_set()
        client.logout()
    finally:
        server.close()


def test_a_quiet_idle_waits_for_the_rescan() -> None:
    server = ScriptedServer(b"+ idling\r\n")
    client = IMAPClient("127.0.0.1", port=server.port, ssl=False, timeout=10)
    try:
        client.login("u", "p")
        started = time.monotonic()
        watcher(poll_interval=1.5)._wait_idle(client)
        assert time.monotonic() - started >= 1.4  # nothing arrived: the wait ends at the rescan
        assert server.done_seen.is_set()
        client.logout()
    finally:
        server.close()
