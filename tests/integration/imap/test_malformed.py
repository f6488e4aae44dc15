"""A broken upstream: the session ends cleanly with BYE and a logged error."""

from __future__ import annotations

import socket
import threading

from tests.integration.imap.test_protocol import Raw

SCRIPT = {
    b"ID": b"* ID NIL\r\n{tag} OK ID completed\r\n",
    b"AUTHENTICATE": b"{tag} OK [CAPABILITY IMAP4rev1 IDLE UIDPLUS COMPRESS=DEFLATE] Logged in\r\n",
    b"LIST": b'* LIST (\\HasNoChildren) "/" INBOX\r\n{tag} OK List completed\r\n',
    b"SELECT": b"* 1 EXISTS\r\n* OK [UIDVALIDITY 7] UIDs valid\r\n{tag} OK [READ-WRITE] Select completed\r\n",
    # an ENVELOPE whose address list never closes
    b"UID": b'* 1 FETCH (UID 1 ENVELOPE ("d" "s" ((NIL NIL "a" "b") NIL NIL NIL NIL NIL NIL NIL))\r\n'
            b"{tag} OK Fetch completed\r\n",
}


def fake_upstream(sock: socket.socket) -> None:
    conn, _ = sock.accept()
    with conn:
        conn.sendall(b"* OK [CAPABILITY IMAP4rev1 ID AUTH=PLAIN SASL-IR] fake ready\r\n")
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            while b"\r\n" in buf:
                line, _, buf = buf.partition(b"\r\n")
                tag, _, rest = line.partition(b" ")
                verb = rest.split(b" ", 1)[0].upper()
                conn.sendall(SCRIPT.get(verb, b"{tag} BAD unknown\r\n").replace(b"{tag}", tag))


def test_malformed_upstream_response_closes_session_cleanly(make_proxy):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    t = threading.Thread(target=fake_upstream, args=(sock,), daemon=True)
    t.start()
    px = make_proxy(upstream={"imap_port": sock.getsockname()[1], "imap_security": "none"})
    r = Raw(px.host, px.starttls_port)
    r.send(b"a1 LOGIN alice@acme.test alice-pw\r\n")
    ok = r.until(b"a1")[-1]
    assert ok.startswith(b"a1 OK") and b"COMPRESS" not in ok
    r.send(b"a2 SELECT INBOX\r\n")
    assert r.until(b"a2")[-1].startswith(b"a2 OK")
    r.send(b"a3 UID FETCH 1 (ENVELOPE)\r\n")
    lines = []
    try:
        while True:
            lines.append(r.line())
    except EOFError:
        pass
    assert lines and lines[-1].startswith(b"* BYE"), lines
    assert not any(ln.startswith(b"a3 ") for ln in lines)
    px.stop()
    assert "malformed upstream response" in px.log_path.read_text() or \
        "upstream protocol error" in px.log_path.read_text()
    sock.close()
