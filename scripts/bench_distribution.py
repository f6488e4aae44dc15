#!/usr/bin/env python3
"""Shared-mailbox distribution benchmark (issue 7): latency and sustained throughput.

    python scripts/bench_distribution.py                       # append delivery (default)
    python scripts/bench_distribution.py --delivery forward    # forward through the relay queue
    python scripts/bench_distribution.py --latency 200 --burst 3000

Everything real, on loopback: a private Dovecot (gateway.demo.upstream) holds the shared
mailbox and the employees' mailboxes; messages enter the shared mailbox over LMTP.

* ``--delivery append``: the worker is `mailgate distribute run` (a subprocess, IDLE on the
  shared INBOX); an employee's copy is APPENDed into their INBOX.  The copy is seen by an
  observer that polls the four employees' INBOXes (UID SEARCH + Message-ID) every 20 ms.
* ``--delivery forward``: the worker runs inside a whole node (`mailgate run`); copies go
  through the relay queue to Dovecot's submission, which relays them to an SMTP sink
  (gateway.demo.sink); the copy is seen when the sink has stored it (its own timestamp).

Routing mix per message: 50 % a known customer (owner), 30 % a keyword rule (round-robin
group of four), 20 % nobody (undistributed: no copy; not counted in latency/throughput).

1. Latency: ``--latency`` messages one at a time, ``--gap`` seconds apart; for each, the time
   from the end of its LMTP transaction (Dovecot has stored it) to the employee's copy.
   p50/p95/max.  The safety re-scan interval is 60 s, so only IDLE can explain low numbers.
2. Throughput: ``--burst`` messages fed over two LMTP connections as fast as they go; messages
   per minute = distributed copies / (last copy − first LMTP start).  The feed rate is
   printed too, so a feeder bottleneck would show.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib import Children, GatewayNode, free_ports, wait_until  # noqa: E402
from imapclient import IMAPClient  # noqa: E402

from gateway.customers import create_customer, create_employee  # noqa: E402
from gateway.db import connect  # noqa: E402
from gateway.db.models import database  # noqa: E402
from gateway.demo.sink import SinkServer  # noqa: E402
from gateway.demo.upstream import DovecotUpstream  # noqa: E402

SHARED = "sales@acme.test"
EMPLOYEES = [f"sales{i}@acme.test" for i in range(1, 5)]
MASTER = ("archiver", "archiver-pw")
RULES = """\
groups:
  quotes:
    members: [sales1@acme.test, sales2@acme.test, sales3@acme.test, sales4@acme.test]
    pick: round-robin
rules:
  - name: quotations
    priority: 10
    when:
      keyword: [quotation, 报价]
    group: quotes
