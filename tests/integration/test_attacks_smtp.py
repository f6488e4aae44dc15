"""An attacker's view of the submission ports, against a running gateway (Dovecot upstream, the sink
as "the Internet").  What tests/integration/test_submission.py already covers is not repeated here
(AUTH PLAIN after EHLO in clear, MAIL FROM of a colleague, relay tricks in RCPT, "\\n.\\n",
"\\r.\\r", STARTTLS injection, a 70 KB command line).

The gateway of this module logs at DEBUG, relays with the employee's own credentials (so the
credentials key is in use) and takes messages up to 1 MB; its log is searched for secrets last.
"""

from __future__ import annotations

import base64
import re
import smtplib
import ssl
import time
import urllib.request
from pathlib import Path

import pytest

from tests.harness.gateway import GatewayProcess, seeded
from tests.harness.lineclient import LineClient

pytestmark = pytest.mark.integration

MAX_SIZE = 1024 * 1024
BASE_DELAY, MAX_DELAY = 0.5, 2.0
PLAIN_ALICE = base64.b64encode(b"\0alice@acme.test\0alice-pw").decode()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, dovecot, sink):
    gw = seeded(tmp_path_factory.mktemp("attack-smtp"), dovecot, {
        "smtp": {"max_message_size": MAX_SIZE, "auth_fail_base_delay": BASE_DELAY,
                 "auth_fail_max_delay": MAX_DELAY},
        "relay": {"mode": "employee_credentials"},
    })
    gw.log_level = "DEBUG"
    gw.start()
    yield gw
    gw.stop()


def tls_ctx(gw: GatewayProcess) -> ssl.SSLContext:
    return gw.client_context()


