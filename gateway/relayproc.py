"""The relay workers in a process of their own, so a node uses a second core.

The SMTP side and the relay are both CPU-bound Python; in one process they share
one core (the GIL).  With ``relay.process = "separate"`` the node starts this
module as a child: it runs the same ``RelayWorker``s with its own group
committer (outcomes whose commit failed are recorded again there too; those a stop leaves
unrecorded after ``relay.CLOSE_WAIT`` go to the node's outcome journal, which the node
applies at its next start before starting this process: ``gateway.relayjournal``); a stop
ends a delivery under way as in the node (gateway/relay.py, "Stopping": its end of data
within 2 s, its reply within 7 s of the SIGTERM, well inside the 15 s the parent waits
before it kills the child).  The parent wakes it through a pipe (one byte per "something
was queued"); the child stops on SIGTERM, when the pipe closes, and — through
PR_SET_PDEATHSIG — when the parent is killed, so a restarted node never has a
second relay for the same spool.  Relay counters are shared with the parent's
/metrics through prometheus-client's multiprocess mode (``gateway.metrics``).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("mailgate.relay")

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class RelayProcess:
    """The parent's handle on the child."""

    def __init__(self, config_path: Path, log_level: str = "INFO"):
        self.config_path = config_path
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None
        self._wake_w: int | None = None

    def start(self) -> None:
        read_end, write_end = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.relayproc", "-c", str(self.config_path),
             "--wake-fd", str(read_end), "--log-level", self.log_level],
            pass_fds=(read_end,), preexec_fn=_die_with_parent,
        )
        os.close(read_end)
        os.set_blocking(write_end, False)
        self._wake_w = write_end

    def wakeup(self) -> None:
        if self._wake_w is None:
            return
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass  # the pipe is full: a wake-up is pending already
        except OSError:
            log.warning("relay process is gone; queued mail waits for a restart")

    def terminate(self) -> None:
        """Begin the child's stop (SIGTERM; its workers claim nothing more from now on)."""
        if self._wake_w is not None:
            os.close(self._wake_w)
            self._wake_w = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        """``terminate`` and wait for the child, killed after ``timeout`` seconds (blocking)."""
        self.terminate()
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


async def run_workers(cfg, wake_fd: int) -> None:
    from gateway.archive import for_config
    from gateway.credentials import load_or_create_key
    from gateway.groupcommit import GroupCommitter
    from gateway.relay import RelayWorker
    from gateway.relayjournal import OutcomeJournal, journal_path
    from gateway.spool import Spool

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # Accepted mail is queued as its archive blob (gateway/spool.py): read through the archive.
    spool = Spool(cfg.spool_dir, node="" if cfg.node.shared_spool else cfg.node.name, archive=for_config(cfg))
    key = await asyncio.to_thread(load_or_create_key, cfg.relay.credentials_key)
    # Outcomes are posted, nobody waits for them: let a batch gather for 20 ms, so the relay
    # takes the database write lock (which the node's SMTP commits need) less often.
    committer = GroupCommitter(linger=0.02)
    # The node's journal (the node recorded what it could at its start, before starting us):
    # outcomes this process cannot record go there too.
    journal = await asyncio.to_thread(OutcomeJournal, journal_path(cfg.node.data_dir, cfg.node.name))
    workers = [
        RelayWorker(cfg, spool, f"{cfg.node.name}-relay{i}", key, committer=committer, journal=journal)
        for i in range(cfg.relay.workers)
    ]

    def on_wake() -> None:
        try:
            data = os.read(wake_fd, 4096)
        except BlockingIOError:
            return
        if not data:  # the parent closed the pipe: it is stopping or gone
            loop.remove_reader(wake_fd)
            stop.set()
            return
        for worker in workers:
            worker.wakeup()

    os.set_blocking(wake_fd, False)
    loop.add_reader(wake_fd, on_wake)
    # Start-up objects out of the full GC's walks, as in the node (gateway.smtp.stack).
    gc.collect()
    gc.freeze()
    log.info("relay process started: %d workers", len(workers))
    await asyncio.gather(*(w.run(stop) for w in workers))
    await asyncio.to_thread(committer.stop)


def main(argv: list[str] | None = None) -> int:
    from gateway.cli import _load, _setup_logging
    from gateway.db import connect

    parser = argparse.ArgumentParser(prog="gateway.relayproc")
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--wake-fd", type=int, required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    cfg = _load(args.config)
    _setup_logging(args.log_level)
    connect(cfg.database.url, migrate=False)
    from gateway.eventloop import new_event_loop

    loop = new_event_loop(cfg.node.event_loop)
    try:
        loop.run_until_complete(run_workers(cfg, args.wake_fd))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
