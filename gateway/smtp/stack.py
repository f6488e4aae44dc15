"""The submission path, assembled: what the node and each extra acceptor process
(gateway/smtp/acceptor.py) build to accept mail on the submission ports.

directory (loaded) → policy with the rules (+ watcher) → DKIM signer → approval service →
SubmissionHandler (archive, spool, group committer) → aiosmtpd servers.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway import loginfail
from gateway.archive import Archive
from gateway.areas import optional_module
from gateway.config import Config
from gateway.directory import Directory
from gateway.groupcommit import GroupCommitter
from gateway.periodic import periodically
from gateway.policy import Policy
from gateway.smtp.auth import UpstreamAuthenticator
from gateway.smtp.guard import LoginGuard
from gateway.spool import Spool

log = logging.getLogger("mailgate")


@dataclass
class SubmissionStack:
    directory: Directory
    policy: Policy
    spool: Spool
    archive: Archive
    committer: GroupCommitter
    approvals: Any
    sign: Any
    rule_env: Any
    handler: Any
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    sessions: Any = None  # gateway.smtp.server.SessionDrain: the open sessions, drained at a stop
    tasks: list[asyncio.Task] = field(default_factory=list)


def acceptor_archive(cfg: Config) -> Archive:
    """The archive of an acceptor process (gateway/smtp/acceptor.py)."""
    archive = Archive(cfg.archive_dir)
    archive.configure(cfg)
    # The node's archive service (when the area is there) indexes every process's records ...
    archive.defer_index = optional_module("gateway.archive.service") is not None
    # ... in the node, which reads their blobs back: nothing is kept here for an indexer (it
    # was up to 64 MB of message copies that no one took).
    archive.keep_recent = False
    archive.sync_later = True  # its node's BlobSyncer syncs the archive's file system
    return archive


def node_spool(cfg: Config, archive: Archive) -> Spool:
    # Accepted mail is queued as its archive blob (gateway/spool.py): the relay reads it there.
    return Spool(cfg.spool_dir, node="" if cfg.node.shared_spool else cfg.node.name, archive=archive)


async def build_submission(
    cfg: Config,
    *,
    on_queued: Callable[[], None],
    stopping: asyncio.Event,
    processes: int = 1,
    directory: Directory | None = None,
    policy: Policy | None = None,
    archive: Archive | None = None,
    spool: Spool | None = None,
    committer: GroupCommitter | None = None,
    key: bytes | None = None,
    on_released: Callable[[], None] | None = None,
) -> SubmissionStack:
    """Build and start the submission path (listening when this returns).  ``processes`` > 1:
    the ports are shared with that many processes in all (SO_REUSEPORT) and the session cap
    is split between them.  Objects the caller already has (the node's) are used as they are;
    anything missing is made here (an acceptor process)."""
    from gateway.approval import ApprovalService
    from gateway.credentials import load_or_create_key
    from gateway.dkim import signing_mutation
    from gateway.rules import actions
    from gateway.rules.env import DepartmentIndex, DomainHistory, RuleEnv
    from gateway.rules.watcher import initial_load, watch_rules
    from gateway.smtp.handler import SubmissionHandler
    from gateway.smtp.server import SessionDrain, start_smtp

    if directory is None:
        directory = Directory(cfg.company.domains, cfg.public_mail_domains)
        await asyncio.to_thread(directory.load)
    policy = policy or Policy(directory)
    if archive is None:
        archive = acceptor_archive(cfg)
    spool = spool or node_spool(cfg, archive)
    committer = committer or GroupCommitter()
    if key is None:
        key = await asyncio.to_thread(load_or_create_key, cfg.relay.credentials_key)
    rule_env = RuleEnv(
        departments=DepartmentIndex(), history=DomainHistory(), company=cfg.company.name,
        company_domains=tuple(cfg.company.domains),
    )
    reloader = await asyncio.to_thread(initial_load, policy, cfg, env=rule_env)
    sign = await asyncio.to_thread(signing_mutation, cfg)
    approvals = ApprovalService(
        cfg, directory, spool, policy=policy, signer=sign.signer if sign else None,
        on_released=on_released or on_queued,
    )
    actions.NOTIFIER = approvals.notifier
    shared_failures = loginfail.for_process(cfg)  # failed logins of every process and node
    handler = SubmissionHandler(
        cfg, directory, policy, spool, archive,
        UpstreamAuthenticator(cfg),
        LoginGuard(cfg.smtp.auth_fail_base_delay, cfg.smtp.auth_fail_max_delay, cfg.smtp.auth_fail_window,
                   shared=shared_failures),
        credentials_key=key,
        on_queued=on_queued,
        approvals=approvals,
        sign=sign,
        rule_env=rule_env,
        committer=committer,
    )
    stack = SubmissionStack(directory, policy, spool, archive, committer, approvals, sign, rule_env, handler)
    stack.sessions = SessionDrain()
    stack.servers = await start_smtp(cfg, handler, processes=processes, drain=stack.sessions)
    stack.tasks.append(asyncio.create_task(watch_rules(policy, cfg, stopping, reloader=reloader),
                                           name="rule-watcher"))
    stack.tasks.append(asyncio.create_task(loginfail.feed(shared_failures, stopping), name="login-failures"))
    freeze_startup_objects()
    return stack


def freeze_startup_objects() -> None:
    """Take what start-up allocated (modules, config, directory, rules: ~95k objects in a
    node) out of the cyclic garbage collector's walks.  Each full collection walked them all,
    ~120 ms with every thread stopped — the group commit holding the SQLite write lock
    included — about four times per 2000 messages (bench_smtp); frozen, ~35 ms.  Garbage
    that exists now is collected first; frozen objects are still freed by reference counting."""
    gc.collect()
    gc.freeze()


async def refresh_directory(directory: Directory, stopping: asyncio.Event, every: float) -> None:
    """Replay the directory's change feed every ``every`` seconds until ``stopping``."""
    await periodically(stopping, directory.refresh, every,
                       failure="directory refresh failed; keeping the last good index")
