"""STARTTLS response injection on the gateway's own SMTP ways upstream (CVE-2011-0411's client
side): someone on the path to the provider appends replies to the server's "220 Ready to start
TLS", in plaintext, in the same packet.  Neither the AUTH check (a wrong password must not pass)
nor the relay (a delivery must not be taken as done) may read them as the server's answers
after TLS.  Both use smtplib, which drops its read buffer at STARTTLS; these tests keep it so."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from pathlib import Path

import pytest

from gateway.config import Config
from gateway.demo.upstream import make_self_signed_cert
from gateway.smarthost import SmarthostConnection
from gateway.smtp.auth import UpstreamAuthenticator

pytestmark = pytest.mark.integration

INJECTED = (b"250-fake.example\r\n250 AUTH PLAIN LOGIN\r\n"  # the EHLO after STARTTLS
            b"235 2.7.0 Authentication successful\r\n"  # the AUTH
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n250 2.0.0 Ok: queued as INJECTED\r\n")


class InjectingServer:
    """One connection: STARTTLS answered with INJECTED behind it, then an honest server in TLS
    that refuses every login and every recipient."""

    def __init__(self, tmp: Path):
        self.cert, key = tmp / "up.crt", tmp / "up.key"
        make_self_signed_cert(self.cert, key)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(self.cert, key)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.commands: list[bytes] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _lines(self, conn: socket.socket):  # noqa: ANN202
        buf = b""
        while True:
            try:
                data = conn.recv(65536)
            except (OSError, ssl.SSLError):
                return
            if not data:
                return
            buf += data
            while b"\r\n" in buf:
                line, _, buf = buf.partition(b"\r\n")
                self.commands.append(line)
                yield line

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        conn.sendall(b"220 fake ESMTP\r\n")
        for line in self._lines(conn):
            verb = line.split(b" ", 1)[0].upper()
            if verb == b"EHLO":
                conn.sendall(b"250-fake.example\r\n250 STARTTLS\r\n")
            elif verb == b"STARTTLS":
                conn.sendall(b"220 2.0.0 Ready to start TLS\r\n" + INJECTED)  # one packet
                break
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError):
            return
        with tls:
            for line in self._lines(tls):
                verb = line.split(b" ", 1)[0].upper()
                if verb == b"EHLO":
                    tls.sendall(b"250-fake.example\r\n250 AUTH PLAIN LOGIN\r\n")
                elif verb == b"AUTH":
                    tls.sendall(b"535 5.7.8 Authentication failed\r\n")
                elif verb == b"MAIL":
                    tls.sendall(b"250 2.1.0 Ok\r\n")
                elif verb == b"RCPT":
                    tls.sendall(b"550 5.1.1 No such user\r\n")
                elif verb == b"QUIT":
                    tls.sendall(b"221 Bye\r\n")
                    return
                else:
                    tls.sendall(b"503 5.5.1 Bad sequence\r\n")


def test_the_auth_check_does_not_take_an_injected_235(tmp_path):
    server = InjectingServer(tmp_path)
    cfg = Config()
    up = cfg.upstream
    up.host, up.submission_port, up.submission_security, up.ca_file = "127.0.0.1", server.port, "starttls", server.cert
    ok = asyncio.run(UpstreamAuthenticator(cfg).verify("alice@acme.test", "not-her-password", "192.0.2.1"))
    assert ok is False
    assert any(c.startswith(b"AUTH ") for c in server.commands[2:])  # asked the real server, in TLS


def test_the_relay_does_not_take_an_injected_delivery(tmp_path):
    server = InjectingServer(tmp_path)
    ctx = ssl.create_default_context(cafile=str(server.cert))
    host = SmarthostConnection("127.0.0.1", server.port, "starttls", timeout=10, context=ctx,
                               local_hostname="gw.acme.test")
    try:
        replies = host.send(None, "alice@acme.test", ["nobody@elsewhere.example"], b"Subject: x\r\n\r\nhello\r\n")
    finally:
        host.close()
    assert replies["nobody@elsewhere.example"].code == 550, replies  # the real server's answer, not "queued"
    assert b"rcpt TO:<nobody@elsewhere.example>" in server.commands
