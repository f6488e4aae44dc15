"""The README's demo command: `mailgate demo` comes up and does what it prints."""

from __future__ import annotations

import imaplib
import random
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gateway.demo.run import HOLD_RULE_FILE, HOLD_TRIGGER, PANEL_OFFSET
from tests.harness import shared_tempdir, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
OFFSETS = (587, 465, 143, 993, 325, 8080)


def free_base() -> int:
    for _ in range(50):
        base = random.randrange(20000, 57000, 1000)  # + 8080 (the panel) < 65536
        socks = []
        try:
            for off in OFFSETS:
                s = socket.socket()
                s.bind(("127.0.0.1", base + off))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


# Ports browsers refuse to open (ERR_UNSAFE_PORT): Chromium's net/base/port_util.cc list, which
# Firefox's (network.security.ports.banned) matches but for a few.  The panel the demo prints
# must not be one — 10080 (base + 80) was, and no browser opened it.
BROWSER_RESTRICTED_PORTS = frozenset({
    1, 7, 9, 11, 13, 15, 17, 19, 20, 21, 22, 23, 25, 37, 42, 43, 53, 69, 77, 79, 87, 95, 101, 102, 103,
    104, 109, 110, 111, 113, 115, 117, 119, 123, 135, 137, 139, 143, 161, 179, 389, 427, 465, 512, 513,
    514, 515, 526, 530, 531, 532, 540, 548, 554, 556, 563, 587, 601, 636, 989, 990, 993, 995, 1719, 1720,
    1723, 2049, 3659, 4045, 4190, 5060, 5061, 6000, 6566, 6665, 6666, 6667, 6668, 6669, 6679, 6697, 10080})


def test_the_demos_default_panel_port_is_one_browsers_open():
    """``./scripts/demo.sh`` uses the default port base (10000): its panel address must open in
    a browser (tests below use other bases, free on the machine, and a real Chromium)."""
    import inspect

    from gateway import cli
    from gateway.demo.run import run_demo

    default = inspect.signature(run_demo).parameters["port_base"].default
    assert "default=10000" in inspect.getsource(cli) and default == 10000
    assert default + PANEL_OFFSET not in BROWSER_RESTRICTED_PORTS


