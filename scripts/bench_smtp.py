#!/usr/bin/env python3
"""Outbound SMTP throughput: the gateway against a bare sink and a Postfix relay.

    python scripts/bench_smtp.py [--messages N] [--sessions 20] [--size 5120] [--rounds R]

One run, loopback only.  Postfix's ``smtp-source`` sends N messages of SIZE bytes
over SESSIONS parallel sessions (a connection per message, no AUTH) to:

  sink     ``smtp-sink`` itself — the reference;
  postfix  a private Postfix instance (``postfix -c DIR``) relaying to a sink;
  gateway  ``mailgate run`` (trusted network 127.0.0.0/8; policy + archive record +
           fsynced spool and queue row + relay worker) relaying to a sink.

Each target first gets 40 warm-up messages (the gateway: and its archive indexer has indexed
them, so its text-extraction worker processes have started).  Then, for each: the time from
the first message until the sink has counted all N,
messages/s, the accept rate (smtp-source finished), peak RSS (gateway: VmHWM;
Postfix: sampled sum of PSS over its processes).  Nothing may be lost: every sink must
count exactly N (and the gateway's queue rows must all be 'sent'; its search index must
catch up with every record: the time and CPU that takes are printed).  ``--rounds R`` runs
the targets R times, interleaved, and prints medians — on a shared machine one run's ratio
moves by ±0.1×.  Every
process started here is stopped at the end, also after an error or Ctrl-C.
Target (issue 2): gateway >= 300 msg/s on 2 cores and >= 0.5x Postfix.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    HOST,
    REPO,
    Children,
    GatewayNode,
    PostfixRelay,
    Sink,
    TreeSampler,
    cpu_seconds,
    free_ports,
    is_alive,
    process_tree,
    smtp_source,
    tree_cpu_seconds,
    wait_until,
)

SENDER = "sales1@acme.test"
RECIPIENT = "buyer@customer.example"
WARMUP = 40
TARGETS = ("sink", "postfix", "gateway")


@dataclass
class Result:
    target: str
    messages: int
    accept_s: float | None = None  # smtp-source finished (every message got its 250)
    deliver_s: float | None = None  # the sink counted all of them
    delivered: int = 0
    rss_kb: int = 0
    cpu_s: float | None = None  # CPU time of the target's processes during the measured run
    problems: list[str] | None = None

    @property
    def rate(self) -> float | None:
        return self.messages / self.deliver_s if self.deliver_s else None

    @property
    def accept_rate(self) -> float | None:
        return self.messages / self.accept_s if self.accept_s else None


def measure(
    name: str, port: int, sink: Sink, args: argparse.Namespace, children: Children, cpu: Callable[[], float],
    warm: Callable[[], bool] | None = None,
) -> Result:
    """Warm up, then time N messages from the first connection to the sink's count
    (and the target's CPU seconds, read by ``cpu``, meanwhile).  ``warm``: also wait (up to
    30 s) after the warm-up messages until it answers True."""
    send = lambda count: smtp_source(  # noqa: E731
        port, count, args.sessions, args.size, SENDER, RECIPIENT, args.timeout, children)
    result = Result(name, args.messages, problems=[])
    ok, out = send(WARMUP)
    if not ok or sink.wait_for(WARMUP, 30.0) is None:
        result.problems.append(f"warm-up failed (sink counted {sink.count}/{WARMUP}): {out}")
        return result
    if warm is not None and not wait_until(warm, 30.0):
        result.problems.append("warm-up: the gateway did not settle within 30 s")
    cpu_before = cpu()
    started = time.monotonic()
    ok, out = send(args.messages)
    result.accept_s = time.monotonic() - started
    if not ok:
        result.problems.append(f"smtp-source: {out or 'failed'}")
    done = sink.wait_for(WARMUP + args.messages, max(1.0, args.timeout - result.accept_s))
    result.deliver_s = done - started if done is not None else None
    result.cpu_s = cpu() - cpu_before
    result.delivered = sink.settle(1.0) - WARMUP
    if result.delivered != args.messages:
        result.problems.append(f"sink counted {result.delivered} of {args.messages} messages")
    return result


def run_sink(args: argparse.Namespace, children: Children, base: Path) -> Result:
    (port,) = free_ports(1)
    sink = Sink(children, port)
    try:
        return measure("sink", port, sink, args, children, lambda: cpu_seconds(sink.proc.pid))
    finally:
        Children.terminate(sink.proc)


def run_postfix(args: argparse.Namespace, children: Children, base: Path) -> Result:
    sink_port, port = free_ports(2)
    sink = Sink(children, sink_port)
    postfix = PostfixRelay(base / "postfix", port, sink_port)
    children.cleanups.append(postfix.stop)
    sampler = TreeSampler(lambda: postfix.master_pid)
    try:
        postfix.start()
        sampler.start()
        master = postfix.master_pid
        assert master is not None
        result = measure("postfix", port, sink, args, children, lambda: tree_cpu_seconds(master))
        sampler.sample()
        result.rss_kb = sampler.peak_kb
    finally:
        sampler.stop()
        postfix.stop()
        Children.terminate(sink.proc)
    # The master is gone when ``stop`` returns; its children end on their own a moment later.
    wait_until(lambda: not sampler.survivors(), 10.0, step=0.1)
    if left := sampler.survivors():
        result.problems.append(f"Postfix processes left after stop: {left}")
    return result


def gateway_config(port: int, sink_port: int, args: argparse.Namespace) -> dict[str, dict[str, object]]:
    return {
        "node": {"name": "bench", "data_dir": "var", "event_loop": args.event_loop},
        "database": {"url": "sqlite:///var/mailgate.db"},
        "company": {"name": "Bench Trading", "domains": ["acme.test"], "language": "en"},
        "upstream": {"host": HOST, "submission_port": sink_port, "submission_security": "none",
                     "imap_security": "none"},
        "smtp": {"listen": HOST, "submission_port": port, "smtps_port": 0, "hostname": "gw.acme.test",
                 "trusted_networks": ["127.0.0.0/8"], "processes": args.smtp_processes},
        "relay": {"host": HOST, "port": sink_port, "security": "none", "mode": "relay_account",
                  "username": "relay@acme.test", "password": "bench-only", "workers": args.relay_workers},
        "imap": {"listen": HOST, "starttls_port": 0, "tls_port": 0},
        "metrics": {"port": 0},
        "rules": {"dir": str(REPO / "rules")},
        "dkim": {"enabled": args.dkim},
    }


def queue_states(db: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return dict(conn.execute("SELECT state, COUNT(*) FROM outboundmessage GROUP BY state"))


def indexed(db: Path) -> int:
    """Archive records the node's background indexer has indexed (0 before its tables exist)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return conn.execute("SELECT COUNT(*) FROM archivesearchdoc").fetchone()[0]
    except sqlite3.Error:
        return 0


