"""Login, TLS, limits and pass-through behaviour of the proxy."""

from __future__ import annotations

import base64
import imaplib
import ssl
import time

import pytest

from gateway.demo.upstream import free_ports
from tests.harness import wait_until
from tests.harness.lineclient import LineClient
from tests.integration.imap.helpers import direct, fetch_item, gateway_context, message, uid_of, via


class Raw(LineClient):
    """A line-level IMAP client for what imaplib cannot say."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None = None, source: str | None = None):
        super().__init__(host, port, context, source, timeout=10)
        self.greeting = self.line()


def test_implicit_tls_and_imaplib(proxy, gateway_cert):
    c = imaplib.IMAP4_SSL(proxy.host, proxy.tls_port, ssl_context=gateway_context(gateway_cert))
    assert "AUTH=PLAIN" in c.capabilities
    typ, _ = c.login("alice@acme.test", "alice-pw")
    assert typ == "OK"
    typ, caps = c.capability()
    assert b"COMPRESS" not in caps[0] and b"IDLE" in caps[0]
    c.logout()


def test_capabilities_after_login_are_a_subset_of_upstream(proxy, imap_upstream):
    d, p = direct(imap_upstream), via(proxy)
    up = set(d.capability()[1][0].split())
    mine = set(p.capability()[1][0].split())
    assert mine <= {c for c in up} | {c for c in up if c.startswith(b"APPENDLIMIT")}
    assert b"IDLE" in mine and b"UIDPLUS" in mine and b"MOVE" in mine


def test_starttls_and_logindisabled(make_proxy, gateway_cert):
    px = make_proxy(plaintext_networks=[])
    c = imaplib.IMAP4(px.host, px.starttls_port)
    assert "LOGINDISABLED" in c.capabilities and "STARTTLS" in c.capabilities
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        c.login("alice@acme.test", "alice-pw")
    c.starttls(ssl_context=gateway_context(gateway_cert))
    assert "LOGINDISABLED" not in c.capabilities
    assert c.login("alice@acme.test", "alice-pw")[0] == "OK"
    c.logout()


def test_authenticate_plain_with_sasl_ir_and_login_literal(proxy):
    r = Raw(proxy.host, proxy.starttls_port)
    token = base64.b64encode(b"\0alice@acme.test\0alice-pw")
    r.send(b"a1 AUTHENTICATE PLAIN " + token + b"\r\n")
    assert r.until(b"a1")[-1].startswith(b"a1 OK [CAPABILITY ")
    r.send(b"a2 SELECT INBOX\r\n")
    assert r.until(b"a2")[-1].startswith(b"a2 OK")
    r.close()
    r = Raw(proxy.host, proxy.starttls_port)
    r.send(b"b1 LOGIN {15+}\r\nalice@acme.test {8}\r\n")
    assert r.line().startswith(b"+")
    r.send(b"alice-pw\r\n")
    assert r.until(b"b1")[-1].startswith(b"b1 OK")
    r.close()
    r = Raw(proxy.host, proxy.starttls_port)
    r.send(b"c1 AUTHENTICATE LOGIN\r\n")
    assert r.line() == b"+ VXNlcm5hbWU6"
    r.send(base64.b64encode(b"bob@acme.test") + b"\r\n")
    assert r.line() == b"+ UGFzc3dvcmQ6"
    r.send(base64.b64encode(b"bob-pw") + b"\r\n")
    assert r.until(b"c1")[-1].startswith(b"c1 OK")
    r.close()


def test_wrong_password_is_refused(proxy):
    # From 127.0.0.3: Dovecot's auth penalty (per client address, thanks to the forwarded
    # x-originating-ip) must not slow the other tests' logins from 127.0.0.1.
    r = Raw(proxy.host, proxy.starttls_port, source="127.0.0.3")
    r.send(b"a1 LOGIN alice@acme.test wrong\r\n")
    assert r.until(b"a1")[-1].startswith(b"a1 NO [AUTHENTICATIONFAILED]")
    r.send(b"a2 LOGIN alice@acme.test alice-pw\r\n")  # the session goes on
    assert r.until(b"a2")[-1].startswith(b"a2 OK")
    start = time.monotonic()
    assert via(proxy).noop()[0] == "OK"  # other clients are not penalised
    assert time.monotonic() - start < 1.5


def test_upstream_down_answers_unavailable_fast(make_proxy):
    (closed,) = free_ports(1)
    px = make_proxy(upstream={"imap_port": closed})
    c = imaplib.IMAP4(px.host, px.starttls_port)
    start = time.monotonic()
    with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
        c.login("alice@acme.test", "alice-pw")
    assert time.monotonic() - start < 2


def test_overlong_command_line_is_bad_and_session_survives(make_proxy):
    px = make_proxy(max_line_length=2048)
    r = Raw(px.host, px.starttls_port)
    r.send(b"a1 LOGIN alice@acme.test alice-pw\r\n")
    assert r.until(b"a1")[-1].startswith(b"a1 OK")
    r.send(b"a2 SEARCH " + b"ALL " * 5000 + b"\r\n")
    assert r.until(b"a2")[-1] == b"a2 BAD Command line too long"
    r.send(b"a3 NOOP\r\n")
    assert r.until(b"a3")[-1].startswith(b"a3 OK")


def test_literal_limit_and_literal_plus_append(make_proxy, imap_upstream):
    px = make_proxy(max_literal_size=100_000)
    r = Raw(px.host, px.starttls_port)
    r.send(b"a1 LOGIN alice@acme.test alice-pw\r\n")
    caps = r.until(b"a1")[-1]
    assert b"LITERAL+" in caps
    mid, raw = message("Someone <someone@unknown.test>", body="z" * 50_000 + "\r\n")
    r.send(b"a2 APPEND INBOX (\\Seen) {%d+}\r\n" % len(raw) + raw + b"\r\n")
    assert r.until(b"a2")[-1].startswith(b"a2 OK")
    # synchronising literal over the limit: refused before any data is sent
    r.send(b"a3 APPEND INBOX {200000}\r\n")
    assert r.until(b"a3")[-1].startswith(b"a3 NO [TOOBIG]")
    # non-synchronising literal over the limit: swallowed, refused, session goes on
    r.send(b"a4 APPEND INBOX {200000+}\r\n" + b"x" * 200000 + b"\r\n")
    assert r.until(b"a4")[-1].startswith(b"a4 NO [TOOBIG]")
    r.send(b"a5 NOOP\r\n")
    assert r.until(b"a5")[-1].startswith(b"a5 OK")
    d = direct(imap_upstream)
    uid = uid_of(d, mid)
    assert fetch_item(d, uid, "BODY.PEEK[]") == raw


def test_big_append_streams_through(proxy, imap_upstream):
    mid, raw = message("Someone <someone@unknown.test>", body=("q" * 998 + "\r\n") * 8000)
    p = via(proxy)
    typ, _ = p.append("INBOX", None, None, raw)
    assert typ == "OK"
    uid = uid_of(p, mid)
    assert fetch_item(p, uid, "BODY.PEEK[]") == raw


def test_idle_passes_through(proxy, imap_upstream):
    from imapclient import IMAPClient

    with IMAPClient(proxy.host, proxy.starttls_port, ssl=False, timeout=10) as c:
        c.login("bob@acme.test", "bob-pw")
        c.select_folder("INBOX")
        c.idle()
        _, raw = message("x@unknown.test", to="bob@acme.test")
        imap_upstream.deliver("bob@acme.test", raw)
        responses = c.idle_check(timeout=10)
        c.idle_done()
        assert any(r[1] == b"EXISTS" for r in responses), responses
        assert c.noop()[0]


def test_pipelined_commands(proxy, imap_upstream):
    # The INBOX must not be empty whichever tests ran before: FETCH 1:* of none is a BAD.
    imap_upstream.deliver("alice@acme.test", message("Buyer <buyer@buyer.test>", subject="Pipelined")[1])
    r = Raw(proxy.host, proxy.starttls_port)
    r.send(b"a1 LOGIN alice@acme.test alice-pw\r\na2 SELECT INBOX\r\na3 FETCH 1:* (UID RFC822.SIZE ENVELOPE)\r\n"
           b"a4 NOOP\r\na5 UID FETCH 1:* (FLAGS)\r\n")
    lines = r.until(b"a5")
    tagged = [ln for ln in lines if ln[:1] == b"a"]
    assert [ln.split(b" ")[:2] for ln in tagged] == [[t, b"OK"] for t in (b"a1", b"a2", b"a3", b"a4", b"a5")]
    assert any(b'"Pipelined"' in ln for ln in lines)  # a3's answer, through the proxy


def test_connection_limits(make_proxy):
    px = make_proxy(max_connections=2, max_connections_per_user=1)
    first = via(px)
    with pytest.raises(imaplib.IMAP4.error, match=r"\[LIMIT\]"):
        via(px)  # second session of the same account
    r = Raw(px.host, px.starttls_port)  # second connection overall: still allowed
    third = Raw(px.host, px.starttls_port)
    assert third.greeting.startswith(b"* BYE")
    r.close()
    first.logout()


def test_nesting_depth_is_refused(proxy):
    r = Raw(proxy.host, proxy.starttls_port)
    r.send(b"a1 LOGIN alice@acme.test alice-pw\r\n")
    r.until(b"a1")
    r.send(b"a2 SEARCH " + b"(" * 40 + b"ALL" + b")" * 40 + b"\r\n")
    assert r.until(b"a2")[-1].startswith(b"a2 BAD")


def test_id_is_answered_and_client_address_forwarded(proxy, imap_upstream):
    # The client connects from 127.0.0.2; Dovecot (trusting the gateway) must log that address.
    r = Raw(proxy.host, proxy.starttls_port, source="127.0.0.2")
    r.send(b'a0 ID ("name" "test-client" "x-originating-ip" "6.6.6.6")\r\n')
    assert r.until(b"a0")[-1].startswith(b"a0 OK")
    r.send(b"a1 LOGIN bob@acme.test bob-pw\r\n")
    assert r.until(b"a1")[-1].startswith(b"a1 OK")
    r.send(b"a2 LOGOUT\r\n")
    r.until(b"a2")
    # Dovecot's log process writes the login line a moment after the login is answered.
    login = "user=<bob@acme.test>, method=PLAIN, rip=127.0.0.2"

    def logged() -> str:
        text = imap_upstream.log_path.read_text()
        return text if login in text else ""

    log = wait_until(logged, what="Dovecot's login line")
    assert "6.6.6.6" not in log  # a client cannot claim an address
