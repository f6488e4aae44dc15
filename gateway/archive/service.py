"""The archive inside `mailgate run`: inbound sync loop, IMAP capture worker, daily purge.

- Configures ``node.archive`` (key file) and creates the keyring if missing.
- Says once (warning) when inbound capture is off for want of a way to read upstream
  (``settings.capture_problem``: ``capture_imap`` on, but no master user and no credential
  opt-in); ``gateway.checks.config_warnings`` returns the same line (for ``mailgate check``).
- IMAP capture: the proxy's ``on_whole_fetch`` hook only queues (account, mailbox,
  UIDVALIDITY, UIDs) on a bounded queue (the reactor thread never waits); a worker fetches
  those messages again upstream (master user or opt-in credentials) in a thread and
  archives them as ``imap:<account>/<mailbox>``.  A full queue drops the note (logged):
  the background sync still captures INBOX/Sent.
- Opt-in: the proxy's ``on_login`` hook seals the employee's login (once per process per
  password) for the sync of providers without a master user.
- Sync: every ``sync_interval`` seconds, one pass over every active employee.
- Search index: the node's archive (SMTP handler) and the relay defer the full-text index
  entry of each record/sighting; a background task indexes everything not yet indexed, in
  order, in batches (``indexer.index_pending``, a thread), every ``INDEX_POLL`` seconds —
  and at start-up it catches up what an earlier run left (durable watermarks).
- Daily: retention purge (when ``retention_years`` > 0 and ``purge_enabled``); a failed one
  (disk full …) is logged and tried again an hour later.
- Every ``checkpoint_interval`` (an hour), when anything was archived or logged since the last
  one: a chain checkpoint in the operation log and the archive directory's
  ``chain-anchors.log`` (the chain head and the operation log's end; gateway/archive/anchors.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from typing import Any

from gateway.archive import Archive
from gateway.archive.settings import ArchiveConfig, capture_imap_on, capture_problem

log = logging.getLogger("mailgate.archive")

CAPTURE_QUEUE = 10_000
DAILY = 24 * 3600.0
DAILY_RETRY = 3600.0  # seconds until a failed daily purge is tried again
INDEX_POLL = 0.5  # seconds between background indexer passes when there was nothing to do
# Seconds between passes while one waits out a burst (index_lag): the drain starts 0.1-0.2 s
# after the last record instead of 0.5-1.0 s; a pass that finds mail still arriving costs
# three indexed look-ups.
BURST_POLL = 0.1


def announce_capture(section: ArchiveConfig) -> None:
    """One warning at start when inbound capture is on but cannot work (no master user, no
    credential opt-in): otherwise every capture would be skipped quietly (sync.capture_uids)."""
    problem = capture_problem(section)
    if problem:
        log.warning("%s", problem)


async def start(node: Any, reactor: Any):  # noqa: ANN201 - async stop function | None
    cfg = node.cfg
    archive: Archive = node.archive
    archive.configure(cfg)
    archive.defer_index = True  # the SMTP handler's records: indexed by _index_loop, off the mail path
    archive.keep_recent = True  # ... which takes fresh messages from memory (Archive.take_recent)
    await asyncio.to_thread(lambda: archive.store.keyring)  # create the key file now, not mid-message
    from gateway.archive import workers

    await asyncio.to_thread(workers.start)  # the indexer's extraction processes now, not mid-traffic
    a = cfg.archive
    announce_capture(a)
    tasks: list[asyncio.Task] = []
    stopping = node.stopping
    hooks = _Hooks(archive, cfg)
    if reactor is not None:
        hooks.install()
        if capture_imap_on(a):
            tasks.append(asyncio.create_task(hooks.capture_worker(stopping), name="archive-imap-capture"))
    if a.sync_enabled:
        tasks.append(asyncio.create_task(_sync_loop(archive, cfg, stopping), name="archive-sync"))
    tasks.append(asyncio.create_task(index_loop(archive, stopping, lag=a.index_lag), name="archive-index"))
    tasks.append(asyncio.create_task(_daily(archive, cfg, stopping), name="archive-daily"))
    tasks.append(asyncio.create_task(_checkpoints(archive, cfg, stopping), name="archive-checkpoints"))

    async def stop() -> None:
        hooks.uninstall()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    return stop


async def _wait(stopping: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; True if the node is stopping."""
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
        return True
    except TimeoutError:
        return False


