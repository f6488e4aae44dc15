"""An attacker's view of the IMAP ports, against a running gateway (its IMAP proxy in front of the
real Dovecot).  What tests/integration/imap/test_protocol.py covers on the proxy alone is not
repeated (LOGIN in clear with imaplib, a 20 KB command line, APPEND literals over the limit).

This module's gateway allows no login in clear text from any network (``plaintext_networks =
[]``: the default lets loopback in), logs at DEBUG, and its log is searched for secrets last.
"""

from __future__ import annotations

import base64
import re
import socket
import ssl
import time
from pathlib import Path

import pytest

from tests.harness.gateway import GatewayProcess, seeded
from tests.harness.lineclient import LineClient

pytestmark = pytest.mark.integration

BASE_DELAY, MAX_DELAY = 0.5, 2.0
PLAIN_ALICE = base64.b64encode(b"\0alice@acme.test\0alice-pw")


@pytest.fixture(scope="module")
def gw(tmp_path_factory, dovecot, sink):
    gw = seeded(tmp_path_factory.mktemp("attack-imap"), dovecot, {
        "imap": {"plaintext_networks": [], "auth_fail_base_delay": BASE_DELAY, "auth_fail_max_delay": MAX_DELAY},
    })
    gw.log_level = "DEBUG"
    gw.start()
    yield gw
    gw.stop()


def tls_ctx(gw: GatewayProcess) -> ssl.SSLContext:
    return gw.client_context()


class Raw(LineClient):
    """A line-level IMAP client: plain on the STARTTLS port or implicit TLS."""

    def __init__(self, gw: GatewayProcess, implicit: bool = False, source: str | None = None):
        self.gw = gw
        super().__init__("127.0.0.1", gw.imaps_port if implicit else gw.imap_port,
                         tls_ctx(gw) if implicit else None, source)
        self.greeting = self.line()

    def cmd(self, tag: bytes, rest: bytes) -> list[bytes]:
        self.send(tag + b" " + rest + b"\r\n")
        return self.until(tag)


