"""STARTTLS response injection on the proxy's own way upstream (CVE-2011-0411's client side):
someone on the path between the gateway and the provider appends answers to the server's
STARTTLS OK, in plaintext, in the same packet.  The proxy must not read them as the answers to
what it says after TLS — here a fake "login OK" for a wrong password."""

from __future__ import annotations

import socket
import ssl
import threading

from gateway.demo.upstream import make_self_signed_cert
from tests.integration.imap.test_protocol import Raw

INJECTED = (b"* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR\r\n"
            + b"".join(b"~mg%d OK [CAPABILITY IMAP4rev1 IDLE] injected\r\n" % n for n in range(1, 10)))


def serve_tls(conn: ssl.SSLSocket) -> None:
    """The honest server after TLS: it knows no one, so every login fails."""
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
            tag, _, rest = line.partition(b" ")
            verb = rest.split(b" ", 1)[0].upper()
            if verb == b"CAPABILITY":
                conn.sendall(b"* CAPABILITY IMAP4rev1 ID AUTH=PLAIN SASL-IR\r\n" + tag + b" OK done\r\n")
            elif verb == b"ID":
                conn.sendall(b"* ID NIL\r\n" + tag + b" OK ID completed\r\n")
            elif verb in (b"AUTHENTICATE", b"LOGIN"):
                conn.sendall(tag + b" NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
            else:
                conn.sendall(tag + b" BAD unknown\r\n")


def fake_upstream(sock: socket.socket, ctx: ssl.SSLContext, seen: list[bytes]) -> None:
    conn, _ = sock.accept()
    with conn:
        conn.sendall(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] fake ready\r\n")
        line = b""
        while not line.endswith(b"\r\n"):
            line += conn.recv(1)
        seen.append(line)
        tag = line.split(b" ", 1)[0]
        conn.sendall(tag + b" OK Begin TLS negotiation now\r\n" + INJECTED)  # one packet
        try:
            tls = ctx.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError):
            return
        with tls:
            serve_tls(tls)


def test_answers_injected_after_the_upstreams_starttls_ok_are_dropped(make_proxy, tmp_path):
    cert, key = tmp_path / "up.crt", tmp_path / "up.key"
    make_self_signed_cert(cert, key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    seen: list[bytes] = []
    threading.Thread(target=fake_upstream, args=(sock, ctx, seen), daemon=True).start()
    px = make_proxy(upstream={"imap_port": sock.getsockname()[1], "imap_security": "starttls",
                              "ca_file": str(cert)})
    r = Raw(px.host, px.starttls_port)
    r.send(b"a1 LOGIN alice@acme.test not-her-password\r\n")
    answer = r.until(b"a1")[-1]
    assert seen and seen[0].endswith(b"STARTTLS\r\n")  # it did go through the injecting STARTTLS
    assert answer.startswith(b"a1 NO [AUTHENTICATIONFAILED]"), answer
    r.send(b"a2 SELECT INBOX\r\n")
    assert r.until(b"a2")[-1] == b"a2 BAD Command not allowed before login"
    r.close()
    px.stop()
    assert "bytes after STARTTLS's OK, before TLS; dropped" in px.log_path.read_text()