async def _in_thread(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a worker thread, as one pass of a background loop: after a failure
    the thread's database connection is dropped (``gateway.db.drop_connection``), so the
    next pass there reconnects — the database may have been restarted under it."""
    return await asyncio.to_thread(_pass, fn, *args)


def _pass(fn: Any, *args: Any) -> Any:
    from gateway.db import drop_connection

    try:
        return fn(*args)
    except Exception:
        drop_connection()
        raise


async def index_loop(archive: Archive, stopping: asyncio.Event, poll: float = INDEX_POLL,
                     lag: float = 0.0) -> None:
    """Index deferred records and sightings until ``stopping``: right away while there is a
    backlog (start-up catch-up), else every ``poll`` seconds; while mail keeps arriving, up to
    ``lag`` seconds behind it (``indexer.index_batch``), looking every ``BURST_POLL`` seconds
    for the burst's end."""
    from gateway.archive.indexer import index_batch, waiting

    while not stopping.is_set():
        failed = more = False
        try:
            _, more = await _in_thread(lambda: index_batch(archive, lag=lag))
        except Exception:
            log.exception("archive background indexing failed (retried)")
            failed = True
        if more:
            continue
        delay = poll * 20 if failed else min(poll, BURST_POLL) if waiting(archive) else poll
        if await _wait(stopping, delay):  # a persistent failure: do not spin
            return


async def _sync_loop(archive: Archive, cfg: Any, stopping: asyncio.Event) -> None:
    from gateway.archive.sync import sync_all

    while not stopping.is_set():
        try:
            new = await _in_thread(sync_all, archive, cfg, stopping.is_set)
            log.info("archive sync pass done: %d new sighting(s)", new)
        except Exception:
            log.exception("archive sync pass failed")
        if await _wait(stopping, cfg.archive.sync_interval):
            return


async def _daily(archive: Archive, cfg: Any, stopping: asyncio.Event) -> None:
    """The retention purge, once a day (when ``retention_years`` > 0 and ``purge_enabled``)."""
    from gateway.archive.retention import purge

    if not (cfg.archive.purge_enabled and cfg.archive.retention_years > 0):
        return
    while not stopping.is_set():
        if await _wait(stopping, 60.0):  # not in the middle of start-up
            return
        done = True
        try:
            await _in_thread(purge, archive.store, cfg.archive.retention_years, "system")
        except Exception:
            log.exception("archive daily retention purge failed (tried again in an hour)")
            done = False
        if await _wait(stopping, (DAILY if done else DAILY_RETRY) - 60.0):
            return


async def _checkpoints(archive: Archive, cfg: Any, stopping: asyncio.Event) -> None:
    """A chain checkpoint every ``checkpoint_interval`` seconds when anything was archived or
    logged since the last one (``verify.checkpoint_needed``): the chain head and the
    operation log's end anchored in ``chain-anchors.log``, so a cut at either end is seen by
    verify for everything older than this interval.  The first one a minute after start."""
    from gateway.archive.verify import checkpoint, checkpoint_needed

    wait = min(60.0, cfg.archive.checkpoint_interval)  # not in the middle of start-up
    while not await _wait(stopping, wait):
        wait = cfg.archive.checkpoint_interval
        try:
            if await _in_thread(checkpoint_needed):
                await _in_thread(checkpoint, "system", archive.directory)
        except Exception:
            log.exception("archive checkpoint failed")


class _Hooks:
    def __init__(self, archive: Archive, cfg: Any):
        self.archive, self.cfg = archive, cfg
        self.queue: asyncio.Queue = asyncio.Queue(CAPTURE_QUEUE)
        self.dropped = 0
        self._seen_logins: dict[str, bytes] = {}
        self._pepper = hashlib.sha256(b"mailgate-archive-login" + id(self).to_bytes(8, "little")).digest()

    def install(self) -> None:
        from gateway.imap.service import ProxyService

        if capture_imap_on(self.cfg.archive):
            ProxyService.on_whole_fetch = self.on_whole_fetch
        if self.cfg.archive.capture_credentials_opt_in:
            ProxyService.on_login = self.on_login

    def uninstall(self) -> None:
        from gateway.imap.service import ProxyService

        if ProxyService.on_whole_fetch == self.on_whole_fetch:
            ProxyService.on_whole_fetch = None
        if ProxyService.on_login == self.on_login:
            ProxyService.on_login = None

    # -- called on the reactor thread: never block ---------------------------------

    def on_whole_fetch(self, account: str, mailbox: bytes, uidvalidity: int, uids: list[int]) -> None:
        if not account:
            return
        try:
            self.queue.put_nowait((account, mailbox, uidvalidity, tuple(uids)))
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("archive IMAP capture queue full: %d notes dropped (sync still captures INBOX/Sent)",
                            self.dropped)

    def on_login(self, account: str, login: bytes, password: bytes) -> None:
        mark = hmac.new(self._pepper, login + b"\0" + password, hashlib.sha256).digest()
        if self._seen_logins.get(account) == mark:
            return
        self._seen_logins[account] = mark
        from gateway.archive.sync import store_credentials

        task = asyncio.get_running_loop().run_in_executor(
            None, store_credentials, self.archive, account, login.decode("utf-8", "replace"),
            password.decode("utf-8", "replace"))
        task.add_done_callback(lambda f: f.exception() and log.warning(
            "archive: could not keep the IMAP login of %s: %s", account, type(f.exception()).__name__))

    # -- worker ------------------------------------------------------------------------

    async def capture_worker(self, stopping: asyncio.Event) -> None:
        from gateway.archive.sync import capture_uids

        while not stopping.is_set():
            account, mailbox, uidvalidity, uids = await self.queue.get()
            # Coalesce what else waits for the same mailbox (a client reading many messages).
            batch = {(account, mailbox, uidvalidity): set(uids)}
            while not self.queue.empty() and len(batch) < 50:
                a, m, v, u = self.queue.get_nowait()
                batch.setdefault((a, m, v), set()).update(u)
            for (a, m, v), us in batch.items():
                try:
                    await _in_thread(capture_uids, self.archive, self.cfg, a, _mailbox_name(m), v, sorted(us))
                except Exception as exc:  # noqa: BLE001 - upstream trouble: the sync catches up
                    log.warning("archive IMAP capture of %s/%s failed: %s", a, m, exc)


def _mailbox_name(name: bytes | str) -> str:
    """The proxy's mailbox bytes (modified UTF-7 on the wire) as the text imapclient expects."""
    if isinstance(name, str):
        return name
    from imapclient.imap_utf7 import decode

    return decode(name)