def assert_a_browser_opens(url: str) -> None:
    """The panel's address in a real headless Chromium: the sign-in page, not ERR_UNSAFE_PORT."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                      args=["--no-sandbox", "--disable-background-networking"])
        try:
            page = chromium.new_page()
            response = page.goto(url + "/")
            assert response is not None and response.ok, url
            assert page.locator("input[type=password]").count() == 1, page.content()[:500]
        finally:
            chromium.close()


@pytest.fixture
def demo_dir():
    with shared_tempdir("mailgate-demo-") as path:  # Dovecot's mail user must traverse it
        yield path


STOP_BOUND = 20 + 15 + 10 + 10  # seconds (see the stop below)


def test_demo_starts_prints_settings_and_enforces_policy(demo_dir):
    tmp_path = demo_dir
    base = free_base()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "demo", "--dir", str(tmp_path / "demo"), "--port-base", str(base)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    banner: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            banner.append(line)
            if line.startswith("Metrics:"):
                ready.set()
        ready.set()

    log: list[str] = []
    log_changed = threading.Condition()

    def read_log() -> None:
        for line in proc.stderr:
            with log_changed:
                log.append(line)
                log_changed.notify_all()

    def log_shows(*needles: str, timeout: float = 60) -> bool:
        with log_changed:
            return log_changed.wait_for(lambda: all(any(n in line for line in log) for n in needles), timeout)

    threading.Thread(target=read, daemon=True).start()
    threading.Thread(target=read_log, daemon=True).start()
    try:
        assert ready.wait(60)
        assert proc.poll() is None and banner, "".join(log)
        text = "".join(banner)
        assert f"port {base + 993} (SSL/TLS)" in text and f"port {base + 587} (STARTTLS)" in text
        assert "alice@acme.test" in text
        # A name the certificate carries as a DNS name: mbsync (isync 1.4) ignores IP addresses
        # in it and refused "127.0.0.1" ("certificate owner does not match hostname").
        from cryptography import x509

        cert = x509.load_pem_x509_certificate((tmp_path / "demo" / "certs" / "gateway.crt").read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for kind in ("IMAP", "SMTP"):
            server = re.search(rf"{kind}  server (\S+)  port", text)
            assert server and server.group(1) in names.get_values_for_type(x509.DNSName), text
        ctx = ssl.create_default_context(cafile=str(tmp_path / "demo" / "certs" / "gateway.crt"))
        with smtplib.SMTP("127.0.0.1", base + 587, timeout=30) as conn:
            conn.starttls(context=ctx)
            conn.login("alice@acme.test", "alice-pw")
            refused = conn.sendmail("alice@acme.test", ["einkauf@hamburg-tools.de"], b"Subject: ok\r\n\r\nhi\r\n")
            assert refused == {}
            with pytest.raises(smtplib.SMTPDataError) as err:
                conn.sendmail("alice@acme.test", ["lagos.imports@gmail.com"], b"Subject: no\r\n\r\nhi\r\n")
            assert err.value.smtp_code == 550
            # Mail to a colleague reaches the colleague's INBOX (so do approval requests).
            conn.sendmail("alice@acme.test", ["bob@acme.test"], b"Subject: lunch at 12?\r\n\r\nhi\r\n")
            # The approval flow shows without editing a rule: the trigger the banner names is held.
            assert f"--to {HOLD_TRIGGER}" in text
            conn.mail("alice@acme.test")
            conn.rcpt(HOLD_TRIGGER)
            code, reply = conn.data(b"Subject: quotation for Osaka\r\n\r\nplease approve\r\n")
            assert code == 250 and reply.endswith(b"held for approval"), reply
        with imaplib.IMAP4_SSL("127.0.0.1", base + 993, ssl_context=ctx, timeout=30) as imap:
            imap.login("bob@acme.test", "bob-pw")

            def bob_has_it() -> bool:
                imap.select("INBOX", readonly=True)
                return bool(imap.search(None, "SUBJECT", '"lunch at 12?"')[1][0])

            wait_until(bob_has_it, timeout=30, what="the colleague's mail in his INBOX", interval=0.2)
        # The web panel it prints is up; its demo accounts sign in (a local one and an employee).
        panel = re.search(r"Web panel \S*: (http://127\.0\.0\.1:\d+)/", text)
        assert panel, text
        assert panel.group(1) == f"http://127.0.0.1:{base + PANEL_OFFSET}"
        assert_a_browser_opens(panel.group(1))
        # The approve/reject links mailed to approvers open this panel (not https://mail.acme.test).
        from gateway.config import load

        assert load(tmp_path / "demo" / "mailgate.toml").approval.link_base_url == panel.group(1) + "/approvals"
        from gateway.demo.sample_data import PANEL_ACCOUNTS
        from tests.panel.conftest import PanelClient

        login, (password, _roles) = next(iter(PANEL_ACCOUNTS.items()))
        assert f"{login} / {password}" in text
        for who, secret in ((login, password), ("carol@acme.test", "carol-pw")):
            client = PanelClient(panel.group(1))
            assert client.login(who, secret).status == 303, who
            assert client.get("/").status == 200
        # The held mail waits in the manager's approval queue (Carol is Alice's manager).
        queue = client.get("/approvals")
        assert queue.status == 200 and "quotation for Osaka" in queue.text and HOLD_TRIGGER in queue.text
        # The demo's rules are its own copy (the repository's rules/ untouched), the hold rule enforcing.
        assert (tmp_path / "demo" / "rules" / HOLD_RULE_FILE).exists()
        assert (tmp_path / "demo" / "rules" / "50-examples-audit.yaml").exists()
        assert not (REPO / "rules" / HOLD_RULE_FILE).exists()
        # The shared mailbox's inquiries were distributed (one left for a manager), the archive
        # synced the mailboxes, and nothing failed on the way.
        assert log_shows("UID 1 distributed (customer)", "UID 2 distributed (rule) rule nigeria-to-bob",
                         "UID 4 undistributed", "archive sync pass done"), "".join(log)
        assert not any("Traceback" in line or " ERROR " in line for line in log), "".join(log)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            # The stop's own bounds, each for a part that does not end by itself: acceptors 20 s,
            # relay process 15 s, the node's tasks 10 s together, Dovecot 10 s.  Well within
            # them it takes a few seconds; under a loaded machine it took over 30 s at times.
            proc.wait(STOP_BOUND)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"the demo did not stop within {STOP_BOUND} s of SIGINT:\n" + "".join(log[-40:])
    # The Dovecot it started is gone too.
    assert not (tmp_path / "demo" / "upstream" / "run" / "master.pid").exists() or \
        subprocess.run(["pgrep", "-f", str(tmp_path / "demo" / "upstream")], capture_output=True).returncode != 0
