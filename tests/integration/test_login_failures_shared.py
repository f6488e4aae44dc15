"""Failed logins shared by every process (gateway/loginfail.py) against a running gateway with
two SMTP acceptor processes (smtp.processes = 2): failures spread over both processes add up,
and a failure on IMAP slows the same user's next SMTP AUTH in whichever process takes it.
Real users are not slowed by each other (gateway/smtp/guard.py): a phone retrying an old
password behind the colleagues' address, sessions opened at once; spraying still is.
(Expiry, the table's bound and the database-away fallback: tests/unit/test_loginfail.py.)"""

from __future__ import annotations

import imaplib
import re
import smtplib
import ssl
import threading
import time

import pytest

from gateway.db import connect
from gateway.db.models import LoginFailure
from gateway.demo.sample_data import seed
from gateway.loginfail import user_key
from tests.harness import wait_until
from tests.harness.gateway import GatewayProcess

pytestmark = pytest.mark.integration

BASE, CAP = 0.1, 5.0
LEARNT = re.compile(r"\[acceptor1\].* learnt (\d+) failed logins")


@pytest.fixture
def gw(tmp_path, dovecot):
    gw = GatewayProcess(tmp_path / "gw", dovecot, {
        "smtp": {"processes": 2, "auth_fail_base_delay": BASE, "auth_fail_max_delay": CAP},
        "imap": {"auth_fail_base_delay": BASE, "auth_fail_max_delay": CAP},
    })
    gw.log_level = "DEBUG"  # the feed's "learnt N failed logins"
    connect(gw.db_url)
    seed()
    gw.start()
    gw.wait_for_log("smtp acceptor 1 ready")
    yield gw
    gw.stop()


def smtp_auth(gw: GatewayProcess, user: str, password: str, source: str = "127.0.0.1") -> tuple[bool, float]:
    """One AUTH on a new connection (the kernel picks the process): accepted?, seconds it took."""
    tls = ssl.create_default_context(cafile=str(gw.cert_path))
    with smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30, source_address=(source, 0)) as conn:
        conn.starttls(context=tls)
        conn.ehlo()
        started = time.monotonic()
        try:  # PLAIN only: smtplib's login() tries LOGIN after a refused PLAIN (the same password twice)
            conn.user, conn.password = user, password
            conn.auth("PLAIN", conn.auth_plain)
            ok = True
        except smtplib.SMTPAuthenticationError as exc:
            assert exc.smtp_code == 535
            ok = False
        return ok, time.monotonic() - started


def failures_by_process(gw: GatewayProcess, user: str) -> tuple[int, int]:
    lines = [line for line in gw.log_lines if f"auth user={user} " in line and "result=failed" in line]
    child = sum("[acceptor1]" in line for line in lines)
    return len(lines) - child, child


def test_failures_spread_over_both_acceptor_processes_add_up(gw):
    user = "alice@acme.test"
    n = 0
    while True:  # wrong passwords (each another: a password tried again counts once), a
        n += 1   # connection each, until both processes have refused some
        ok, _ = smtp_auth(gw, user, f"wrong-{n}")
        assert not ok
        node, child = failures_by_process(gw, user)
        if node and child and node + child >= 6:
            break
        assert node + child < 12, "the kernel sent every connection to one process"
    total = node + child
    assert LoginFailure.select().where(LoginFailure.key == user_key(user)).count() == total
    # The next attempt (the right password, in either process) waits for all of them: each
    # process alone would have counted at most max(node, child) failures.
    ok, took = smtp_auth(gw, user, "alice-pw")
    expected = min(BASE * 2 ** (total - 1), CAP)
    alone = BASE * 2 ** (max(node, child) - 1)
    assert ok and took >= expected * 0.95 and expected >= 2 * alone, (took, node, child)
    # The success cleared the user's failures for everyone.
    assert LoginFailure.select().where(LoginFailure.key == user_key(user)).count() == 0


