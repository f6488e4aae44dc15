"""The README's demo command: `mailgate demo` comes up and does what it prints."""

from __future__ import annotations

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

from tests.harness import shared_tempdir

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
OFFSETS = (587, 465, 143, 993, 325, 80)


def free_base() -> int:
    for _ in range(50):
        base = random.randrange(20000, 60000, 1000)
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
        ctx = ssl.create_default_context(cafile=str(tmp_path / "demo" / "certs" / "gateway.crt"))
        with smtplib.SMTP("127.0.0.1", base + 587, timeout=30) as conn:
            conn.starttls(context=ctx)
            conn.login("alice@acme.test", "alice-pw")
            refused = conn.sendmail("alice@acme.test", ["einkauf@hamburg-tools.de"], b"Subject: ok\r\n\r\nhi\r\n")
            assert refused == {}
            with pytest.raises(smtplib.SMTPDataError) as err:
                conn.sendmail("alice@acme.test", ["lagos.imports@gmail.com"], b"Subject: no\r\n\r\nhi\r\n")
            assert err.value.smtp_code == 550
        # The web panel it prints is up; its demo accounts sign in (a local one and an employee).
        panel = re.search(r"Web panel \S*: (http://127\.0\.0\.1:\d+)/", text)
        assert panel, text
        assert panel.group(1) == f"http://127.0.0.1:{base + 80}"
        from gateway.demo.sample_data import PANEL_ACCOUNTS
        from tests.panel.conftest import PanelClient

        login, (password, _roles) = next(iter(PANEL_ACCOUNTS.items()))
        assert f"{login} / {password}" in text
        for who, secret in ((login, password), ("carol@acme.test", "carol-pw")):
            client = PanelClient(panel.group(1))
            assert client.login(who, secret).status == 303, who
            assert client.get("/").status == 200
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