"""
BODY = ("Dear sales team,\r\n\r\nwe are looking for 40 units of your model X-200 pump, delivery to Hamburg.\r\n"
        "Please send your best price and the delivery time.\r\n\r\nBest regards\r\nPurchasing\r\n")


def message(tag: str, i: int) -> tuple[bytes, str, bool]:
    """(raw, Message-ID, gets a copy)."""
    kind = i % 10
    if kind < 5:
        sender, subject = f"buyer{i}@cust{i % 4}.example", f"Order {i}"
    elif kind < 8:
        sender, subject = f"lead{i}@shop{i}.example", f"Quotation request {i}"
    else:
        sender, subject = f"hello{i}@nobody{i}.example", f"Hello {i}"
    mid = f"<bench-{tag}-{i}@{sender.rpartition('@')[2]}>"
    raw = (f"From: Buyer {i} <{sender}>\r\nTo: {SHARED}\r\nSubject: {subject}\r\nMessage-ID: {mid}\r\n"
           "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
           "Content-Type: text/plain; charset=utf-8\r\n\r\n" + BODY).encode()
    return raw, mid, kind < 8


class MailboxObserver(threading.Thread):
    """Polls the employees' INBOXes; ``seen[Message-ID] = first time a copy was there``."""

    def __init__(self, dovecot: DovecotUpstream, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.dovecot, self.interval = dovecot, interval
        self.seen: dict[str, float] = {}
        self.stop_event = threading.Event()
        self.clients: dict[str, tuple[IMAPClient, list[int]]] = {}

    def run(self) -> None:
        for user in EMPLOYEES:
            client = IMAPClient(self.dovecot.host, port=self.dovecot.imaps_port,
                                ssl_context=self.dovecot.ssl_context())
            client.login(f"{user}*{MASTER[0]}", MASTER[1])
            client.select_folder("INBOX", readonly=True)
            self.clients[user] = (client, [0])
        while not self.stop_event.is_set():
            for client, last in self.clients.values():
                client.noop()
                uids = [u for u in client.search(["UID", f"{last[0] + 1}:*"]) if u > last[0]]
                if not uids:
                    continue
                now = time.time()
                for data in client.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]).values():
                    header = data[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"].decode("ascii", "replace")
                    mid = header.partition(":")[2].strip()
                    self.seen.setdefault(mid, now)
                last[0] = max(uids)
            self.stop_event.wait(self.interval)
        for client, _ in self.clients.values():
            try:
                client.logout()
            except Exception:  # noqa: BLE001 - Dovecot may be stopping already
                pass


class SinkObserver(threading.Thread):
    """Reads the sink's messages; ``seen[Message-ID] = the sink's receive time``."""

    def __init__(self, sink: SinkServer, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.sink, self.interval = sink, interval
        self.seen: dict[str, float] = {}
        self.stop_event = threading.Event()
        self.done = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            messages = self.sink.messages()
            for m in messages[self.done:]:
                data = m.data
                start = data.find(b"\nMessage-ID: ")
                if start >= 0:
                    mid = data[start + 13:data.index(b"\n", start + 1)].strip().decode("ascii", "replace")
                    self.seen.setdefault(mid, m.received)
            self.done = len(messages)
            self.stop_event.wait(self.interval)


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(p / 100 * len(values)) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--delivery", choices=("append", "forward"), default="append")
    ap.add_argument("--latency", type=int, default=100, help="messages in the latency phase")
    ap.add_argument("--gap", type=float, default=0.2, help="seconds between latency-phase messages")
    ap.add_argument("--burst", type=int, default=2000, help="messages in the throughput phase")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="mailgate-bench-dist-"))
    os.chmod(base, 0o755)  # Dovecot's mail processes run as user dovecot
    children = Children()
    sink = None
    if args.delivery == "forward":
        sink = SinkServer(base / "sink")
        sink.start()
        children.cleanups.append(sink.stop)
    users = {SHARED: "shared-pw", "relay@acme.test": "relay-pw", **{u: u.split("@")[0] + "-pw" for u in EMPLOYEES}}
    dovecot = DovecotUpstream(base / "dovecot", users, master_user=MASTER,
                              relay_port=sink.port if sink else free_ports(1)[0])
    dovecot.start()
    children.cleanups.append(dovecot.stop)
    try:
        rules = base / "distrules"
        rules.mkdir()
        (rules / "bench.yaml").write_text(RULES)
        node_dir = base / "node"
        node_dir.mkdir()
        ports = free_ports(5)
        sections: dict[str, dict[str, object]] = {
            "node": {"name": "bench", "data_dir": str(node_dir / "var")},
            "database": {"url": f"sqlite:///{node_dir}/var/mailgate.db"},
            "company": {"name": "ACME", "domains": ["acme.test"]},
            "upstream": {"host": dovecot.host, "imap_port": dovecot.imaps_port, "imap_security": "tls",
                         "submission_port": dovecot.submission_port, "submission_security": "starttls",
                         "ca_file": str(dovecot.cert_path)},
            "smtp": {"listen": "127.0.0.1", "submission_port": ports[0], "smtps_port": ports[1],
                     "hostname": "gw.acme.test"},
            "imap": {"listen": "127.0.0.1", "starttls_port": ports[2], "tls_port": ports[3]},
            "metrics": {"listen": "127.0.0.1", "port": ports[4]},
            "relay": {"mode": "relay_account", "username": "relay@acme.test", "password": "relay-pw",
                      "poll_interval": 0.5},
            "panel": {"enabled": False},
            "distribution": {"enabled": True, "mailboxes": [SHARED], "master_user": MASTER[0],
                             "master_password": MASTER[1], "rules_dir": str(rules), "initial": "all",
                             "delivery": args.delivery, "poll_interval": 60.0, "batch_size": 100},
        }
        node = GatewayNode(children, node_dir, sections)
        init = subprocess.run(node._cli("init"), cwd=ROOT, capture_output=True, text=True, timeout=120)
        if init.returncode != 0:
            raise RuntimeError(init.stdout + init.stderr)
        connect(sections["database"]["url"])
        emps = [create_employee(u, u.split("@")[0]) for u in EMPLOYEES]
        for i, emp in enumerate(emps):
            create_customer(f"Customer {i}", domains=[f"cust{i}.example"], owners=[emp])
        database.close()

        if args.delivery == "forward":
            node.start()
            assert sink is not None
            observer: MailboxObserver | SinkObserver = SinkObserver(sink)
        else:
            log = (node_dir / "distribute.log").open("wb")
            proc = children.spawn([sys.executable, "-m", "gateway.cli", "-c", str(node.config), "distribute", "run"],
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1"))
            log_path = node_dir / "distribute.log"
            if not wait_until(lambda: "watching" in log_path.read_text(errors="replace") or proc.poll() is not None,
                              30):
                raise RuntimeError("worker did not start")
            if proc.poll() is not None:
                raise RuntimeError(log_path.read_text())
            observer = MailboxObserver(dovecot)
        observer.start()

        # 1. latency, one message at a time
        sent: dict[str, float] = {}
        expected: list[str] = []
        with smtplib.LMTP(dovecot.host, dovecot.lmtp_port, local_hostname="localhost") as lmtp:
            for i in range(args.latency):
                raw, mid, copied = message("lat", i)
                lmtp.sendmail("feed@bench.example", [SHARED], raw)
                sent[mid] = time.time()
                if copied:
                    expected.append(mid)
                time.sleep(args.gap)  # pacing between independent arrivals, not a wait for an event
        if not wait_until(lambda: all(m in observer.seen for m in expected), 60):
            raise RuntimeError(f"latency phase: {sum(m in observer.seen for m in expected)}/{len(expected)} copies")
        lat = [observer.seen[m] - sent[m] for m in expected]

        # 2. throughput, a burst over two LMTP connections
        burst = [message("burst", i) for i in range(args.burst)]
        expected_burst = [mid for _, mid, copied in burst if copied]
        t0 = time.time()
        fed_at: list[float] = []

        def feed(part: list[tuple[bytes, str, bool]]) -> None:
            with smtplib.LMTP(dovecot.host, dovecot.lmtp_port, local_hostname="localhost") as conn:
                for raw, _, _ in part:
                    conn.sendmail("feed@bench.example", [SHARED], raw)
            fed_at.append(time.time())

        feeders = [threading.Thread(target=feed, args=(burst[k::2],)) for k in range(2)]
        for f in feeders:
            f.start()
        for f in feeders:
            f.join()
        fed = max(fed_at) - t0
        if not wait_until(lambda: all(m in observer.seen for m in expected_burst), 600, step=0.2):
            got = sum(m in observer.seen for m in expected_burst)
            raise RuntimeError(f"throughput phase: {got}/{len(expected_burst)} copies")
        last = max(observer.seen[m] for m in expected_burst)
        observer.stop_event.set()
        observer.join(10)
        elapsed = last - t0
        result = {
            "delivery": args.delivery,
            "latency_messages": len(lat),
            "latency_p50_s": round(statistics.median(lat), 3),
            "latency_p95_s": round(pct(lat, 95), 3),
            "latency_max_s": round(max(lat), 3),
            "burst_messages": args.burst,
            "burst_copies": len(expected_burst),
            "feed_msg_per_min": round(args.burst / fed * 60),
            "distributed_per_min": round(len(expected_burst) / elapsed * 60),
            "handled_per_min": round(args.burst / elapsed * 60),
            "burst_seconds": round(elapsed, 2),
            "cores": os.cpu_count(),
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        }
        print(f"distribution benchmark ({args.delivery}, real Dovecot, IDLE; safety re-scan every 60 s)")
        print(f"  latency LMTP -> employee's copy over {len(lat)} messages: p50 {result['latency_p50_s']:.3f} s  "
              f"p95 {result['latency_p95_s']:.3f} s  max {result['latency_max_s']:.3f} s")
        print(f"  burst of {args.burst} ({len(expected_burst)} with a copy): fed at {result['feed_msg_per_min']} "
              f"msg/min; {result['distributed_per_min']} copies/min, {result['handled_per_min']} messages handled/min "
              f"({elapsed:.1f} s)")
        print(f"  uptime: {result['uptime']}")
        print(json.dumps(result))
        return 0
    finally:
        children.close()
        if args.keep:
            print(f"work directory kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
