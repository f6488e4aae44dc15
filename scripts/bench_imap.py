#!/usr/bin/env python3
"""IMAP proxy benchmark: the same mixed load straight to Dovecot and through the proxy.

    python scripts/bench_imap.py [--seconds 10] [--sessions 8] [--idle 2000] [--pin]

Starts a private Dovecot (gateway.demo.upstream), fills mailboxes over LMTP
(a third of the messages from customers, so tagging is on), starts the proxy
in a subprocess and runs, in the same run:

1. a mixed client load (LOGIN, SELECT, UID FETCH FLAGS / ENVELOPE /
   BODY.PEEK[HEADER.FIELDS] / BODY.PEEK[], IDLE+DONE, LOGOUT) over TLS, direct
   and through the proxy: commands/s, p50/p99 latency and the ratios;
2. memory per connection: RSS growth of the proxy process with N concurrent
   TLS sessions sitting in IDLE (client TLS + upstream TLS included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.customers import create_customer, create_employee  # noqa: E402
from gateway.db import connect  # noqa: E402
from gateway.demo.upstream import DovecotUpstream, free_ports, make_self_signed_cert  # noqa: E402

USERS = [f"user{i}@acme.test" for i in range(20)]


class BenchDovecot(DovecotUpstream):
    """The demo upstream, with imap processes that serve many clients each (2,000 IDLE sessions)."""

    def _render_config(self) -> str:
        conf = super()._render_config()
        return conf.replace("service imap {\n  client_limit = 50\n",
                            "service imap {\n  service_count = 0\n  client_limit = 50\n")
PASSWORD = "pw"


class Client:
    """A minimal asyncio IMAP client that times each command."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.r, self.w = reader, writer
        self.n = 0

    @classmethod
    async def open(cls, port: int, ctx: ssl.SSLContext | None) -> Client:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost" if ctx else None,
                                             limit=1 << 22)
        c = cls(r, w)
        await r.readline()
        return c

    async def cmd(self, text: str) -> tuple[bytes, float]:
        self.n += 1
        tag = b"t%d" % self.n
        start = time.perf_counter()
        self.w.write(tag + b" " + text.encode() + b"\r\n")
        while True:
            line = await self.r.readline()
            if not line:
                raise ConnectionError("closed")
            if line.endswith(b"}\r\n"):
                size = int(line[line.rindex(b"{") + 1 : -3])
                await self.r.readexactly(size)
                continue
            if line.startswith(tag + b" "):
                return line, time.perf_counter() - start

    async def idle(self) -> float:
        self.n += 1
        tag = b"t%d" % self.n
        start = time.perf_counter()
        self.w.write(tag + b" IDLE\r\n")
        while not (await self.r.readline()).startswith(b"+"):
            pass
        self.w.write(b"DONE\r\n")
        while not (await self.r.readline()).startswith(tag + b" "):
            pass
        return time.perf_counter() - start

    def close(self) -> None:
        self.w.close()


ROUNDS_PER_LOGIN = 10  # each round: 4 FETCHes + IDLE/DONE; set by --rounds-per-login


async def worker(port: int, ctx: ssl.SSLContext, user: str, uids: list[int], deadline: float,
                 lat: list[float]) -> None:
    rnd = random.Random(user + str(port))
    while time.perf_counter() < deadline:
        c = await Client.open(port, ctx)
        line, t = await c.cmd(f"LOGIN {user} {PASSWORD}")
        assert b" OK" in line, line
        lat.append(t)
        line, t = await c.cmd("SELECT INBOX")
        lat.append(t)
        for _ in range(ROUNDS_PER_LOGIN):
            if time.perf_counter() >= deadline:
                break
            u = rnd.choice(uids)
            lo = max(1, u - 20)
            for text in (f"UID FETCH {lo}:{u} (FLAGS)", f"UID FETCH {u} (ENVELOPE)",
                         f"UID FETCH {u} (BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE)])",
                         f"UID FETCH {u} (RFC822.SIZE BODY.PEEK[])"):
                line, t = await c.cmd(text)
                assert b" OK" in line, line
                lat.append(t)
            lat.append(await c.idle())
        line, t = await c.cmd("LOGOUT")
        lat.append(t)
        c.close()