def test_a_failed_imap_login_slows_the_next_smtp_auth_of_the_user(gw):
    user = "bob@acme.test"
    tls = ssl.create_default_context(cafile=str(gw.cert_path))
    for n in range(3):
        with imaplib.IMAP4_SSL("127.0.0.1", gw.imaps_port, ssl_context=tls, timeout=30) as imap:
            with pytest.raises(imaplib.IMAP4.error):
                imap.login(user, f"wrong-{n}")
    # (The proxy answers NO, then writes the failure.)
    wait_until(lambda: LoginFailure.select().where(LoginFailure.key == user_key(user)).count() == 3,
               what="three failures of bob in the shared record")
    # The node (IMAP's process) knows at once; the acceptor process through its feed.
    wait_until(lambda: sum(int(m.group(1)) for line in gw.log_lines if (m := LEARNT.search(line))) >= 6,
               what="the acceptor process learnt the IMAP failures")
    # From other addresses (no failures of their own), whichever process takes them: a user
    # without failures passes at once, bob waits for his three.
    ok, quick = smtp_auth(gw, "carol@acme.test", "carol-pw", source="127.0.0.3")
    assert ok and quick < BASE * 4
    ok, took = smtp_auth(gw, user, "bob-pw", source="127.0.0.2")
    assert ok and took >= BASE * 4 * 0.95, took
    assert LoginFailure.select().where(LoginFailure.key == user_key(user)).count() == 0


DELAY = re.compile(r"(?:auth|imap login) user=(\S+) ip=(\S+) (?:result=(\w+) )?delay=([\d.]+)")


def delays(gw: GatewayProcess, user: str, ip: str = "127.0.0.1") -> list[float]:
    """The delays the gateway logged for this user's logins from ``ip`` (SMTP and IMAP)."""
    return [float(m.group(4)) for line in gw.log_lines
            if (m := DELAY.search(line)) and m.group(1) == user and m.group(2) == ip]


def imap_login(gw: GatewayProcess, user: str, password: str) -> None:
    tls = ssl.create_default_context(cafile=str(gw.cert_path))
    with imaplib.IMAP4_SSL("127.0.0.1", gw.imaps_port, ssl_context=tls, timeout=30) as imap:
        imap.login(user, password)
        imap.logout()


def test_a_phone_retrying_an_old_password_slows_neither_itself_nor_its_colleagues(gw):
    # One phone behind the office NAT (127.0.0.1) retries its stored, outdated password.
    for _ in range(10):
        ok, _ = smtp_auth(gw, "dave@acme.test", "old-saved-pw")
        assert not ok
    node, child = failures_by_process(gw, "dave@acme.test")
    assert node + child == 10
    # Ten retries, one failure: each retry waited the base delay at most, in either process
    # (the marks are the deployment's: the approval key both processes read).
    assert len(delays(gw, "dave@acme.test")) == 10 and max(delays(gw, "dave@acme.test")) <= BASE
    # A colleague on the same address signs in at once, SMTP and IMAP alike.
    ok, _ = smtp_auth(gw, "carol@acme.test", "carol-pw")
    assert ok
    imap_login(gw, "carol@acme.test", "carol-pw")
    wait_until(lambda: len(delays(gw, "carol@acme.test")) == 2, what="both logins of carol logged")
    assert delays(gw, "carol@acme.test") == [0.0, 0.0]
    rows = list(LoginFailure.select().where(LoginFailure.key == user_key("dave@acme.test")))
    assert len(rows) == 10 and len({r.mark for r in rows}) == 1  # stored as one keyed digest


def test_spraying_many_users_from_one_address_is_still_slowed(gw):
    source, names = "127.0.0.7", 6  # (each name beyond the first doubles the wait: more only add seconds)
    for i in range(names):
        ok, _ = smtp_auth(gw, f"user{i}@acme.test", "Winter2026!", source=source)
        assert not ok
    wait_until(lambda: LoginFailure.select().where(LoginFailure.key == f"ip:{source}").count() == names,
               what="the failures of the address in the shared record")
    # Either process knows the address (its own failures, and the feed brought the others'
    # during the spray): the next login from it pays for the failing user names beyond the
    # first, the right password or not.
    expected = min(BASE * 2 ** (names - 2), CAP)
    ok, took = smtp_auth(gw, "carol@acme.test", "carol-pw", source=source)
    assert ok and took >= expected * 0.95, took
    assert wait_until(lambda: delays(gw, "carol@acme.test", source), what="carol's login logged") == [expected]


def test_sessions_opened_at_once_with_the_right_password_do_not_wait(gw):
    # Thunderbird, Outlook and phones open several sessions at once, each logging in.
    threads = [threading.Thread(target=imap_login, args=(gw, "alice@acme.test", "alice-pw")) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_until(lambda: len(delays(gw, "alice@acme.test")) == 6, what="six logins of alice logged")
    assert delays(gw, "alice@acme.test") == [0.0] * 6
