"""One node: every service in one process, one event loop (ARCHITECTURE §2).

Twisted runs on the asyncio loop (asyncioreactor), so the Twisted IMAP proxy
and the aiosmtpd submission servers share it.  ``Node.start`` composes the
services in dependency order; ``Node.stop`` takes them down in reverse.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

from gateway.archive import Archive
from gateway.areas import AREA_SERVICES, optional_module
from gateway.config import Config
from gateway.directory import Directory
from gateway.groupcommit import GroupCommitter
from gateway.policy import Policy
from gateway.smtp.auth import UpstreamAuthenticator
from gateway.smtp.guard import LoginGuard
from gateway.spool import Spool

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
        self.imap_ports: list = []
        self.workers: list = []
        self.relay_process = None
        self.directory = Directory(cfg.company.domains, cfg.public_mail_domains)
        self.policy = Policy(self.directory)
        self.archive = Archive(cfg.archive_dir)
        # Accepted mail is queued as its archive blob (gateway/spool.py): the relay reads it there.
        self.spool = Spool(cfg.spool_dir, node="" if cfg.node.shared_spool else cfg.node.name, archive=self.archive)
        self.committer = GroupCommitter()
        self.area_stoppers: list = []

    async def start(self, reactor=None) -> None:
        from gateway.approval import ApprovalService
        from gateway.credentials import load_or_create_key
        from gateway.dkim import signing_mutation
        from gateway.relay import RelayWorker, release_node_claims
        from gateway.rules import actions
        from gateway.rules.env import DepartmentIndex, DomainHistory, RuleEnv
        from gateway.rules.watcher import initial_load, watch_rules
        from gateway.smtp.handler import SubmissionHandler
        from gateway.smtp.server import start_smtp

        cfg = self.cfg
        await asyncio.to_thread(self.directory.load)
        await asyncio.to_thread(self.spool.sweep_orphans)
        released = await asyncio.to_thread(release_node_claims, cfg.node.name)
        if released:
            log.info("released %d queue claims left by an earlier run of node %s", released, cfg.node.name)
        key = await asyncio.to_thread(load_or_create_key, cfg.relay.credentials_key)
        self.rule_env = RuleEnv(
            departments=DepartmentIndex(), history=DomainHistory(), company=cfg.company.name,
            company_domains=tuple(cfg.company.domains),
        )
        self.rule_reloader = await asyncio.to_thread(initial_load, self.policy, cfg, env=self.rule_env)
        self.sign = await asyncio.to_thread(signing_mutation, cfg)
        self.approvals = ApprovalService(
            cfg, self.directory, self.spool, policy=self.policy,
            signer=self.sign.signer if self.sign else None, on_released=self.wake_relay,
        )
        actions.NOTIFIER = self.approvals.notifier
        if cfg.relay.process == "separate":
            from gateway.relayproc import RelayProcess

            self.relay_process = RelayProcess(cfg.path, logging.getLevelName(logging.getLogger().level))
            self.relay_process.start()
        else:
            self.workers = [
                RelayWorker(cfg, self.spool, f"{cfg.node.name}-relay{i}", key, committer=self.committer)
                for i in range(cfg.relay.workers)
            ]
        handler = SubmissionHandler(
            cfg, self.directory, self.policy, self.spool, self.archive,
            UpstreamAuthenticator(cfg),
            LoginGuard(cfg.smtp.auth_fail_base_delay, cfg.smtp.auth_fail_max_delay, cfg.smtp.auth_fail_window),
            credentials_key=key,
            on_queued=self.wake_relay,
            approvals=self.approvals,
            sign=self.sign,
            rule_env=self.rule_env,
            committer=self.committer,
        )
        self.smtp_servers = await start_smtp(cfg, handler)
        for w in self.workers:
            self.tasks.append(asyncio.create_task(w.run(self.stopping), name=w.name))
        self.tasks.append(asyncio.create_task(self._refresh_directory(), name="directory-refresh"))
        self.tasks.append(asyncio.create_task(
            watch_rules(self.policy, cfg, self.stopping, reloader=self.rule_reloader), name="rule-watcher"))
        self.tasks.append(asyncio.create_task(self._expire_approvals(), name="approval-expiry"))
        if reactor is not None:
            from gateway.imap.service import listen_imap

            self.imap_ports = listen_imap(cfg, self.directory, reactor)
        for name in AREA_SERVICES:
            module = optional_module(name)
            if module is not None:
                stopper = await module.start(self, reactor)
                if stopper is not None:
                    self.area_stoppers.append(stopper)
        self._start_metrics()
        log.info(
            "mailgate ready: node=%s smtp=%s:%s,%s imap=%s:%s,%s",
            cfg.node.name, cfg.smtp.listen, cfg.smtp.submission_port, cfg.smtp.smtps_port,
            cfg.imap.listen, cfg.imap.starttls_port, cfg.imap.tls_port,
        )

    def wake_relay(self) -> None:
        for w in self.workers:
            w.wakeup()
        if self.relay_process is not None:
            self.relay_process.wakeup()

    async def _refresh_directory(self) -> None:
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), DIRECTORY_REFRESH)
            except TimeoutError:
                pass
            try:
                await asyncio.to_thread(self.directory.refresh)
            except Exception:
                log.exception("directory refresh failed; keeping the last good index")

    async def _expire_approvals(self) -> None:
        while not self.stopping.is_set():
            try:
                await asyncio.to_thread(self.approvals.expire_due)
            except Exception:
                log.exception("approval expiry failed")
            try:
                await asyncio.wait_for(self.stopping.wait(), APPROVAL_EXPIRY_INTERVAL)
            except TimeoutError:
                pass

    def _start_metrics(self) -> None:
        if not self.cfg.metrics.port:
            return
        from prometheus_client import start_http_server

        from gateway.metrics import exposition_registry

        start_http_server(self.cfg.metrics.port, self.cfg.metrics.listen, registry=exposition_registry())

    async def stop(self) -> None:
        self.stopping.set()
        for stopper in reversed(self.area_stoppers):
            try:
                await stopper()
            except Exception:
                log.exception("an area service failed while stopping")
        for server in self.smtp_servers:
            server.close()
        await asyncio.to_thread(self.committer.stop)
        if self.relay_process is not None:
            await asyncio.to_thread(self.relay_process.stop)
        for port in self.imap_ports:
            await asyncio.ensure_future(_deferred(port.stopListening()))
        for task in self.tasks:
            try:
                await asyncio.wait_for(task, 10)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
            except Exception:
                log.exception("task %s failed while stopping", task.get_name())



async def _deferred(d) -> None:
    if d is not None and hasattr(d, "asFuture"):
        await d.asFuture(asyncio.get_running_loop())


def run(cfg: Config, on_ready=None) -> int:
    """Run a node until SIGTERM/SIGINT.  Returns the exit status.

    ``on_ready`` is called once every service listens (the demo prints its banner then)."""
    loop = asyncio.new_event_loop()
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