async def decide_all(port: int, ctx: ssl.SSLContext) -> None:
    """Through the proxy, have every message of every mailbox decided (and persisted) once."""
    async def one(user: str) -> None:
        c = await Client.open(port, ctx)
        for text in (f"LOGIN {user} {PASSWORD}", "SELECT INBOX", "UID FETCH 1:* (ENVELOPE)", "LOGOUT"):
            line, _ = await c.cmd(text)
            assert b" OK" in line, line
        c.close()

    await asyncio.gather(*(one(u) for u in USERS))


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


def core_cpu() -> list[tuple[int, int]]:
    """(busy, total) jiffies per core."""
    out = []
    for line in Path("/proc/stat").read_text().splitlines()[1:]:
        if not line.startswith("cpu"):
            break
        vals = [int(v) for v in line.split()[1:]]
        out.append((sum(vals) - vals[3] - vals[4], sum(vals)))
    return out


async def load(port: int, ctx: ssl.SSLContext, sessions: int, seconds: float, uids: list[int],
               upstream_pid: int | None = None, proxy_pid: int | None = None) -> dict:
    """One slice of load: latencies and the CPU the load generator, Dovecot and the proxy used."""
    lat: list[float] = []
    up0 = tree_cpu_seconds(upstream_pid) if upstream_pid else 0.0
    px0 = cpu_seconds(proxy_pid) if proxy_pid else 0.0
    cpu0, mbusy0, mtotal0, cores0 = time.process_time(), *machine_cpu(), core_cpu()
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(worker(port, ctx, USERS[i % len(USERS)], uids, deadline, lat) for i in range(sessions)))
    elapsed = time.perf_counter() - start
    mbusy1, mtotal1 = machine_cpu()
    return {
        "lat": lat, "elapsed": elapsed, "generator_cpu": time.process_time() - cpu0,
        "busy": mbusy1 - mbusy0, "total": mtotal1 - mtotal0,
        "cores": [(b1 - b0, t1 - t0) for (b0, t0), (b1, t1) in zip(cores0, core_cpu(), strict=True)],
        "upstream_cpu": tree_cpu_seconds(upstream_pid) - up0 if upstream_pid else 0.0,
        "proxy_cpu": cpu_seconds(proxy_pid) - px0 if proxy_pid else 0.0,
    }