class Raw(LineClient):
    """A line-level SMTP client: plain on 587 (``starttls()`` upgrades it) or implicit TLS on 465."""

    def __init__(self, gw: GatewayProcess, implicit: bool = False, source: str | None = None):
        self.gw = gw
        super().__init__("127.0.0.1", gw.smtps_port if implicit else gw.submission_port,
                         tls_ctx(gw) if implicit else None, source)
        self.greeting = self.reply()

    def cmd(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def starttls(self) -> None:
        assert self.cmd(b"STARTTLS").startswith(b"220")
        assert not self.buf
        self.sock = tls_ctx(self.gw).wrap_socket(self.sock, server_hostname="localhost")


def logged_in(gw: GatewayProcess, user: str = "alice@acme.test", password: str = "alice-pw") -> Raw:
    r = Raw(gw, implicit=True)
    r.cmd(b"EHLO client.example")
    blob = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
    assert r.cmd(b"AUTH PLAIN " + blob).startswith(b"235")
    return r


def send_data(r: Raw, mail_from: str, rcpts: list[str], data: bytes) -> bytes:
    """MAIL, RCPT, DATA and ``data`` (which must end the message itself); the reply to it."""
    assert r.cmd(f"MAIL FROM:<{mail_from}>".encode()).startswith(b"250")
    for rcpt in rcpts:
        assert r.cmd(f"RCPT TO:<{rcpt}>".encode()).startswith(b"250")
    assert r.cmd(b"DATA").startswith(b"354")
    r.send(data)
    return r.reply()


def vm_hwm_kb(gw: GatewayProcess) -> int:
    """The gateway process's peak resident memory (kB)."""
    status = Path(f"/proc/{gw.proc.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))


# -- TLS before AUTH ---------------------------------------------------------------------------

@pytest.mark.parametrize("hello, auth", [
    (b"EHLO client.example", b"AUTH LOGIN"),  # a 334 here would make the client send its password in clear
    (b"EHLO client.example", b"AUTH LOGIN " + base64.b64encode(b"alice@acme.test")),
    (b"EHLO client.example", b"AUTH CRAM-MD5"),
    (b"HELO client.example", b"AUTH PLAIN " + PLAIN_ALICE.encode()),
    (None, b"AUTH PLAIN " + PLAIN_ALICE.encode()),
])
def test_no_auth_in_clear_text_whatever_the_greeting_or_mechanism(gw, hello, auth):
    r = Raw(gw)
    if hello is not None:
        greeting = r.cmd(hello)
        assert greeting.startswith(b"250") and b"AUTH" not in greeting
    reply = r.cmd(auth)
    assert reply[:1] == b"5", reply  # refused outright: no 334 challenge, no 235
    # And the session is not authenticated: sending is still refused.
    r.cmd(b"EHLO client.example")
    assert r.cmd(b"MAIL FROM:<alice@acme.test>").startswith(b"530")
    r.close()


def test_auth_is_offered_and_accepted_once_tls_is_on(gw):
    r = Raw(gw)
    r.cmd(b"EHLO client.example")
    r.starttls()
    ehlo = r.cmd(b"EHLO client.example")
    assert re.search(rb"AUTH\b.*\bPLAIN\b", ehlo) and b"STARTTLS" not in ehlo
    assert r.cmd(b"AUTH PLAIN " + PLAIN_ALICE.encode()).startswith(b"235")
    r.close()


# -- open relay --------------------------------------------------------------------------------

def test_no_relay_without_auth_on_the_implicit_tls_port_either(gw, sink):
    sink.clear()
    r = Raw(gw, implicit=True)
    r.cmd(b"EHLO client.example")
    assert r.cmd(b"MAIL FROM:<alice@acme.test>").startswith(b"530")
    assert r.cmd(b"RCPT TO:<victim@elsewhere.example>")[:3] in (b"503", b"530")
    assert r.cmd(b"DATA")[:3] in (b"503", b"530")
    r.send(b"Subject: relayed\r\n\r\nspam\r\n.\r\n")
    r.cmd(b"RSET")
    r.close()
    # Nothing queued: the marker sent afterwards is the first and only message.
    r = logged_in(gw)
    send_data(r, "alice@acme.test", ["marker@unknown-buyer.com"], b"Subject: marker\r\n\r\nm\r\n.\r\n")
    r.close()
    [got] = sink.wait_for(1, timeout=20)
    assert got.rcpt_tos == ["marker@unknown-buyer.com"]


def test_authenticated_null_sender_and_foreign_domain_sender_are_refused(gw):
    r = logged_in(gw)
    for sender in (b"<>", b"<alice@elsewhere.example>", b"<ALICE@acme.test.evil.example>"):
        reply = r.cmd(b"MAIL FROM:" + sender)
        assert reply.startswith(b"553"), (sender, reply)
    assert r.cmd(b"MAIL FROM:<ALICE@acme.test>").startswith(b"250")  # the own address, any case
    r.close()


# -- sender spoofing in the header -------------------------------------------------------------

@pytest.mark.parametrize("header", [
    b"From: Bob Li <bob@acme.test>\r\n",
    b"From: ceo@elsewhere.example\r\n",
    b"From: alice@acme.test, bob@acme.test\r\n",
    b"From: alice@acme.test\r\nFrom: bob@acme.test\r\n",  # a second From: some clients show that one
    b"From: alice@acme.test\r\nSender: bob@acme.test\r\n",
    b"From: =?utf-8?q?Alice?= <bob@acme.test>\r\n",
    b"From: alice@acme.test\r\nFROM: <bob@acme.test>\r\n",
    b"From:\r\n\t\"Alice\" <bob@acme.test>\r\n",  # folded
    b"From: \"bob@acme.test\" <ALICE@ACME.TEST>\r\n",  # a phone shows only the name
])
def test_from_header_of_someone_else_is_refused(gw, sink, header):
    sink.clear()
    r = logged_in(gw)
    reply = send_data(r, "alice@acme.test", ["someone@unknown-buyer.com"],
                      header + b"To: someone@unknown-buyer.com\r\nSubject: spoof\r\n\r\nhi\r\n.\r\n")
    assert reply.startswith(b"550 5.7.1"), reply
    assert b"bob@acme.test" in reply or b"ceo@elsewhere.example" in reply
    # The session goes on, and its own mail is accepted.
    reply = send_data(r, "alice@acme.test", ["marker@unknown-buyer.com"],
                      b"From: alice@acme.test\r\nSubject: marker\r\n\r\nm\r\n.\r\n")
    assert reply.startswith(b"250"), reply
    r.close()
    [got] = sink.wait_for(1, timeout=20)
    assert got.rcpt_tos == ["marker@unknown-buyer.com"]


@pytest.mark.parametrize("header", [
    b"From: =?utf-8?b?546L5Li9?= <alice.wang@acme.test>\r\n",  # the directory's alias
    b"From: \"Alice.Wang@acme.test\" <alice.wang@acme.test>\r\n",  # an own address as the name
    b"From: \"Sales @ ACME\" <alice.wang@acme.test>\r\n",  # an "@" that names no address
    b"From: alice@acme.test\r\nSender: alice.wang@acme.test\r\n",
    b"Subject: no From at all\r\n",
])
def test_own_address_or_alias_in_the_header_is_accepted(gw, sink, header):
    sink.clear()
    r = logged_in(gw)
    reply = send_data(r, "alice.wang@acme.test", ["someone@unknown-buyer.com"],
                      header + b"Subject: own\r\n\r\nhi\r\n.\r\n")
    assert reply.startswith(b"250"), reply
    r.close()
    [got] = sink.wait_for(1, timeout=20)  # relayed (and not left to arrive during the next test)
    assert header.split(b"\r\n")[0] in got.data


def refused_count(gw: GatewayProcess) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10).read().decode()
    found = re.search(r'mailgate_smtp_messages_total\{verdict="refused"\} ([0-9.e+]+)', body)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("field, shown", [
    (b'From: "Bob Li bob@acme.test" <alice@acme.test>', b'"Bob Li bob@acme.test"'),
    (b"From: =?utf-8?q?Bob_=28bob=40acme=2Etest=29?= <alice@acme.test>", b'"Bob (bob@acme.test)"'),
    ('From: "bob\uff20acme\uff0etest" <alice@acme.test>'.encode(), b'"bob\\uff20acme\\uff0etest"'),
    (b"From: =?utf-8?b?Ym9i77ygYWNtZS50ZXN0?= <alice@acme.test>", b'"bob\\uff20acme.test"'),
    (b'From: alice@acme.test\r\nSender: "BOB@ACME.TEST" <alice.wang@acme.test>', b'"BOB@ACME.TEST"'),
])
def test_a_colleagues_address_as_display_name_is_refused(gw, sink, field, shown):
    """Many mail programs (phones above all) show only the display name: one that holds an
    address not the user's is refused like that address in the field, and counted; the log
    names the address and reason, never the rest of the message."""
    sink.clear()
    before = refused_count(gw)
    mark = len(gw.log_lines)
    r = logged_in(gw)
    reply = send_data(r, "alice@acme.test", ["someone@unknown-buyer.com"],
                      field + b"\r\nTo: someone@unknown-buyer.com\r\nSubject: Secret-7731\r\n\r\nhi\r\n.\r\n")
    assert reply.startswith(b"550 5.7.1 From/Sender display name " + shown), reply
    assert b"<bob@acme.test>, which is not yours" in reply, reply
    line = gw.wait_for_log("reason=header-display-name-not-own", after=mark)
    assert "user=alice@acme.test" in line and "address=<bob@acme.test>" in line
    assert "Secret-7731" not in "\n".join(gw.log_lines[mark:])
    assert refused_count(gw) == before + 1
    # The session goes on, and a plain name is accepted.
    reply = send_data(r, "alice@acme.test", ["marker@unknown-buyer.com"],
                      b'From: "Alice Wang" <alice@acme.test>\r\nSubject: marker\r\n\r\nm\r\n.\r\n')
    assert reply.startswith(b"250"), reply
    r.close()
    [got] = sink.wait_for(1, timeout=20)
    assert got.rcpt_tos == ["marker@unknown-buyer.com"]


# -- SMTP smuggling: the end-of-data variants of the 2023 research not covered elsewhere -------

@pytest.mark.parametrize("fake_end", [b"\r\n.\n", b"\n.\r\n", b"\n..\n"])
def test_fake_end_of_data_with_bare_lf_stays_inside_one_message(gw, sink, fake_end):
    sink.clear()
    r = logged_in(gw)
    smuggled = b"MAIL FROM:<alice@acme.test>\r\nRCPT TO:<victim@elsewhere.example>\r\nDATA\r\nSubject: smuggled\r\n\r\n"
    reply = send_data(r, "alice@acme.test", ["someone@unknown-buyer.com"],
                      b"From: alice@acme.test\r\nSubject: first\r\n\r\nbody" + fake_end + smuggled
                      + b"evil\r\n.\r\n")
    assert reply.startswith(b"250"), reply
    assert r.cmd(b"NOOP").startswith(b"250")  # nothing of the smuggled commands was read as commands
    send_data(r, "alice@acme.test", ["marker@unknown-buyer.com"], b"Subject: marker\r\n\r\nm\r\n.\r\n")
    r.close()
    arrived = sorted(sink.wait_for(2, timeout=20), key=lambda m: m.rcpt_tos)  # two relay workers: any order
    assert [m.rcpt_tos for m in arrived] == [["marker@unknown-buyer.com"], ["someone@unknown-buyer.com"]]
    first = arrived[1]
    assert b"RCPT TO:<victim@elsewhere.example>\r\n" in first.data
    # What the relay sent upstream has CRLF line ends only: no receiver can see an end there.
    assert b"\n" not in first.data.replace(b"\r\n", b"") and b"\r" not in first.data.replace(b"\r\n", b"")
    assert len(sink.messages()) == 2


@pytest.mark.parametrize("fake_end", [b"\r.\r\n", b"\r\n.\r", b"\r\n.\r\r\n", b"\r.\n"])
def test_fake_end_of_data_with_bare_cr_is_refused(gw, sink, fake_end):
    sink.clear()
    r = logged_in(gw)
    reply = send_data(r, "alice@acme.test", ["someone@unknown-buyer.com"],
                      b"Subject: first\r\n\r\nbody" + fake_end
                      + b"MAIL FROM:<alice@acme.test>\r\nRCPT TO:<victim@elsewhere.example>\r\nDATA\r\n"
                      + b"Subject: smuggled\r\n\r\nevil\r\n.\r\n")
    assert reply.startswith(b"550 5.6.0"), reply
    assert r.cmd(b"NOOP").startswith(b"250")
    send_data(r, "alice@acme.test", ["marker@unknown-buyer.com"], b"Subject: marker\r\n\r\nm\r\n.\r\n")
    r.close()
    [got] = sink.wait_for(1, timeout=20)
    assert got.rcpt_tos == ["marker@unknown-buyer.com"]


# -- bounded buffers ---------------------------------------------------------------------------

CHUNK = b"x" * (1 << 20)


def test_a_10_mb_command_line_is_refused_and_memory_stays_bounded(gw):
    r = logged_in(gw)
    before = vm_hwm_kb(gw)
    r.send(b"NOOP ")
    for _ in range(10):
        r.send(CHUNK)
    assert r.cmd(b"").startswith(b"500")
    assert r.cmd(b"NOOP").startswith(b"250")
    r.close()
    assert vm_hwm_kb(gw) - before < 5 * 1024, "the gateway buffered the line"


def test_a_10_mb_line_in_data_is_refused_and_memory_stays_bounded(gw):
    r = logged_in(gw)
    before = vm_hwm_kb(gw)
    assert r.cmd(b"MAIL FROM:<alice@acme.test>").startswith(b"250")
    assert r.cmd(b"RCPT TO:<someone@unknown-buyer.com>").startswith(b"250")
    assert r.cmd(b"DATA").startswith(b"354")
    r.send(b"Subject: long line\r\n\r\n")
    for _ in range(10):
        r.send(CHUNK)
    reply = r.cmd(b"\r\n.")
    assert reply.startswith(b"552"), reply  # past the 1 MB limit: 552 (a shorter one: 500 Line too long)
    assert r.cmd(b"NOOP").startswith(b"250")
    r.close()
    assert vm_hwm_kb(gw) - before < 2 * MAX_SIZE // 1024 + 5 * 1024, "the gateway kept what was over the limit"


def test_an_endless_header_is_refused_and_memory_stays_bounded(gw):
    r = logged_in(gw)
    before = vm_hwm_kb(gw)
    assert r.cmd(b"MAIL FROM:<alice@acme.test>").startswith(b"250")
    assert r.cmd(b"RCPT TO:<someone@unknown-buyer.com>").startswith(b"250")
    assert r.cmd(b"DATA").startswith(b"354")
    r.send(b"Subject: endless\r\nX-Fold: a\r\n")
    fold = b" folded continuation line of the header that never ends\r\n" * 16384  # ~1 MB
    for _ in range(10):
        r.send(fold)
    reply = r.cmd(b".")
    assert reply.startswith(b"552"), reply
    assert r.cmd(b"NOOP").startswith(b"250")
    r.close()
    assert vm_hwm_kb(gw) - before < 2 * MAX_SIZE // 1024 + 5 * 1024


def test_a_long_line_under_the_size_limit_is_500_line_too_long(gw):
    r = logged_in(gw)
    reply = send_data(r, "alice@acme.test", ["someone@unknown-buyer.com"],
                      b"Subject: long\r\n\r\n" + b"y" * 200_000 + b"\r\n.\r\n")
    assert reply.startswith(b"500"), reply
    assert r.cmd(b"NOOP").startswith(b"250")
    r.close()


# -- rate-limited logins ----------------------------------------------------------------------

def timed_login(gw: GatewayProcess, user: str, password: str, source: str) -> tuple[float, bool]:
    conn = smtplib.SMTP_SSL("127.0.0.1", gw.smtps_port, context=tls_ctx(gw), timeout=30,
                            source_address=(source, 0))
    with conn:
        conn.ehlo("client.example")
        start = time.monotonic()
        try:
            conn.login(user, password)
            ok = True
        except smtplib.SMTPAuthenticationError:
            ok = False
        return time.monotonic() - start, ok


def test_failed_logins_slow_down_the_next_attempt_from_that_address(gw):
    # Dovecot here answers a wrong password at once (auth_failure_delay = 0): any wait is the
    # gateway's.  Guessing: every new password counts for the account (smtplib tries PLAIN,
    # then LOGIN with the same password: that counts once).
    for i in range(3):  # each a second's wait at most (0, 0.5, 1.0)
        _, ok = timed_login(gw, "mallory@acme.test", f"Gu3ss-wr0ng-{i}", "127.0.0.21")
        assert not ok
    took, ok = timed_login(gw, "mallory@acme.test", "Gu3ss-wr0ng-3", "127.0.0.21")
    assert not ok and took >= MAX_DELAY - 0.05, took
    # One account failing does not hold back the others behind that address (an office NAT).
    took, ok = timed_login(gw, "bob@acme.test", "bob-pw", "127.0.0.21")
    assert ok and took < BASE_DELAY * 3, took
    # Spraying from it does: three more names failing there, then another account's right
    # password from the spraying address waits too.
    for name in ("eve@acme.test", "trudy@acme.test", "oscar@acme.test"):
        _, ok = timed_login(gw, name, "Spr4y-pw", "127.0.0.21")
        assert not ok
    took, ok = timed_login(gw, "bob@acme.test", "bob-pw", "127.0.0.21")
    assert ok and took >= MAX_DELAY - 0.05, took
    # Another client is not held back.
    took, ok = timed_login(gw, "carol@acme.test", "carol-pw", "127.0.0.22")
    assert ok and took < BASE_DELAY * 3, took


# -- secrets (last: it reads what the tests above made the gateway log) -----------------------

def test_no_secret_in_the_debug_log(gw, dovecot):
    # One more login by AUTH LOGIN (base64 of the bare password on the wire).
    with smtplib.SMTP_SSL("127.0.0.1", gw.smtps_port, context=tls_ctx(gw), timeout=30) as conn:
        conn.ehlo("client.example")
        conn.docmd("AUTH", "LOGIN " + base64.b64encode(b"alice@acme.test").decode())
        assert conn.docmd(base64.b64encode(b"alice-pw").decode())[0] == 235
    log = gw.log_text()
    assert "auth user=alice@acme.test" in log and "DEBUG" in log  # the log is the one meant
    secrets = ["alice-pw", "bob-pw", "carol-pw", "relay-pw", "Gu3ss-wr0ng-pw",
               PLAIN_ALICE, PLAIN_ALICE[:16], base64.b64encode(b"alice-pw").decode()]
    keys = [p for p in (gw.base_dir / "certs").rglob("*") if p.is_file() and not p.name.endswith((".crt", ".pub"))]
    assert any(p.name == "queue.key" for p in keys)
    for path in keys:  # the credentials key, the archive's, DKIM's, TLS's: raw, hex, base64 or PEM lines
        raw = path.read_bytes()
        secrets += [raw.hex()[:32], base64.b64encode(raw).decode()[:32]]
        secrets += [ln for ln in raw.decode("latin-1").splitlines() if len(ln) > 40][:2]
    found = [s for s in secrets if s in log]
    assert not found, f"secrets in the log: {found}"
