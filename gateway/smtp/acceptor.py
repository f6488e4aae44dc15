"""More SMTP acceptor processes on the same ports (``smtp.processes`` > 1).

One Python process accepts, parses, decides and stores on one core (the GIL).  With
``smtp.processes = N`` the node starts N - 1 children that listen on the same submission
ports with SO_REUSEPORT (the kernel spreads new connections over every listening socket)
and run the same submission path: directory, policy and rules (each reloads on change,
like the node's), DKIM, archive record and queue row through a group committer of their
own.  SQLite in WAL mode lets several processes write (each batch takes the write lock with
``BEGIN IMMEDIATE``), and the archive hash chain is serialized by its head row, so
nothing here depends on which process accepted a message.  Relay workers and the archive
indexer stay in the node; a child tells the node "something was queued" through a pipe.

A child dies with the node (PR_SET_PDEATHSIG) or when its pipe closes, and stops on
SIGTERM as the node does: it closes its listeners, drains its sessions (421 to the idle ones,
the busy ones finish their command first — a message being received or committed gets its
250 —, at most ``server.SESSION_GRACE``; gateway/smtp/server.py), lets its group committer
finish the batch in hand (nobody heard 250 for anything not committed) and exits.

Per-process state: the upstream-login cache is kept per process, and ``smtp.max_sessions`` is
split between the processes.  Login penalties count the failures of every process and node
(gateway/loginfail.py: each process polls the shared record; attempts in flight per process).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("mailgate.smtp")

DIRECTORY_REFRESH = 2.0


class AcceptorProcesses:
    """The node's handle on its acceptor children; ``on_queued`` is called (on the node's
    event loop) when a child queued a message."""

    def __init__(self, config_path: Path, count: int, on_queued: Any, log_level: str = "INFO"):
        self.config_path = config_path
        self.count = count
        self.on_queued = on_queued
        self.log_level = log_level
        self.procs: list[subprocess.Popen] = []
        self._read_fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        from gateway.relayproc import _die_with_parent

        read_end, write_end = os.pipe()
        try:
            for index in range(1, self.count + 1):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "gateway.smtp.acceptor", "-c", str(self.config_path),
                     "--queued-fd", str(write_end), "--index", str(index), "--log-level", self.log_level],
                    pass_fds=(write_end,), preexec_fn=_die_with_parent,
                ))
        finally:
            os.close(write_end)
        os.set_blocking(read_end, False)
        self._read_fd, self._loop = read_end, loop
        loop.add_reader(read_end, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._read_fd, 4096) if self._read_fd is not None else b""
        except BlockingIOError:
            return
        if not data:  # every child is gone
            self._close_reader()
            return
        self.on_queued()

    def _close_reader(self) -> None:
        if self._read_fd is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._read_fd)
            os.close(self._read_fd)
            self._read_fd = None

    def alive(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def terminate(self) -> None:
        """SIGTERM every child: each begins its stop (drains its sessions) at once."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every child (again: harmless) and wait, each killed after ``timeout``
        seconds (blocking: call in a thread)."""
        self.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []


class _Notify:
    """``on_queued`` in a child: one byte to the node (a full pipe means one is pending)."""

    def __init__(self, fd: int):
        self.fd = fd
        os.set_blocking(fd, False)

    def __call__(self) -> None:
        try:
            os.write(self.fd, b"!")
        except BlockingIOError:
            pass
        except OSError:
            log.warning("acceptor: the node is gone; queued mail waits for its relay")


async def serve(cfg: Any, queued_fd: int, index: int) -> None:
    """The child: the node's submission path on the shared ports until SIGTERM."""
    from gateway.smtp.stack import build_submission, refresh_directory

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    stack = await build_submission(cfg, on_queued=_Notify(queued_fd), stopping=stop, processes=cfg.smtp.processes)
    tasks = [asyncio.create_task(refresh_directory(stack.directory, stop, DIRECTORY_REFRESH))]
    tasks.extend(stack.tasks)
    log.info("smtp acceptor %d ready (pid %d)", index, os.getpid())
    await stop.wait()
    for server in stack.servers:
        server.close()
    await stack.sessions.drain()
    await asyncio.to_thread(stack.committer.stop)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    log.info("smtp acceptor %d stopped", index)


def main(argv: list[str] | None = None) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from gateway.cli import _load, _setup_logging
    from gateway.db import connect
    from gateway.logformat import use_formatter

    parser = argparse.ArgumentParser(prog="gateway.smtp.acceptor")
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--queued-fd", type=int, required=True)
    parser.add_argument("--index", type=int, default=1)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    cfg = _load(args.config)
    _setup_logging(args.log_level)
    use_formatter(f"%(asctime)s %(name)s[acceptor{args.index}] %(levelname)s %(message)s")  # which process
    connect(cfg.database.url, migrate=False)
    from gateway.eventloop import new_event_loop
    from gateway.service import IO_THREADS

    loop = new_event_loop(cfg.node.event_loop)
    loop.set_default_executor(ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="io"))
    try:
        loop.run_until_complete(serve(cfg, args.queued_fd, args.index))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