def summary(slices: list[dict]) -> dict:
    """Slices of one phase, summed: commands/s over their time, latency percentiles, CPU per command."""
    lat = sorted(x for sl in slices for x in sl["lat"])
    n = len(lat)
    cores = [(sum(sl["cores"][i][0] for sl in slices), sum(sl["cores"][i][1] for sl in slices))
             for i in range(len(slices[0]["cores"]))]
    return {
        "commands": n,
        "slices": len(slices),
        "generator_cpu_us_per_cmd": sum(sl["generator_cpu"] for sl in slices) / n * 1e6,
        "upstream_cpu_us_per_cmd": sum(sl["upstream_cpu"] for sl in slices) / n * 1e6,
        "proxy_cpu_us_per_cmd": sum(sl["proxy_cpu"] for sl in slices) / n * 1e6,
        "machine_busy": sum(sl["busy"] for sl in slices) / max(1, sum(sl["total"] for sl in slices)),
        "core_busy": [b / max(1, t) for b, t in cores],
        "cmd_per_s": n / sum(sl["elapsed"] for sl in slices),
        "p50_ms": statistics.median(lat) * 1000,
        "p99_ms": lat[int(n * 0.99)] * 1000,
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """CPU of a process tree: the root (with its reaped children) and every live descendant."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    own: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        own[pid] = (int(fields[11]) + int(fields[12])) / tick
        if pid == root:
            own[pid] += (int(fields[13]) + int(fields[14])) / tick
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += own.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def idle_sessions(port: int, ctx: ssl.SSLContext | None, count: int, pid: int,
                        fetch_first: str = "", snapshot: bool = False) -> dict:
    """RSS growth of the proxy with ``count`` sessions in IDLE; also the slope over the second half,
    which free memory left in the heap by the load phase cannot flatter."""
    clients: list[Client] = []
    sem = asyncio.Semaphore(50)

    async def one(i: int) -> None:
        async with sem:
            c = await Client.open(port, ctx)
            line, _ = await c.cmd(f"LOGIN {USERS[i % len(USERS)]} {PASSWORD}")
            assert b" OK" in line, line
            await c.cmd("SELECT INBOX")
            if fetch_first:
                await c.cmd(fetch_first)
            c.n += 1
            c.w.write(b"i%d IDLE\r\n" % c.n)
            while not (await c.r.readline()).startswith(b"+"):
                pass
            clients.append(c)

    before = rss_kb(pid)
    half = count // 2
    await asyncio.gather(*(one(i) for i in range(half)))
    await asyncio.sleep(2)  # let buffers settle (measurement, not synchronisation)
    middle = rss_kb(pid)
    if snapshot:  # tracemalloc snapshots (run_proxy) at the middle and the end
        os.kill(pid, signal.SIGUSR1)
        await asyncio.sleep(3)
    await asyncio.gather(*(one(i) for i in range(half, count)))
    await asyncio.sleep(2)
    after = rss_kb(pid)
    if snapshot:
        os.kill(pid, signal.SIGUSR1)
        await asyncio.sleep(3)

    for c in clients:
        c.close()
    return {"sessions": count, "rss_before_kb": before, "rss_half_kb": middle, "rss_after_kb": after,
            "kb_per_session": (after - before) / count,
            "kb_per_session_second_half": (after - middle) / max(1, count - half)}


def message(i: int, customer: bool) -> bytes:
    sender = f'"Buyer {i}" <buyer{i % 7}@buyer.test>' if customer else f'"Someone {i}" <s{i}@unknown.test>'
    body = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit.\r\n" * (20 + (i % 50) * 10))
    return (f"From: {sender}\r\nTo: user@acme.test\r\nSubject: Message {i}\r\nMessage-ID: <m{i}@bench>\r\n"
            f"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n\r\n{body}").encode()


def start_profiler(out: str, pid: int, seconds: float) -> subprocess.Popen:
    """py-spy (pip install py-spy) on the proxy process: samples only while it runs Python code."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    fmt = "raw" if out.endswith(".txt") else "speedscope"
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
                             "--rate", "250", "--format", fmt, "--output", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_proxy(base: Path, dovecot: DovecotUpstream, db_url: str, cert: Path, key: Path,
                upstream_security: str = "tls", cpus: set[int] | None = None,
                tracemalloc_prefix: str = "") -> tuple:
    tls_port, plain_port = free_ports(2)
    settings = {
        "config": {
            "database": {"url": db_url},
            "tls": {"cert": str(cert), "key": str(key)},
            "upstream": {"host": "127.0.0.1",
                         "imap_port": dovecot.imaps_port if upstream_security == "tls" else dovecot.imap_port,
                         "imap_security": upstream_security,
                         "ca_file": str(dovecot.cert_path)},
            "relay": {"username": "r", "password": "r"},
            "imap": {"listen": "127.0.0.1", "starttls_port": plain_port, "tls_port": tls_port,
                     "max_connections": 10000, "max_connections_per_user": 1000},
        },
        "log_level": "WARNING",
        "refresh_interval": 5.0,
    }
    path = base / "proxy.json"
    path.write_text(json.dumps(settings))
    env = {**os.environ, "MAILGATE_TRACEMALLOC": tracemalloc_prefix} if tracemalloc_prefix else None
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.imap.run_proxy", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=open(base / "proxy.log", "wb"),
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    line = proc.stdout.readline()
    if not line.startswith(b"READY "):
        raise RuntimeError("proxy did not start: " + (base / "proxy.log").read_text())
    ports = json.loads(line[6:])
    return proc, ports["tls"], ports["starttls"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--messages", type=int, default=150)
    ap.add_argument("--slices", type=int, default=1,
                    help="split each phase into N slices, run alternately direct/proxied (same total time)")
    ap.add_argument("--idle", type=int, default=2000)
    ap.add_argument("--rounds-per-login", type=int, default=10,
                    help="rounds (4 FETCHes + IDLE) per session before LOGOUT and a new LOGIN")
    ap.add_argument("--pin", action="store_true",
                    help="the proxy alone on the last core, the load generator and Dovecot on the others, "
                         "in both phases (the gateway on its own core, as on its own host)")
    ap.add_argument("--boost", type=int, metavar="NICE",
                    help="scheduler autogroup nice (e.g. -10) for the bench's own session and Dovecot's, the "
                         "same in both phases: less interference from other work on a shared machine (root)")
    ap.add_argument("--idle-plain", action="store_true", help="idle clients without TLS (loopback plaintext)")
    ap.add_argument("--idle-fetch", action="store_true",
                    help="each idle session first reads the mailbox's largest messages whole (~100 KB), "
                         "so TLS buffers have seen full records before the session idles")
    ap.add_argument("--upstream-security", choices=("tls", "starttls", "none"), default="tls",
                    help="proxy -> Dovecot (clients always use TLS)")
    ap.add_argument("--profile", metavar="FILE",
                    help="sample the proxy with py-spy during the proxied load "
                         "(speedscope JSON, or collapsed stacks for a .txt name)")
    ap.add_argument("--tracemalloc", metavar="PREFIX",
                    help="trace the proxy's Python allocations; snapshots PREFIX.1 / PREFIX.2 at half / all "
                         "idle sessions (compare them with tracemalloc)")
    ap.add_argument("--syscalls", metavar="FILE",
                    help="count the proxy's system calls (strace -c; BENCH_STRACE_ARGS overrides -c) "
                         "during the proxied load")
    args = ap.parse_args()
    global ROUNDS_PER_LOGIN
    ROUNDS_PER_LOGIN = args.rounds_per_login

    proxy_cpus = None
    if args.pin:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            ap.error("--pin needs two cores")
        proxy_cpus = {cores[-1]}
        os.sched_setaffinity(0, set(cores[:-1]))  # inherited by Dovecot (started below)
    base = Path(tempfile.mkdtemp(prefix="mailgate-bench-imap-"))
    os.chmod(base, 0o755)
    dovecot = BenchDovecot(base / "dovecot", {u: PASSWORD for u in USERS}, auth_penalty=False)
    dovecot.start()
    if args.boost is not None:  # Dovecot daemonizes into its own session (its own autogroup)
        dpid = int(dovecot.pid_path.read_text().split()[0])
        for who in ("self", str(dpid)):
            Path(f"/proc/{who}/autogroup").write_text(str(args.boost))
    proc = None
    try:
        db_url = f"sqlite:///{base}/gw.db"
        connect(db_url)
        emps = [create_employee(u, u.split("@")[0]) for u in USERS]
        create_customer("Buyer Co", domains=["buyer.test"], owners=[emps[0]])
        for u in USERS:
            for i in range(args.messages):
                dovecot.deliver(u, message(i, customer=i % 3 == 0))
        uids = list(range(1, args.messages + 1))
        cert, key = base / "gw.crt", base / "gw.key"
        make_self_signed_cert(cert, key)
        proc, port, plain_port = start_proxy(base, dovecot, db_url, cert, key, args.upstream_security, proxy_cpus,
                                             args.tracemalloc or "")
        dctx = ssl.create_default_context(cafile=str(dovecot.cert_path))
        pctx = ssl.create_default_context(cafile=str(cert))

        async def run() -> dict:
            # warm up: every message decided once (decisions persisted), then measure
            await decide_all(port, pctx)
            await load(port, pctx, len(USERS), 2, uids)
            dpid = int(dovecot.pid_path.read_text().split()[0])
            slices = 1 if (args.profile or args.syscalls) else args.slices
            seconds = args.seconds / slices
            direct_parts, proxy_parts = [], []
            for _ in range(slices):  # alternate, so drifting load elsewhere hits both phases alike
                direct_parts.append(await load(dovecot.imaps_port, dctx, args.sessions, seconds, uids, dpid))
                spy = start_profiler(args.profile, proc.pid, seconds) if args.profile else None
                strace_args = os.environ.get("BENCH_STRACE_ARGS", "-c").split()
                trace = subprocess.Popen(["strace", *strace_args, "-f", "-o", args.syscalls, "-p", str(proc.pid)],
                                         stderr=subprocess.DEVNULL) if args.syscalls else None
                proxy_parts.append(await load(port, pctx, args.sessions, seconds, uids, dpid, proc.pid))
                if spy is not None:
                    spy.wait()
                if trace is not None:
                    trace.send_signal(signal.SIGINT)
                    trace.wait()
                    with open(args.syscalls, "a") as f:
                        f.write(f"commands: {len(proxy_parts[-1]['lat'])}\n")
            direct, proxied = summary(direct_parts), summary(proxy_parts)
            proxied["proxy_rss_after_load_kb"] = rss_kb(proc.pid)
            if args.idle_plain:  # no client TLS: shows what TLS itself costs
                idle = await idle_sessions(plain_port, None, args.idle, proc.pid)
            else:
                first = f"UID FETCH {args.messages - 3}:{args.messages} (BODY.PEEK[])" if args.idle_fetch else ""
                idle = await idle_sessions(port, pctx, args.idle, proc.pid, first,
                                           bool(args.tracemalloc)) if args.idle else {}
            return {"direct": direct, "proxy": proxied, "idle": idle}

        res = asyncio.run(run())
        d, p = res["direct"], res["proxy"]
        print(f"mixed load, {args.sessions} TLS sessions, {args.seconds:.0f} s each in {d['slices']} alternating "
              f"slice(s), tagging on "
              f"(1/3 of messages from a customer), proxy->upstream {args.upstream_security}")
        if proxy_cpus:
            print(f"  pinned: proxy on core {sorted(proxy_cpus)}, load generator + Dovecot on "
                  f"{sorted(os.sched_getaffinity(0))} (both phases)")
        print(f"  direct : {d['cmd_per_s']:8.1f} cmd/s  p50 {d['p50_ms']:6.2f} ms  p99 {d['p99_ms']:6.2f} ms")
        print(f"  proxy  : {p['cmd_per_s']:8.1f} cmd/s  p50 {p['p50_ms']:6.2f} ms  p99 {p['p99_ms']:6.2f} ms")
        print(f"  load generator CPU per command: direct {d['generator_cpu_us_per_cmd']:.0f} us, "
              f"proxy {p['generator_cpu_us_per_cmd']:.0f} us; machine busy: direct {d['machine_busy']:.0%}, "
              f"proxy {p['machine_busy']:.0%}; per core: direct "
              f"{'/'.join(f'{c:.0%}' for c in d['core_busy'])}, proxy {'/'.join(f'{c:.0%}' for c in p['core_busy'])}")
        print(f"  CPU per command: load generator {d['generator_cpu_us_per_cmd']:.0f} / "
              f"{p['generator_cpu_us_per_cmd']:.0f} us, Dovecot {d['upstream_cpu_us_per_cmd']:.0f} / "
              f"{p['upstream_cpu_us_per_cmd']:.0f} us (direct / proxied), proxy {p['proxy_cpu_us_per_cmd']:.0f} us")
        print(f"  proxy RSS after the load: {p['proxy_rss_after_load_kb'] / 1024:.0f} MB")
        print(f"  ratio  : throughput {p['cmd_per_s'] / d['cmd_per_s']:.2f}x  "
              f"p50 {p['p50_ms'] / d['p50_ms']:.2f}x  p99 {p['p99_ms'] / d['p99_ms']:.2f}x")
        if res["idle"]:
            i = res["idle"]
            print(f"idle: {i['sessions']} TLS sessions in IDLE: proxy RSS {i['rss_before_kb']} -> "
                  f"{i['rss_half_kb']} -> {i['rss_after_kb']} KB = {i['kb_per_session']:.1f} KB per session "
                  f"({i['kb_per_session_second_half']:.1f} KB over the second half) "
                  f"(client {'plain' if args.idle_plain else 'TLS'}, upstream {args.upstream_security})")
        print(json.dumps(res))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        dovecot.stop()
        for name in ("proxy.log", "dovecot/dovecot.log"):
            if (base / name).exists():
                shutil.copy(base / name, Path(tempfile.gettempdir()) / ("bench_imap_" + Path(name).name))
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
