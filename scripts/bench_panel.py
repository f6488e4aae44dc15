#!/usr/bin/env python3
"""Panel customer list benchmark (issue 5): p50/p95 of GET /customers over real HTTP.

    python scripts/bench_panel.py                  # 100k customers, 300k contacts (target p95 < 150 ms)
    python scripts/bench_panel.py --customers 20000 --requests 100

What runs: a fresh SQLite DB (all migrations), filled by scripts/bench_panel_data.py
(100k customers, 3 contacts each, 200 salespeople in 10 departments, 30 % public pool),
then the real panel (`mailgate panel serve`, its Twisted WSGI server and thread pool)
as a subprocess on loopback.  Each request is a full HTTP GET of the rendered HTML page
(50 rows, owners, contacts, domains, count), timed from send to last byte, one at a time.

Sign-in: employees sign in against the upstream IMAP server, which this benchmark does not
run; the sessions are created in the DB with ``panel.sessions.create`` (the same row a
real sign-in writes) and sent as the ``mg_session`` cookie.  That skips only the sign-in.

Views (each for a salesperson — own customers + the pool — and a CRM administrator — all):
default list, page 5, search by a name word, by a contact address, by a domain, tag
filter, stage + country filter, pool list, sort by name and last contact.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.benchlib import REPO, Children, free_ports, wait_until, write_toml  # noqa: E402

TARGET_P95_MS = 150.0


def build_db(base: Path, customers: int) -> tuple[str, dict]:
    from gateway.db import connect
    from scripts.bench_panel_data import build

    url = "sqlite:///" + str(base / "var" / "mailgate.db")
    (base / "var").mkdir(parents=True, exist_ok=True)
    db = connect(url)
    started = time.monotonic()
    ids = build(customers=customers)
    print(f"data: {customers} customers, {customers * 3} contacts in {time.monotonic() - started:.0f} s")
    from panel import sessions

    tokens = {role: sessions.create("employee", ids[key], "127.0.0.1", "bench")[0]
              for role, key in (("salesperson", "salesperson"), ("crm_admin", "admin"))}
    db.close()
    return url, {"ids": ids, "tokens": tokens}


def views(rnd: random.Random, customers: int) -> list[tuple[str, str]]:
    from scripts.bench_panel_data import COUNTRIES, TAGS, WORDS

    def some_customer() -> int:
        return rnd.randrange(customers)

    return [
        ("default list", "/customers"),
        ("page 5", "/customers?page=5"),
        ("search name word", "/customers?pool=all&q=" + rnd.choice(WORDS[:15]).lower()),
        ("search contact address", f"/customers?pool=all&q=buyer1.{some_customer()}%40"),
        ("search domain", f"/customers?pool=all&q=c{some_customer()}.example"),
        ("tag filter", "/customers?tag=" + rnd.choice(TAGS[:7])),
        ("stage+country", f"/customers?stage=quoted&country={rnd.choice(COUNTRIES)}"),
        ("public pool", "/pool"),
        ("sort name asc", "/customers?sort=name&dir=asc"),
        ("sort last contact", "/customers?pool=all&sort=last_contact"),
    ]


def get(port: int, path: str, token: str) -> tuple[int, float, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    started = time.perf_counter()
    conn.request("GET", path, headers={"Cookie": f"mg_session={token}"})
    resp = conn.getresponse()
    body = resp.read()
    elapsed = (time.perf_counter() - started) * 1000
    conn.close()
    return resp.status, elapsed, len(body)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200, help="timed requests per role")
    parser.add_argument("--dir", default="", help="keep the DB here (default: a temporary directory)")
    args = parser.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench-panel-"))
    base.mkdir(parents=True, exist_ok=True)
    port = free_ports(1)[0]
    config = base / "mailgate.toml"
    write_toml(config, {
        "node": {"name": "bench", "data_dir": str(base / "var")},
        "database": {"url": "sqlite:///" + str(base / "var" / "mailgate.db")},
        "company": {"name": "Bench Trading", "domains": ["acme.test"], "language": "zh-CN"},
        "relay": {"mode": "relay_account", "username": "relay@acme.test", "password": "unused-by-the-panel"},
        "panel": {"listen": "127.0.0.1", "port": port, "idle_minutes": 600, "absolute_hours": 24},
    })
    _, state = build_db(base, args.customers)
    children = Children()
    try:
        proc = children.spawn([sys.executable, "-m", "gateway.cli", "-c", str(config), "panel", "serve",
                               "--log-level", "WARNING"], cwd=REPO, stdout=subprocess.DEVNULL)
        def up() -> bool:
            try:
                return get(port, "/healthz", "")[0] == 200
            except OSError:
                return False

        if not wait_until(lambda: up() or proc.poll() is not None, 60) or proc.poll() is not None:
            print("panel did not start", file=sys.stderr)
            return 1

        rnd = random.Random(5)
        print(f"panel pid {proc.pid} on 127.0.0.1:{port}; {os.cpu_count()} CPUs; load {os.getloadavg()}")
        worst = 0.0
        for role, token in state["tokens"].items():
            for _, path in views(rnd, args.customers):  # warm-up: page cache, SQLite statements, templates
                status, _, _ = get(port, path, token)
                if status != 200:
                    print(f"{role} {path}: HTTP {status}", file=sys.stderr)
                    return 1
            times: list[float] = []
            per_view: dict[str, list[float]] = {}
            sizes: list[int] = []
            for i in range(args.requests):
                name, path = views(rnd, args.customers)[i % 10]
                status, ms, size = get(port, path, token)
                assert status == 200, (path, status)
                times.append(ms)
                sizes.append(size)
                per_view.setdefault(name, []).append(ms)
            p50, p95 = statistics.median(times), pct(times, 95)
            worst = max(worst, p95)
            print(f"\n{role}: {len(times)} requests, p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {max(times):.1f} ms "
                  f"(page ~{statistics.median(sizes) / 1024:.0f} KB)")
            for name, values in per_view.items():
                print(f"  {name:<24} p50 {statistics.median(values):7.1f} ms  p95 {pct(values, 95):7.1f} ms")
        verdict = "PASS" if worst < TARGET_P95_MS else "FAIL"
        print(f"\ntarget: p95 < {TARGET_P95_MS:.0f} ms at {args.customers} customers -> worst p95 {worst:.1f} ms: "
              f"{verdict}")
        return 0 if worst < TARGET_P95_MS else 2
    finally:
        children.close()


if __name__ == "__main__":
    sys.exit(main())