def cpu_by_role(root: int) -> dict[str, float]:
    """CPU seconds of the gateway's processes by role (the node, its relay process, the
    archive's text-extraction workers, acceptor processes), and of each role's kernel time
    (``<role> sys``: fsyncs, sockets)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for pid in process_tree(root):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        role = ("node" if pid == root else "relay" if b"gateway.relayproc" in cmd
                else "extraction" if b"spawn_main" in cmd else "acceptor" if b"acceptor" in cmd else "other")
        # utime stime cutime cstime: the process and the children it reaped.
        out[role] = out.get(role, 0.0) + sum(int(f) for f in fields[11:15]) / tick
        out[f"{role} sys"] = out.get(f"{role} sys", 0.0) + (int(fields[12]) + int(fields[14])) / tick
    return out


def sum_cpu(snapshot: dict[str, float]) -> float:
    return sum(v for k, v in snapshot.items() if not k.endswith(" sys"))


def by_role(title: str, before: dict[str, float], after: dict[str, float], messages: int) -> None:
    print(f"{title}: " + ", ".join(
        f"{role} {(after[role] - before.get(role, 0.0)) / messages * 1000:.2f}"
        f" ({(after[f'{role} sys'] - before.get(f'{role} sys', 0.0)) / messages * 1000:.2f})"
        for role in sorted(after) if not role.endswith(" sys") and role != "other"))


def run_gateway(args: argparse.Namespace, children: Children, base: Path) -> Result:
    sink_port, port = free_ports(2)
    sink = Sink(children, sink_port, announce_auth=args.sink_auth)
    node = GatewayNode(children, base / "gateway", gateway_config(port, sink_port, args))
    profiler: subprocess.Popen | None = None
    try:
        node.start()
        assert node.proc is not None
        if args.py_spy:
            profiler = children.spawn(
                ["py-spy", "record", "--pid", str(node.proc.pid), "--subprocesses", "--threads", "--nonblocking",
                 "--format", "raw", "--output", str(Path(args.py_spy).resolve()),
                 "--rate", str(args.py_spy_rate),
                 *(["--gil"] if args.py_spy_gil else []), *(["--idle"] if args.py_spy_idle else [])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        pid = node.proc.pid
        snapshots: list[dict[str, float]] = []

        def cpu() -> float:
            snapshots.append(cpu_by_role(pid))
            return sum_cpu(snapshots[-1])

        # The node and its relay process (relay.process = "separate").
        # Warm means the archive indexer has indexed the warm-up messages: its text extraction
        # worker processes start at its first batch, and their start-up (imports, ~1.5 s CPU
        # each) would otherwise be counted against the measured messages.
        result = measure("gateway", port, sink, args, children, cpu, warm=lambda: indexed(node.db) >= WARMUP)
        if len(snapshots) == 2:
            by_role("gateway CPU ms/msg by process (of it in the kernel)", *snapshots, args.messages)
            # The search index may lag behind a burst ([archive] index_lag) and catch up after
            # it: that work is part of every message's cost, so it is measured and shown too.
            started = time.monotonic()
            if wait_until(lambda: indexed(node.db) >= WARMUP + args.messages, args.timeout, step=0.1):
                catch_up = time.monotonic() - started
                total = (cpu() - sum_cpu(snapshots[0])) / args.messages * 1000
                print(f"gateway search index: caught up {catch_up:.1f} s after the sink counted all;"
                      f" CPU ms/msg with the catch-up {total:.2f}")
                by_role("  by process with the catch-up", snapshots[0], snapshots[-1], args.messages)
            else:
                result.problems.append(f"the search index did not catch up within {args.timeout} s")
        result.rss_kb = node.peak_rss_kb()
    finally:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            with contextlib.suppress(subprocess.TimeoutExpired):
                profiler.wait(30)
        code = node.stop()
        Children.terminate(sink.proc)
    if code not in (0, -signal.SIGTERM):
        result.problems.append(f"mailgate exited with {code}: {node.log_tail(5)}")
    for line in node.log_text().splitlines():  # where each committer's time went (logged at stop)
        if "group commit:" in line:
            print("gateway " + line[line.index("group commit:"):])
    if errors := [line for line in node.log_text().splitlines() if " ERROR " in line or "Traceback" in line]:
        result.problems.append(f"{len(errors)} error lines in {node.log}, first: {errors[0]}")
    states = queue_states(node.db)
    if states != {"sent": WARMUP + args.messages}:
        result.problems.append(f"queue rows by state: {states} (expected all {WARMUP + args.messages} 'sent')")
    return result


RUNNERS: dict[str, Callable[[argparse.Namespace, Children, Path], Result]] = {
    "sink": run_sink, "postfix": run_postfix, "gateway": run_gateway,
}


def fmt(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def report(results: dict[str, Result], args: argparse.Namespace, load: float, end_load: float) -> None:
    print(f"\n{args.messages} messages of {args.size} bytes, {args.sessions} sessions, a connection per "
          f"message; {os.cpu_count()} CPUs, load average {load:.1f} at the start, {end_load:.1f} at the end; "
          f"gateway smtp.processes = {args.smtp_processes}, event loop {args.event_loop}")
    print(f"{'target':<9}{'delivered':>11}{'accept s':>10}{'accept/s':>10}{'e2e s':>8}{'msg/s':>8}"
          f"{'CPU ms/msg':>12}{'peak RSS':>10}")
    for r in results.values():
        rss = f"{r.rss_kb / 1024:.0f} MB" if r.rss_kb else "-"
        cpu = r.cpu_s / r.messages * 1000 if r.cpu_s is not None and r.deliver_s else None
        print(f"{r.target:<9}{r.delivered:>6}/{r.messages:<4}{fmt(r.accept_s, '.2f'):>10}"
              f"{fmt(r.accept_rate, '.0f'):>10}{fmt(r.deliver_s, '.2f'):>8}{fmt(r.rate, '.0f'):>8}"
              f"{fmt(cpu, '.2f'):>12}{rss:>10}")
    if "gateway" in results and (gw := results["gateway"].rate) is not None:
        for other in ("sink", "postfix"):
            if other in results and (rate := results[other].rate):
                print(f"gateway / {other}: {gw / rate:.2f}x")
    print("e2e: first message sent -> the sink has counted all; CPU: the target's processes only "
          "(Postfix: master + children; gateway: node + relay + acceptor processes); RSS: gateway VmHWM summed, "
          "Postfix summed PSS sampled every 0.1 s")
    for r in results.values():
        for problem in r.problems or []:
            print(f"PROBLEM {r.target}: {problem}")


def stray_processes(base: Path, pids: list[int]) -> list[str]:
    """Our processes still running: by pid, and anything naming our temp dir."""
    found = subprocess.run(["pgrep", "-af", str(base)], capture_output=True, text=True).stdout.splitlines()
    return found + [f"{pid} (a child)" for pid in pids if is_alive(pid)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000, help="messages per target (default: %(default)s)")
    ap.add_argument("--sessions", type=int, default=20, help="parallel smtp-source sessions (default: %(default)s)")
    ap.add_argument("--size", type=int, default=5120, help="message payload bytes (default: %(default)s)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of %(default)s")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per target before giving up")
    ap.add_argument("--relay-workers", type=int, default=4, help="gateway relay workers (default: %(default)s)")
    ap.add_argument("--smtp-processes", type=int, default=1,
                    help="gateway smtp.processes: processes accepting on the port (default: %(default)s)")
    ap.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio",
                    help="the gateway's [node] event_loop (default: %(default)s)")
    ap.add_argument("--dkim", action="store_true", help="let the gateway DKIM-sign (RSA + Ed25519)")
    ap.add_argument("--sink-auth", action="store_true",
                    help="let the gateway's sink announce AUTH (smtp-sink answers AUTH with 250, not 235)")
    ap.add_argument("--py-spy", metavar="FILE", help="profile the gateway with py-spy (collapsed stacks)")
    ap.add_argument("--py-spy-rate", type=int, default=100, metavar="HZ",
                    help="with --py-spy: samples a second (default: 100)")
    ap.add_argument("--py-spy-gil", action="store_true",
                    help="with --py-spy: sample only threads holding the GIL (CPU in Python, not waits)")
    ap.add_argument("--py-spy-idle", action="store_true",
                    help="with --py-spy: sample idle (waiting) threads too: a wall-clock profile of waits")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every target this many times, interleaved, and print the medians (default: 1)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs, DB)")
    args = ap.parse_args()
    args.targets = [t for t in args.targets.split(",") if t]
    if unknown := set(args.targets) - set(TARGETS):
        ap.error(f"unknown targets: {', '.join(sorted(unknown))}")
    for tool in ("smtp-source", "smtp-sink", "postfix"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} not found (Debian package postfix)")

    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load = os.getloadavg()[0]  # other work on the machine skews every figure
    base = Path(tempfile.mkdtemp(prefix="bench-smtp-"))
    base.chmod(0o755)  # Postfix's processes (user postfix) must reach their dirs below
    children = Children()
    rounds: list[tuple[list[float], dict[str, Result]]] = []  # (load at start and end, results)
    try:
        for n in range(max(1, args.rounds)):
            # Rounds interleave the targets, so that a machine whose speed drifts (other work,
            # throttling) affects each about equally; every round starts from fresh directories.
            results: dict[str, Result] = {}
            loads = [os.getloadavg()[0]]
            rounds.append((loads, results))
            where = base / f"round{n + 1}" if args.rounds > 1 else base
            where.mkdir(exist_ok=True)
            for target in args.targets:
                print(f"{target} ...", flush=True)
                try:
                    results[target] = RUNNERS[target](args, children, where)
                except (RuntimeError, OSError, subprocess.SubprocessError, sqlite3.Error) as exc:
                    results[target] = Result(target, args.messages, problems=[f"{type(exc).__name__}: {exc}"])
            loads.append(os.getloadavg()[0])
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        pids = [p.pid for p in children.procs]
        children.close()
        if stray := stray_processes(base, pids):
            print(f"PROBLEM stray processes: {stray}", file=sys.stderr)
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    for n, (loads, results) in enumerate(rounds):
        if len(rounds) > 1:
            print(f"\n== round {n + 1} of {len(rounds)}")
        report(results, args, load if n == 0 else loads[0], loads[-1] if len(loads) > 1 else os.getloadavg()[0])
    if len(rounds) > 1:
        summarize([results for _, results in rounds])
    every = [r for _, results in rounds for r in results.values()]
    return 0 if every and all(not r.problems for r in every) else 1


def summarize(rounds: list[dict[str, Result]]) -> None:
    """Medians over the rounds: each target's msg/s, and the gateway's ratios round by round
    (a ratio is only meaningful within one round: the machine's speed drifts between them)."""
    print(f"\nmedians over {len(rounds)} rounds (e2e msg/s; ratios taken within each round):")
    for target in rounds[0]:
        rates = [r[target].rate for r in rounds if target in r and r[target].rate is not None]
        if rates:
            each = " ".join(f"{x:.0f}" for x in rates)
            print(f"  {target:<9}{statistics.median(rates):>8.0f} msg/s   rounds: {each}")
    for other in ("sink", "postfix"):
        ratios = [r["gateway"].rate / r[other].rate for r in rounds
                  if "gateway" in r and other in r and r["gateway"].rate and r[other].rate]
        if ratios:
            print(f"  gateway / {other}: {statistics.median(ratios):.2f}x   rounds: "
                  + " ".join(f"{x:.2f}" for x in ratios))


if __name__ == "__main__":
    sys.exit(main())
