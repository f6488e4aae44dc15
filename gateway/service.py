"""One node: every service in one process, one event loop (docs/ARCHITECTURE.md §1).

Twisted runs on the asyncio loop (asyncioreactor), so the Twisted IMAP proxy
and the aiosmtpd submission servers share it.  ``Node.start`` composes the
services in dependency order; ``Node.stop`` takes them down in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from gateway.archive import Archive, pending
from gateway.areas import AREA_SERVICES, optional_module
from gateway.config import Config
from gateway.db import statistics
from gateway.directory import Directory
from gateway.eventloop import new_event_loop
from gateway.groupcommit import GroupCommitter
from gateway.periodic import periodically
from gateway.policy import Policy
from gateway.smtp.stack import node_spool, refresh_directory
from gateway.spool import SWEEP_INTERVAL

log = logging.getLogger("mailgate")

DIRECTORY_REFRESH = 2.0

APPROVAL_EXPIRY_INTERVAL = 60.0
IO_THREADS = 32


class Node:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.smtp_servers: list[asyncio.AbstractServer] = []
        self.smtp_sessions = None  # gateway.smtp.server.SessionDrain
        self.imap_ports: list = []
        self.workers: list = []
        self.relay_process = None
        self.directory = Directory(cfg.company.domains, cfg.public_mail_domains)
        self.policy = Policy(self.directory)
        self.archive = Archive(cfg.archive_dir)
        self.spool = node_spool(cfg, self.archive)
        self.acceptors = None  # gateway.smtp.acceptor.AcceptorProcesses when smtp.processes > 1
        self.committer = GroupCommitter()
        self.blob_syncer: pending.BlobSyncer | None = None
        self.area_stoppers: list = []

    async def start(self, reactor=None) -> None:
        from gateway.credentials import load_or_create_key
        from gateway.relay import RelayWorker, apply_outcome_journal, release_node_claims
        from gateway.relayjournal import OutcomeJournal, journal_path
        from gateway.smtp.stack import build_submission

        cfg = self.cfg
        await asyncio.to_thread(self.directory.load)
        await asyncio.to_thread(self.spool.sweep_orphans)
        # Blob files whose sealed bytes are still in the database (an unclean stop before they
        # were synced): written again before anything reads them; then their syncer.
        self.archive.configure(cfg)
        await asyncio.to_thread(pending.recover, self.archive.store, cfg.node.name)
        self.blob_syncer = pending.BlobSyncer(self.archive.store, cfg.node.name, cfg.archive.blob_sync_interval)
        self.blob_syncer.start()
        self.archive.sync_later = True
        key = await asyncio.to_thread(load_or_create_key, cfg.relay.credentials_key)
        # Relay outcomes an earlier run could not record (the database away) are recorded before
        # its claims are released: else those messages would be delivered again (gateway/relayjournal.py).
        journal = await asyncio.to_thread(OutcomeJournal, journal_path(cfg.node.data_dir, cfg.node.name))
        if len(journal):
            recorded = await asyncio.to_thread(apply_outcome_journal, cfg, self.spool, key, journal)
            log.info("recorded %d relay outcomes from the journal of node %s (%d still waiting)", recorded,
                     cfg.node.name, len(journal))
        released = await asyncio.to_thread(release_node_claims, cfg.node.name)
        if released:
            log.info("released %d queue claims left by an earlier run of node %s", released, cfg.node.name)
        if cfg.relay.process == "separate":
            from gateway.relayproc import RelayProcess

            self.relay_process = RelayProcess(cfg.path, logging.getLevelName(logging.getLogger().level))
            self.relay_process.start()
        else:
            self.workers = [
                RelayWorker(cfg, self.spool, f"{cfg.node.name}-relay{i}", key, committer=self.committer,
                            journal=journal)
                for i in range(cfg.relay.workers)
            ]
        stack = await build_submission(
            cfg, on_queued=self.wake_relay, stopping=self.stopping, processes=cfg.smtp.processes,
            directory=self.directory, policy=self.policy, archive=self.archive, spool=self.spool,
            committer=self.committer, key=key,
        )
        self.rule_env, self.sign, self.approvals = stack.rule_env, stack.sign, stack.approvals
        self.smtp_servers, self.smtp_sessions = stack.servers, stack.sessions
        self.tasks.extend(stack.tasks)
        if cfg.smtp.processes > 1:
            from gateway.smtp.acceptor import AcceptorProcesses

            self.acceptors = AcceptorProcesses(cfg.path, cfg.smtp.processes - 1, self.wake_relay,
                                               logging.getLevelName(logging.getLogger().level))
            self.acceptors.start(asyncio.get_running_loop())
        for w in self.workers:
            self.tasks.append(asyncio.create_task(w.run(self.stopping), name=w.name))
        self.tasks.append(asyncio.create_task(
            refresh_directory(self.directory, self.stopping, DIRECTORY_REFRESH), name="directory-refresh"))
        self.tasks.append(asyncio.create_task(periodically(
            self.stopping, self.approvals.expire_due, APPROVAL_EXPIRY_INTERVAL, first=0,
            failure="approval expiry failed"), name="approval-expiry"))
        self._start_spool_sweep()
        # SQLite planner statistics (gateway/db/statistics.py): soon after start, then every few hours.
        self.tasks.append(asyncio.create_task(periodically(
            self.stopping, statistics.refresh, statistics.INTERVAL, first=statistics.FIRST_DELAY,
            failure="refreshing database statistics failed"), name="db-statistics"))
        if reactor is not None:
            from gateway.imap.service import listen_imap

            self.imap_ports = listen_imap(cfg, self.directory, reactor)
        for name in AREA_SERVICES:
            module = optional_module(name)
            if module is not None:
                stopper = await module.start(self, reactor)
                if stopper is not None:
                    self.area_stoppers.append((name, stopper))
        self._start_metrics()
        log.info(
            "mailgate ready: node=%s smtp=%s:%s,%s imap=%s:%s,%s",
            cfg.node.name, cfg.smtp.listen, cfg.smtp.submission_port, cfg.smtp.smtps_port,
            cfg.imap.listen, cfg.imap.starttls_port, cfg.imap.tls_port,
        )

    def _start_spool_sweep(self) -> None:
        """Orphan spool files (a crash, or a COMMIT of unknown outcome that was not applied) do
        not wait for the next start: the sweep ``start`` did runs again every hour."""
        self.tasks.append(asyncio.create_task(periodically(
            self.stopping, self.spool.sweep_orphans, SWEEP_INTERVAL,
            failure="spool sweep failed"), name="spool-sweep"))

    def wake_relay(self) -> None:
        for w in self.workers:
            w.wakeup()
        if self.relay_process is not None:
            self.relay_process.wakeup()

    def _start_metrics(self) -> None:
        if not self.cfg.metrics.port:
            return
        from prometheus_client import start_http_server

        from gateway.metrics import exposition_registry

        start_http_server(self.cfg.metrics.port, self.cfg.metrics.listen, registry=exposition_registry())

    async def stop(self) -> None:
        """Producers first, then what they write through.  At once: ``stopping`` (the inline
        relay workers claim nothing more), the SMTP listeners closed, SIGTERM to the acceptor
        and relay processes (each stops the same way, alongside), and the drain of the SMTP
        sessions begins (421 to the idle ones; one in DATA or in its commit gets its 250 first;
        gateway/smtp/server.py).  Meanwhile the areas stop (archive indexer and sync,
        distribution).  Then the drain's end, the children's exit, the IMAP listeners, the
        node's tasks (the inline relay workers, which record their last outcomes through the
        group committer as they end, or journal them: gateway/relayjournal.py); only then the
        group committer (the jobs queued so far committed; a job after it raises
        ``CommitterStopped``) and a last blob sync.  Each step is bounded (docs/ARCHITECTURE.md §1)."""
        self.stopping.set()
        log.info("mailgate stopping: node=%s", self.cfg.node.name)
        for server in self.smtp_servers:
            server.close()
        if self.acceptors is not None:
            self.acceptors.terminate()
        if self.relay_process is not None:
            self.relay_process.terminate()
        drain = None
        if self.smtp_sessions is not None:
            drain = asyncio.create_task(self.smtp_sessions.drain(), name="smtp-drain")
        for name, stopper in reversed(self.area_stoppers):
            async with _timed_step(name):
                try:
                    await stopper()
                except Exception:
                    log.exception("an area service failed while stopping")
        if drain is not None:
            async with _timed_step("smtp sessions"):
                await drain
        if self.acceptors is not None:
            async with _timed_step("smtp acceptors"):
                await asyncio.to_thread(self.acceptors.stop)
        if self.relay_process is not None:
            async with _timed_step("relay process"):
                await asyncio.to_thread(self.relay_process.stop)
        for port in self.imap_ports:
            await asyncio.ensure_future(_deferred(port.stopListening()))
        await _finish_tasks(self.tasks, TASK_GRACE)
        async with _timed_step("group commit"):
            await asyncio.to_thread(self.committer.stop)
            if self.blob_syncer is not None:  # a last round, after the last commit: no row left behind
                await asyncio.to_thread(self.blob_syncer.stop)
        log.info("mailgate stopped: node=%s", self.cfg.node.name)


TASK_GRACE = 10.0  # seconds the node's tasks get, together, to end after ``stopping`` is set


async def _finish_tasks(tasks: list[asyncio.Task], grace: float) -> None:
    """Wait for the node's tasks together (they all saw ``stopping``; one after the other,
    a stop could take ``grace`` per task), at most ``grace`` seconds; cancel the rest, naming them."""
    if not tasks:
        return
    async with _timed_step("tasks"):
        done, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            log.warning("task %s did not end within %g s of the stop: cancelled", task.get_name(), grace)
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("task %s failed while stopping", task.get_name(), exc_info=task.exception())


@contextlib.asynccontextmanager
async def _timed_step(what: str, slow: float = 2.0):
    """Log a shutdown step that takes longer than ``slow`` seconds (what an operator waits for)."""
    started = time.monotonic()
    try:
        yield
    finally:
        took = time.monotonic() - started
        if took > slow:
            log.warning("stopping %s took %.1f s", what, took)



async def _deferred(d) -> None:
    if d is not None and hasattr(d, "asFuture"):
        await d.asFuture(asyncio.get_running_loop())


def run(cfg: Config, on_ready=None) -> int:
    """Run a node until SIGTERM/SIGINT.  Returns the exit status.

    ``on_ready`` is called once every service listens (the demo prints its banner then)."""
    loop = new_event_loop(cfg.node.event_loop)
    asyncio.set_event_loop(loop)
    # Blocking work (fsyncs above all) runs here; parallel fsyncs share the journal's
    # commits, so more threads than cores is what keeps the disk busy, not the CPU.
    loop.set_default_executor(ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="io"))
    from twisted.internet import asyncioreactor

    asyncioreactor.install(loop)
    from twisted.internet import reactor

    node = Node(cfg)
    status = {"code": 0}

    def started(task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            exc = task.exception() if not task.cancelled() else None
            log.error("start-up failed: %s", exc)
            print(f"mailgate: start-up failed: {exc}", file=sys.stderr)
            status["code"] = 1
            reactor.stop()
        elif on_ready is not None:
            on_ready()

    def start() -> None:
        loop.create_task(node.start(reactor)).add_done_callback(started)

    def shutdown():
        return _as_deferred(node.stop())

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    reactor.run()
    return status["code"]


def _as_deferred(coro):
    from twisted.internet.defer import Deferred

    return Deferred.fromFuture(asyncio.ensure_future(coro))