def vm_hwm_kb(gw: GatewayProcess) -> int:
    status = Path(f"/proc/{gw.proc.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))


def not_logged_in(r: Raw, tag: bytes = b"z9") -> None:
    assert r.cmd(tag, b"SELECT INBOX")[-1] == tag + b" BAD Command not allowed before login"


# -- TLS before LOGIN --------------------------------------------------------------------------

@pytest.mark.parametrize("command", [
    b"LOGIN alice@acme.test alice-pw",
    b"AUTHENTICATE PLAIN " + PLAIN_ALICE,  # SASL-IR
    b"AUTHENTICATE PLAIN",  # a "+" here would ask for the credentials in clear
    b"AUTHENTICATE LOGIN",
    b"AUTHENTICATE LOGIN " + base64.b64encode(b"alice@acme.test"),
])
def test_no_login_in_clear_text(gw, command):
    r = Raw(gw)
    caps = r.cmd(b"a0", b"CAPABILITY")[0]
    assert b"LOGINDISABLED" in caps and b"STARTTLS" in caps and b"AUTH=" not in caps
    answer = r.cmd(b"a1", command)
    assert answer == [b"a1 NO [PRIVACYREQUIRED] Use STARTTLS first"], answer
    not_logged_in(r)
    r.close()


def test_login_after_starttls_and_on_the_tls_port(gw):
    r = Raw(gw)
    assert r.cmd(b"a1", b"STARTTLS")[-1].startswith(b"a1 OK")
    r.sock = tls_ctx(gw).wrap_socket(r.sock, server_hostname="localhost")
    caps = r.cmd(b"a2", b"CAPABILITY")[0]
    assert b"LOGINDISABLED" not in caps and b"STARTTLS" not in caps and b"AUTH=PLAIN" in caps
    assert r.cmd(b"a3", b"AUTHENTICATE PLAIN " + PLAIN_ALICE)[-1].startswith(b"a3 OK")
    r.close()
    r = Raw(gw, implicit=True)
    assert r.cmd(b"b1", b"LOGIN bob@acme.test bob-pw")[-1].startswith(b"b1 OK")
    r.close()


# -- STARTTLS command injection (CVE-2011-0411 style) ------------------------------------------

@pytest.mark.parametrize("injected", [
    b"a2 LOGIN alice@acme.test alice-pw\r\n",
    b"a2 CAPABILITY\r\na3 NOOP\r\n",
    b"a2 LOGIN {15}\r\n",  # a literal that would have the proxy ask for more
])
def test_commands_pipelined_after_starttls_are_discarded(gw, injected):
    r = Raw(gw)
    r.send(b"a1 STARTTLS\r\n" + injected)  # one write: one TCP segment on loopback
    assert r.line() == b"a1 OK Begin TLS negotiation now"
    assert r.buf == b""  # and no answer to the injected commands before the handshake
    r.sock = tls_ctx(gw).wrap_socket(r.sock, server_hostname="localhost")
    # The first answer inside TLS is to the first command sent inside TLS.
    assert r.cmd(b"b1", b"NOOP") == [b"b1 OK NOOP completed"]
    not_logged_in(r)
    assert r.cmd(b"b2", b"LOGIN alice@acme.test alice-pw")[-1].startswith(b"b2 OK")
    r.close()


def test_plaintext_injected_into_the_tls_port_before_the_handshake_is_no_command(gw):
    sock = socket.create_connection(("127.0.0.1", gw.imaps_port), timeout=30)
    sock.sendall(b"a1 LOGIN alice@acme.test alice-pw\r\n")
    sock.settimeout(10)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    sock.close()
    assert b"a1 OK" not in got and b"a1 NO" not in got  # a TLS alert (or nothing), never an IMAP answer


# -- bounded buffers ---------------------------------------------------------------------------

CHUNK = b"x" * (1 << 20)


def send_10_mb(r: Raw) -> None:
    for _ in range(10):
        r.send(CHUNK)


def test_a_10_mb_line_before_login_is_refused_and_memory_stays_bounded(gw):
    r = Raw(gw, implicit=True)
    before = vm_hwm_kb(gw)
    r.send(b"a1 LOGIN ")
    try:
        send_10_mb(r)
        r.send(b"\r\n")
        lines = r.until(b"a1")
    except (EOFError, ConnectionResetError, BrokenPipeError):  # closed on us: fine too, say how
        lines = [r.buf]
    assert any(b"BAD" in ln or b"BYE" in ln for ln in lines), lines
    assert vm_hwm_kb(gw) - before < 5 * 1024, "the proxy buffered the line"


def test_a_10_mb_line_after_login_is_bad_and_the_session_goes_on(gw):
    r = Raw(gw, implicit=True)
    assert r.cmd(b"a1", b"LOGIN alice@acme.test alice-pw")[-1].startswith(b"a1 OK")
    before = vm_hwm_kb(gw)
    r.send(b"a2 SEARCH TEXT ")
    send_10_mb(r)
    r.send(b"\r\n")
    assert r.until(b"a2")[-1] == b"a2 BAD Command line too long"
    assert r.cmd(b"a3", b"NOOP")[-1].startswith(b"a3 OK")
    r.close()
    assert vm_hwm_kb(gw) - before < 5 * 1024


def test_a_huge_literal_before_login_is_refused_before_any_data(gw):
    r = Raw(gw, implicit=True)
    r.send(b"a1 LOGIN {104857600}\r\n")  # 100 MB, synchronising: the proxy must not say "+"
    assert r.line() == b"a1 BAD Command too long"
    assert r.cmd(b"a2", b"NOOP")[-1].startswith(b"a2 OK")
    r.close()


def test_a_huge_non_synchronising_literal_before_login_closes_the_session(gw):
    r = Raw(gw, implicit=True)
    before = vm_hwm_kb(gw)
    r.send(b"a1 LOGIN {10485760+}\r\n")  # the client may send the data without waiting: no way to go on
    assert r.line() == b"* BYE Command too long"
    with pytest.raises((EOFError, OSError)):  # closed: the data is not read, let alone kept
        send_10_mb(r)
        r.line()
    assert vm_hwm_kb(gw) - before < 5 * 1024


def test_an_append_literal_past_the_limit_is_toobig_with_the_default_limit(gw):
    r = Raw(gw, implicit=True)
    assert r.cmd(b"a1", b"LOGIN alice@acme.test alice-pw")[-1].startswith(b"a1 OK")
    r.send(b"a2 APPEND INBOX {2147483648}\r\n")  # 2 GB
    assert r.until(b"a2")[-1].startswith(b"a2 NO [TOOBIG]")
    assert r.cmd(b"a4", b"NOOP")[-1].startswith(b"a4 OK")
    r.close()


@pytest.mark.parametrize("digits", [b"99999999999999999999", b"0" * 25 + b"5", b"9" * 5000])
def test_a_literal_announced_with_20_or_more_digits_is_toobig_and_never_forwarded(gw, digits):
    """Dovecot would answer such a line with BYE: the proxy refuses it like any literal over
    the limit, before anything goes upstream, and the session goes on."""
    r = Raw(gw, implicit=True)
    assert r.cmd(b"a1", b"LOGIN alice@acme.test alice-pw")[-1].startswith(b"a1 OK")
    r.send(b"a2 APPEND INBOX {" + digits + b"}\r\n")
    assert r.line() == b"a2 NO [TOOBIG] Literal too large"  # no "+": the client sends no data
    assert r.cmd(b"a3", b"NOOP")[-1].startswith(b"a3 OK")
    r.send(b"a4 LOGOUT\r\n")
    assert r.until(b"a4")[-1].startswith(b"a4 OK")
    r.close()


@pytest.mark.parametrize("announced", [b"{%d}", b"{%d+}", b"{99999999999999999999}"])
def test_a_literal_announced_in_idle_does_not_carry_commands_past_the_proxy(gw, announced):
    """IDLE ends with one line; Dovecot reads a line announcing a literal there as a line (BAD
    Expected DONE) and the bytes after it as commands: the proxy reads them as commands too."""
    r = Raw(gw, implicit=True)
    assert r.cmd(b"a1", b"LOGIN alice@acme.test alice-pw")[-1].startswith(b"a1 OK")
    assert r.cmd(b"a2", b"SELECT INBOX")[-1].startswith(b"a2 OK")
    r.send(b"a3 IDLE\r\n")
    assert r.line().startswith(b"+ ")
    smuggled = b"a9 COMPRESS DEFLATE\r\n"  # the proxy refuses it; unseen, it would reach Dovecot
    r.send(b"x " + (announced % len(smuggled) if b"%" in announced else announced) + b"\r\n" + smuggled)
    tagged: dict[bytes, bytes] = {}
    while len(tagged) < 2:  # the proxy's answer to a9 may come first
        line = r.line()
        if line.split(b" ", 1)[0] in (b"a3", b"a9"):
            tagged[line.split(b" ", 1)[0]] = line
    assert tagged[b"a3"].startswith(b"a3 BAD")
    assert tagged[b"a9"] == b"a9 NO [CANNOT] Compression is not available through this proxy"
    assert r.cmd(b"a10", b"NOOP")[-1].startswith(b"a10 OK")
    r.close()


def test_a_literal_announced_with_20_digits_before_login_is_refused(gw):
    r = Raw(gw, implicit=True)
    r.send(b"a1 LOGIN {99999999999999999999}\r\n")
    assert r.line() == b"a1 BAD Command too long"  # as any over-long command before login
    assert r.cmd(b"a2", b"NOOP")[-1].startswith(b"a2 OK")
    r.send(b"a3 LOGIN {99999999999999999999+}\r\n")
    assert r.line() == b"* BYE Command too long"
    with pytest.raises(EOFError):
        r.line()
    r.close()


# -- rate-limited logins ----------------------------------------------------------------------

def timed_login(gw: GatewayProcess, user: bytes, password: bytes, source: str) -> tuple[float, bytes]:
    r = Raw(gw, implicit=True, source=source)
    start = time.monotonic()
    answer = r.cmd(b"a1", b"LOGIN " + user + b" " + password)[-1]
    took = time.monotonic() - start
    r.close()
    return took, answer


def test_failed_logins_slow_down_the_next_attempt_from_that_address(gw):
    # Dovecot here answers a wrong password at once (auth_failure_delay = 0, no auth penalty):
    # any wait is the gateway's.  Guessing: every new password counts for the account.
    for i in range(3):
        _, answer = timed_login(gw, b"mallory@acme.test", b"Gu3ss-wr0ng-%d" % i, "127.0.0.31")
        assert answer.startswith(b"a1 NO [AUTHENTICATIONFAILED]"), answer
    took, answer = timed_login(gw, b"mallory@acme.test", b"Gu3ss-wr0ng-3", "127.0.0.31")
    assert answer.startswith(b"a1 NO") and took >= MAX_DELAY - 0.05, took
    # One account failing does not hold back the others behind that address (an office NAT) ...
    took, answer = timed_login(gw, b"bob@acme.test", b"bob-pw", "127.0.0.31")
    assert answer.startswith(b"a1 OK") and took < BASE_DELAY * 3, took
    # ... spraying from it does: three more names failing there, then another account's right
    # password from the address waits too ...
    for name in (b"eve@acme.test", b"trudy@acme.test", b"oscar@acme.test"):
        _, answer = timed_login(gw, name, b"Spr4y-pw", "127.0.0.31")
        assert answer.startswith(b"a1 NO"), answer
    took, answer = timed_login(gw, b"bob@acme.test", b"bob-pw", "127.0.0.31")
    assert answer.startswith(b"a1 OK") and took >= MAX_DELAY - 0.05, took
    # ... and so does the guessed account from anywhere.
    took, answer = timed_login(gw, b"mallory@acme.test", b"Gu3ss-wr0ng-4", "127.0.0.32")
    assert answer.startswith(b"a1 NO") and took >= MAX_DELAY - 0.05, took
    # Another client is not held back.
    took, answer = timed_login(gw, b"carol@acme.test", b"carol-pw", "127.0.0.33")
    assert answer.startswith(b"a1 OK") and took < BASE_DELAY * 3, took


def test_parallel_guesses_do_not_each_get_a_free_attempt(gw):
    conns = [Raw(gw, implicit=True, source="127.0.0.34") for _ in range(4)]
    start = time.monotonic()
    for i, r in enumerate(conns):
        r.send(b"p%d LOGIN trudy@acme.test wrong-%d\r\n" % (i, i))
    for i, r in enumerate(conns):
        assert r.until(b"p%d" % i)[-1].startswith(b"p%d NO" % i)
        r.close()
    # In flight counts as failed: the 2nd, 3rd and 4th wait 0.5, 1 and 2 s.
    assert time.monotonic() - start >= MAX_DELAY - 0.05


# -- secrets (last: it reads what the tests above made the gateway log) -----------------------

def test_no_secret_in_the_debug_log(gw):
    r = Raw(gw, implicit=True)
    r.send(b"c1 AUTHENTICATE LOGIN\r\n")
    assert r.line().startswith(b"+ ")
    r.send(base64.b64encode(b"alice@acme.test") + b"\r\n")
    assert r.line().startswith(b"+ ")
    r.send(base64.b64encode(b"alice-pw") + b"\r\n")
    assert r.until(b"c1")[-1].startswith(b"c1 OK")
    r.close()
    log = gw.log_text()
    assert "imap login failed user=mallory@acme.test" in log and "DEBUG" in log  # the log is the one meant
    secrets = ["alice-pw", "bob-pw", "carol-pw", "relay-pw", "Gu3ss-wr0ng-pw", "wrong-1",
               PLAIN_ALICE.decode(), PLAIN_ALICE.decode()[:16], base64.b64encode(b"alice-pw").decode()]
    found = [s for s in secrets if s in log]
    assert not found, f"secrets in the log: {found}"
