"""kill -9 in the middle of a stream, then restart: no duplicates, no losses.

The watcher runs as a real subprocess (`mailgate distribute run`); a burst is fed into
the shared mailbox through LMTP while it distributes; it is killed with SIGKILL part-way
and started again.  Then a whole node (`mailgate run`, with [distribution] enabled)
relays the queue to the sink, where every inquiry must arrive exactly once.  (The relay
is not killed here: its own at-least-once window, RFC 1047, is tested elsewhere.)
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import smtplib
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from gateway import customers
from gateway.db import connect
from gateway.db.models import OutboundMessage, database
from gateway.distribute.schema import DistDelivery, Distribution
from tests.harness import wait_until
from tests.harness.gateway import REPO, GatewayProcess

pytestmark = pytest.mark.integration

BURST = 240
LIVE = 40  # fed while the whole node runs


def _count(model) -> int:
    database.close()  # see the other process's commits on a fresh connection
    return model.select().count()


class Watcher:
    """`mailgate distribute run` as a subprocess."""

    def __init__(self, config: Path):
        self.config = config
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []

    def start(self) -> None:
        self.lines = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "-c", str(self.config), "distribute", "run"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        wait_until(lambda: any("watching" in line for line in self.lines) or self.proc.poll() is not None, 20,
              "watcher did not start")
        assert self.proc.poll() is None, "\n".join(self.lines[-20:])

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)


def test_kill_9_mid_stream_no_duplicates_no_losses(tmp_path_factory, dovecot, sink) -> None:
    shared = f"shared-{secrets.token_hex(4)}@acme.test"
    dovecot.add_user(shared, "pw-" + secrets.token_hex(6))
    gw = GatewayProcess(tmp_path_factory.mktemp("distcrash"), dovecot, overrides={
        "distribution": {"enabled": True, "mailboxes": [shared], "master_user": "archiver",
                         "master_password": "archiver-pw", "initial": "all", "batch_size": 20,
                         "rules_dir": str(tmp_path_factory.mktemp("norules"))},
    })
    connect(gw.db_url)
    bob = customers.create_employee("bob@acme.test", "Bob")
    customers.create_customer("Burst Buyer", domains=["burst.example"], owners=[bob])
    database.close()
    watcher = Watcher(gw.config_path)
    tag = secrets.token_hex(4)
    mids = [f"<burst-{tag}-{i}@burst.example>" for i in range(BURST)]

    def feed(mids: list[str] = mids) -> None:
        with smtplib.LMTP(dovecot.host, dovecot.lmtp_port, local_hostname="localhost") as lmtp:
            for i, mid in enumerate(mids):
                raw = (f"From: buyer{i}@burst.example\r\nTo: {shared}\r\nSubject: burst {i}\r\n"
                       f"Message-ID: {mid}\r\n\r\nbody {i}\r\n").encode()
                lmtp.sendmail(f"buyer{i}@burst.example", [shared], raw)

    try:
        watcher.start()
        feeder = threading.Thread(target=feed)
        feeder.start()
        wait_until(lambda: _count(Distribution) >= 40, 30, "no distribution started")
        watcher.kill()  # SIGKILL mid-stream: somewhere between records, keywords and checkpoints
        killed_at = _count(Distribution)
        assert killed_at < BURST, "the burst finished before the kill; make it bigger"
        feeder.join(60)
        watcher.start()
        wait_until(lambda: _count(Distribution) >= BURST, 60, "not every message was distributed after the restart")
        watcher.stop()
        database.close()
        records = list(Distribution.select())
        assert len(records) == BURST and {r.message_id for r in records} == set(mids)
        assert {r.state for r in records} == {"distributed"}
        assert DistDelivery.select().count() == BURST
        assert OutboundMessage.select().count() == BURST  # exactly one forward queued per message
        # A node relays the queue: every inquiry reaches bob exactly once.  Its own watcher
        # distributes more mail meanwhile (its writes race the relay process's on the DB).
        sink.clear()
        gw.start()
        more = [f"<burst-{tag}-live{i}@burst.example>" for i in range(LIVE)]
        feed(more)
        mids += more
        wait_until(lambda: sum(1 for m in sink.messages() if tag.encode() in m.data) >= BURST + LIVE, 60,
              "sink incomplete")
        seen = Counter()
        for m in sink.messages():
            if tag.encode() in m.data:
                assert m.rcpt_tos == ["bob@acme.test"]
                for mid in mids:
                    if f"Message-ID: {mid}\r\n".encode() in m.data:
                        seen[mid] += 1
        assert set(seen) == set(mids) and set(seen.values()) == {1}
        assert any("watching" in line for line in gw.log_lines)  # the node runs the watcher too
        assert not [line for line in gw.log_lines if "database is locked" in line]
        database.close()
        assert Distribution.select().count() == OutboundMessage.select().count() == BURST + LIVE
    finally:
        watcher.stop()
        gw.stop()
        database.close()
    stats = json.dumps({"killed_at": killed_at})
    print(stats)
