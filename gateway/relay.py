"""The relay worker: drains the outbound queue to the upstream smarthost (docs/ARCHITECTURE.md §2).

Each worker claims due rows with a compare-and-set UPDATE (safe with several
workers, processes and nodes on one database), delivers them with smtplib in
its own thread, and records the outcome per recipient:

* 2xx — delivered, the recipient leaves ``row.recipients``;
* 5xx — failed for good, the sender gets a DSN (``gateway.bounce``);
* 4xx, connection errors, timeouts — retried with exponential backoff until
  ``created_at + relay.lifetime``, then bounced as expired (4.4.7).

A finished row becomes ``sent`` (or ``bounced`` when nothing was delivered in
its last attempt), loses its sealed credentials and its spool file; the row
stays as history.  A failing bounce is never bounced again.  An outcome whose
commit fails (the database restarting) is recorded again, with a backoff, while
the claim lasts (``gateway.relayoutcomes``): a delivered message is not sent twice
because the database was away for a moment.  One that cannot be recorded in time — its
claim about to run out, the worker stopping (``CLOSE_WAIT``), posted after the group
committer stopped (``CommitterStopped``) — goes to the node's outcome journal
(``gateway.relayjournal``, fsynced), and is recorded from there once a worker reaches the
database again, at the latest at the node's next start, before it releases its old claims
(``apply_outcome_journal``); a worker of this node that claims such a row records the
journalled outcome instead of delivering the message again (``_process``).  Only without
room in the journal is an outcome given up (ERROR): its claim stays, and expires, and the
message goes out again.

Nothing here blocks the event loop: every DB and SMTP call runs in the
worker's own thread (``_call``).

**Stopping.**  Three parties are involved: the worker's task on the event loop (``run``),
its thread, which delivers one claimed row after the other and blocks on the upstream
(``_process_rows``), and the group committer that records the outcomes (the node's, or the
relay process's) and is stopped only after the worker's task has ended.  Cancelling the task
does not stop the thread: before, a delivery still going on after the node's grace went on
unseen, its outcome came after the committer's stop and was given up, and the row — still
claimed by this node — was released at the next start (``release_node_claims``) or when its
claim expired, and delivered a second time.  So a stop now works like an MTA's:

* no new claims at once: ``run_once`` claims only while not stopping, and the rows of a
  claimed batch not yet started are released (``_process_rows``);
* the delivery in progress may finish: until ``STOP_SEND_WAIT`` (2 s) after the stop it may
  still send its end of data (the final "." line);
* the end of data is the point of no return (RFC 1047).  A transaction that has not sent it
  by then is cut (its socket shut down from the event loop, ``SmarthostConnection.stop_sending``):
  nothing can have been delivered, so no attempt is recorded and the row's claim is released
  at once (``DeliveryAborted``) — another worker, or this node after its restart, takes it
  without waiting for the claim to expire or counting an attempt;
* a transaction past its end of data waits for the reply — the upstream may have taken the
  message — until ``STOP_REPLY_WAIT`` (7 s) after the stop, at least 5 s after its dot, and
  the outcome is recorded as usual, through the committer that is still running;
* only a reply that has not come by then is given up (``stop_waiting``, ``ReplyAbandoned``).
  Its outcome is truly unknown; it is recorded as a deferral ("no reply to the end of data
  before the relay stopped") and logged at WARNING, and the message goes out again after the
  backoff — the documented at-least-once case, as a reply timeout after the dot always was,
  never a silent one.

7 s leave 3 s of the node's 10 s grace for its tasks (``service.TASK_GRACE``, which begins
after the SMTP sessions were drained, so usually later than the worker's stop) to commit the
outcome and close; the relay process gets 15 s (``relayproc``).  An outcome that a database
away at that moment keeps from being recorded within ``CLOSE_WAIT`` goes to the journal
(above).  A session still being opened is cut the same way — a TCP connect still pending (its
socket is registered before the connect, ``SmarthostConnection._open_socket``), the greeting,
STARTTLS, AUTH: nothing was sent, so its row is released with no attempt counted; only a name
resolution of the relay host is not cut (it ends within the resolver's own timeout).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import logging
import re
import secrets
import smtplib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from peewee import OperationalError, SqliteDatabase

from gateway.archive import PreparedBlob, RelayedCopy, record_relayed, relayed_capture
from gateway.archive.schema import ArchiveSighting
from gateway.bounce import Failure, build_dsn
from gateway.config import Config
from gateway.credentials import CredentialsError, seal, unseal
from gateway.db.errors import describe_db_error
from gateway.db.inserts import buffered_inserts
from gateway.db.models import OutboundMessage, database, utcnow
from gateway.db.writerlock import handoff
from gateway.groupcommit import CommitterStopped
from gateway.metrics import relay_results
from gateway.relayjournal import OutcomeJournal, decode_changes, encode_changes
from gateway.relayoutcomes import UnrecordedOutcomes
from gateway.relayqueue import backoff, claim_batch, finish_many, next_due, release, release_node_claims
from gateway.smarthost import (
    Credentials,
    DeliveryAborted,
    RelayError,
    Reply,
    ReplyAbandoned,
    SmarthostConnection,
    describe,
    is_loopback,
    tls_context,
)
from gateway.spool import Spool, SpoolError, new_queue_id

# Re-exported: the claims and the smarthost session lived here before the split.
__all__ = [
    "MAX_OUTSTANDING_OUTCOMES", "RelayError", "RelayWorker", "Reply", "SmarthostConnection", "apply_outcome_journal",
    "backoff", "claim_batch", "is_loopback", "release", "release_node_claims", "tls_context",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

_EOL = re.compile(rb"\r\n|\r|\n")
_MAX_ERROR = 1000
# Relay outcomes a worker may have waiting for the group commit before it pauses (those
# waiting to be recorded again after a failed commit included).
MAX_OUTSTANDING_OUTCOMES = 64
# An unrecorded outcome is tried again only until this long before its claim runs out
# (at most; a tenth of [relay] claim_timeout when that is less): a try must be committed
# before the row can be claimed again — by another worker, or by this one, whose owner
# name the stale outcome would match.
CLAIM_MARGIN_MAX = 60.0
# Seconds a stopping worker waits for its outcomes to be recorded before it journals them:
# within the node's grace for its tasks (service.TASK_GRACE, 10 s) and the relay process's
# time to exit before it is killed (relayproc.RelayProcess.stop, 15 s).
CLOSE_WAIT = 5.0
# A delivery in progress when the worker stops (see the module doc): until this many seconds
# after the stop it may still send its end of data; a transaction that has not by then is
# cut, nothing delivered, and its row released …
STOP_SEND_WAIT = 2.0
# … and until this many seconds after the stop (so at least 5 s after any end of data sent
# during the stop) the reply to an end of data is waited for, then recorded as usual.  Left
# 3 s of the node's 10 s grace (service.TASK_GRACE) to commit it.
STOP_REPLY_WAIT = 7.0


# -- the worker -----------------------------------------------------------------


class RelayWorker:
    """Claims due queue rows and relays them; ``run`` loops until ``stop`` is set."""

    batch_size = 10

    def __init__(
        self,
        config: Config,
        spool: Spool,
        worker_name: str,
        credentials_key: bytes | None,
        *,
        now: Callable[[], dt.datetime] = utcnow,
        committer: Any = None,
        journal: OutcomeJournal | None = None,
    ) -> None:
        self.config = config
        self.committer = committer  # gateway.groupcommit.GroupCommitter, or None: commit alone
        # The node's journal of outcomes that could not be recorded (gateway/relayjournal.py),
        # shared by the process's workers; None (tests): such an outcome is given up.
        self.journal = journal
        self.spool = spool
        self.name = worker_name
        # Unique per run, so a claim left by an earlier process of the same name
        # (or the same name on another node) is never taken for our own.
        self.owner = f"{config.node.name}/{worker_name}/{secrets.token_hex(3)}"[:100]
        self._key = credentials_key
        self._now = now
        self.connection = SmarthostConnection(
            config.relay_host,
            config.relay_port,
            config.relay_security,
            timeout=config.upstream.timeout,
            context=tls_context(config.upstream),
            local_hostname=config.smtp.hostname,
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"relay-{worker_name}")
        # Outcomes handed to the group committer and not yet committed, or waiting to be
        # recorded again (bounded): a slot each, from ``_take_slot`` until recorded or given up.
        self._slots = MAX_OUTSTANDING_OUTCOMES
        self._outstanding = threading.BoundedSemaphore(self._slots)
        self.unrecorded: UnrecordedOutcomes[_Outcome] = UnrecordedOutcomes()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._closed = False
        self._relaxed_conn: Any = None  # the connection whose claims skip the fsync (see _claim)

    # -- asyncio side ---------------------------------------------------------

    def wakeup(self) -> None:
        """Ask for a run now (e.g. right after a message was queued).  Thread-safe."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self._wake.set()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set; sleep until the next due row, at most poll_interval."""
        self._loop = asyncio.get_running_loop()
        self._stop = stop
        log.info("relay worker %s started (relay=%s)", self.owner, self.connection.relay)
        deadlines = asyncio.create_task(self._stop_deadlines(stop), name=f"{self.name}-stop-deadlines")
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self.run_once(keep_open=True)
                    if self.journal is not None and len(self.journal) and not stop.is_set():
                        await self._call(self.apply_journal)  # the database answers again
                    timeout = await self._call(self._seconds_until_due)
                except Exception as exc:
                    if isinstance(exc, OperationalError) and "locked" in str(exc):
                        # SQLite's busy timeout ran out under write contention: rows are due, try again soon.
                        log.warning("relay worker %s: database busy (%s); retrying", self.owner, exc)
                        timeout = 0.1
                    else:  # e.g. the database is down or restarting: the loop goes on, and reconnects
                        log.exception("relay worker %s: run failed", self.owner)
                        timeout = self.config.relay.poll_interval
                if not await self._sleep(stop, timeout):
                    await self._call(self.connection.close)  # idle for a while: no session kept
        finally:
            deadlines.cancel()
            # Normally idle by now.  Cancelled (the node's grace ran out), a delivery may still be
            # going on in the worker thread: cut it, so that the thread ends soon.
            self.connection.stop_waiting()
            await self.aclose()
            log.info("relay worker %s stopped", self.owner)

    async def _stop_deadlines(self, stop: asyncio.Event) -> None:
        """Once ``stop`` is set: the delivery in progress may send its end of data for
        STOP_SEND_WAIT seconds more and gets its reply until STOP_REPLY_WAIT (module doc).
        Timers on the event loop, as the worker thread is the one blocked on the upstream."""
        await stop.wait()
        await asyncio.sleep(STOP_SEND_WAIT)
        if self.connection.stop_sending() == "waiting":
            log.info("relay worker %s: stopping; waiting up to %.1f s more for the upstream's reply to an"
                     " end of data", self.owner, STOP_REPLY_WAIT - STOP_SEND_WAIT)
        await asyncio.sleep(max(0.0, STOP_REPLY_WAIT - STOP_SEND_WAIT))
        self.connection.stop_waiting()

    async def run_once(self, keep_open: bool = False) -> int:
        """Relay every row that is due now; return how many were worked on.  ``keep_open``:
        the upstream session stays open for the next run (``run`` closes it once a wait
        for work ends without a wake-up), so a steady stream does not pay EHLO/STARTTLS/AUTH
        again after every short idle moment."""
        done: set[int] = set()
        try:
            while not self._stopping():
                rows = await self._call(self._claim)
                fresh = [row for row in rows if row.id not in done]
                if len(fresh) < len(rows):  # due again already (zero backoff): next run
                    await self._call(release, [r.id for r in rows if r.id in done], self.owner)
                if not fresh:
                    break
                done.update(await self._call(self._process_rows, self._reuse_order(fresh)))
        finally:
            # Every outcome of this run committed (retried meanwhile if need be).  At a stop the
            # close waits instead, shorter (CLOSE_WAIT).
            if not self._stopping():
                await self._call(self.drain)
            if not keep_open:
                await self._call(self.connection.close)
        return len(done)

    async def aclose(self) -> None:
        """Close the SMTP session and the worker thread's DB connection."""
        if self._closed:
            return
        self._closed = True
        await self._call(self._close_thread_resources)
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def _sleep(self, stop: asyncio.Event, timeout: float) -> bool:
        """Wait for a wake-up, ``stop`` or the timeout; True if woken (or stopping)."""
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            return bool(done)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    def _reuse_order(self, rows: list[OutboundMessage]) -> list[OutboundMessage]:
        """Rows of one employee together, so their session is reused."""
        if self.config.relay.mode != "employee_credentials":
            return rows
        return sorted(rows, key=lambda row: row.employee_id or 0)

    # -- worker thread side (blocking) ----------------------------------------

    def drain(self, timeout: float = 30.0, *, closing: bool = False) -> bool:
        """Wait until every outcome is recorded or given up (before closing, and in tests),
        at most ``timeout`` seconds; outcomes whose commit failed are tried again meanwhile,
        in this thread.  False if some are still waiting.  A stop ends the wait early unless
        ``closing`` (the close's own wait)."""
        deadline = time.monotonic() + timeout
        taken = 0
        try:
            while taken < self._slots:
                left = deadline - time.monotonic()
                if self._outstanding.acquire(timeout=max(0.0, min(left, self.unrecorded.wait_hint()))):
                    taken += 1
                elif left <= 0 or (self._stopping() and not closing):
                    return False
                else:
                    self._retry_unrecorded()
            return True
        finally:
            for _ in range(taken):
                self._outstanding.release()

    def _close_thread_resources(self) -> None:
        if not self.drain(CLOSE_WAIT, closing=True):
            log.warning("relay worker %s: relay outcomes still uncommitted at close", self.owner)
        self._give_up_unrecorded("the worker is stopping")
        self.connection.close()
        if not database.is_closed():
            database.close()

    def _remove_file(self, row: OutboundMessage) -> None:
        """Called in the committer's thread after the commit: the unlink (a journal update)
        is handed to this worker's thread so the next batch's transaction does not wait for it.
        A file left by a crash in between is swept as an orphan (its row is no longer queued)."""
        try:
            self._executor.submit(self.spool.remove, row)
        except RuntimeError:  # the worker's executor is shut down: remove it here
            self.spool.remove(row)

    def _claim(self) -> list[OutboundMessage]:
        """Claim a batch.  When outcomes go through a group committer (another thread), this
        thread's connection only ever writes claims, which need no fsync of their own: a claim
        lost to a power cut is freed at start-up anyway (``release_node_claims``), and the
        next synchronous commit makes the earlier WAL frames durable too.  So its commits
        skip the fsync (synchronous=NORMAL) and hold the SQLite write lock for less time."""
        if self.committer is not None and isinstance(database.obj, SqliteDatabase):
            conn = database.connection()
            if self._relaxed_conn is not conn:
                database.execute_sql("PRAGMA synchronous=NORMAL")
                self._relaxed_conn = conn
        # The writers' hand-off lock (gateway/db/writerlock.py): the claim's UPDATE takes the
        # write lock the node's committer and indexer pass between them, and would otherwise
        # sleep in SQLite's busy handler while they hand it on.
        with handoff():
            return claim_batch(self.owner, self._now(), self.config.relay.claim_timeout, self.batch_size,
                               self.spool.node)

    def _seconds_until_due(self) -> float:
        now = self._now()
        due = next_due(now)
        poll = self.config.relay.poll_interval
        if due is None:
            return poll
        return min(poll, max(0.1, (due - now).total_seconds()))

    def _process_rows(self, rows: list[OutboundMessage]) -> list[int]:
        """The claimed rows one after the other, in this worker's thread (one hand-off from the
        event loop per claim, not per message); at a stop, the rest is released.  Returns the
        ids of the rows worked on."""
        done = []
        for index, row in enumerate(rows):
            if self._stopping():  # asyncio.Event.is_set: a plain attribute read, thread-safe
                release([r.id for r in rows[index:]], self.owner)
                break
            self._process_safely(row)
            done.append(row.id)
        return done

    def _process_safely(self, row: OutboundMessage) -> None:
        try:
            self._process(row)
        except Exception:
            # The claim stays until it expires: that is the retry delay.
            log.exception("%s: relay failed unexpectedly", row.queue_id)
            self.connection.close()

    def _process(self, row: OutboundMessage) -> None:
        entry = self.journal.for_row(row.id) if self.journal is not None else None
        if entry is not None:  # its outcome is known: recorded now, never delivered again by this node
            result = self.record_journalled(entry, holder=self.owner)
            if result != "held":
                self.journal.remove([entry])
            if result != "stale":
                return
        # Renew only a claim that has used up half its time (a long batch), not
        # before every message: each renewal is a synchronous commit.
        half = dt.timedelta(seconds=self.config.relay.claim_timeout / 2)
        fresh = row.claimed_until is not None and row.claimed_until - self._now() > half
        if not fresh and not self._renew_claim(row):
            log.warning("%s: claim lost before delivery; skipped", row.queue_id)
            return
        recipients: list[str] = json.loads(row.recipients)
        credentials: Credentials | None = None
        data = b""
        archived = None  # the archive blob of exactly the bytes relayed, if they are one
        try:
            read, archived = self.spool.read_blob(row)
            data = _normalize_eol(read)
            if data is not read:
                archived = None
            credentials = self._credentials_for(row)
        except FileNotFoundError:
            replies = dict.fromkeys(recipients, Reply(None, "spool file missing on this node"))
        except CredentialsError as exc:
            replies = dict.fromkeys(recipients, Reply(None, str(exc)))
        else:
            replies = self._deliver(row, credentials, recipients, data)
            if replies is None:  # cut by the stop before its end of data: nothing delivered
                released = release([row.id], self.owner)
                log.info("%s: delivery aborted by the stop before the end of data; %s", row.queue_id,
                         "released for another try" if released else "its claim was gone already")
                return
        self._record(row, recipients, replies, credentials, data, archived)

    def _renew_claim(self, row: OutboundMessage) -> bool:
        m = OutboundMessage
        until = self._now() + dt.timedelta(seconds=self.config.relay.claim_timeout)
        query = m.update(claimed_until=until).where(
            (m.id == row.id) & (m.claimed_by == self.owner) & (m.state == "queued")
        )
        if query.execute() != 1:
            return False
        row.claimed_until = until  # how long an unrecorded outcome may be retried
        return True

    def _credentials_for(self, row: OutboundMessage) -> Credentials | None:
        relay = self.config.relay
        if relay.mode == "employee_credentials" and row.credentials:
            if self._key is None:
                raise CredentialsError("no queue key loaded: cannot unseal credentials")
            return unseal(self._key, row.credentials, row.queue_id)
        if relay.username:
            return relay.username, relay.password
        return None

    def _deliver(
        self,
        row: OutboundMessage,
        credentials: Credentials | None,
        recipients: list[str],
        data: bytes,
    ) -> dict[str, Reply] | None:
        """Each recipient's reply; None when the stop cut the transaction before its end of
        data (``DeliveryAborted``).  A wait for the reply to the end of data that the stop ended
        (``ReplyAbandoned``) is a deferral like a timeout there, said so at WARNING."""
        if not recipients:
            return {}
        try:
            return self.connection.send(credentials, row.mail_from, recipients, data)
        except DeliveryAborted:
            self.connection.close()
            return None
        except ReplyAbandoned as exc:
            self.connection.close()
            log.warning("%s: the stop ended the wait for the upstream's reply to the end of data (%s);"
                        " the message may have been delivered and will be tried again", row.queue_id, exc)
            return dict.fromkeys(recipients, Reply(None, "no reply to the end of data before the relay"
                                                         " stopped (it may have been delivered)"))
        except RelayError as exc:
            reply = exc.reply
            if exc.auth and reply.outcome == "bounced" and self._employee_auth(row):
                # The employee's own password was refused: retrying will not help.
                reply = Reply(reply.code, f"5.7.8 upstream refused the sender's login: {reply.text}")
            elif reply.outcome != "deferred":
                # A session-level failure is never a delivery: a 5xx (greeting,
                # STARTTLS, relay account login) is our configuration, not the
                # message, and a 2xx where a 334/235/220 belonged (a server that
                # "accepts" AUTH with 250) is a broken session.  Keep it and retry.
                reply = Reply(None, f"upstream refused the session: {reply}")
            self.connection.close()
            return dict.fromkeys(recipients, reply)
        except (smtplib.SMTPException, OSError) as exc:
            self.connection.close()
            return dict.fromkeys(recipients, Reply(None, describe(exc)))

    def _employee_auth(self, row: OutboundMessage) -> bool:
        return self.config.relay.mode == "employee_credentials" and bool(row.credentials)

    def _record(
        self,
        row: OutboundMessage,
        recipients: list[str],
        replies: dict[str, Reply],
        credentials: Credentials | None,
        original: bytes,
        archived: PreparedBlob | None = None,
    ) -> None:
        """``archived``: the spool's archive blob ``original`` was read from, unchanged (its
        "relay:sent" sighting then needs no preparation)."""
        now = self._now()
        by_outcome: dict[str, list[str]] = {"sent": [], "deferred": [], "bounced": []}
        for rcpt in recipients:
            by_outcome[replies[rcpt].outcome].append(rcpt)
        delivered, deferred, failed = by_outcome["sent"], by_outcome["deferred"], by_outcome["bounced"]
        self._log(row, now, replies)
        expires = row.created_at + dt.timedelta(seconds=self.config.relay.lifetime)
        expired = bool(deferred) and now >= expires
        remote = self.connection.host
        failures = [Failure(r, replies[r].status, str(replies[r]), remote) for r in failed]
        if expired:
            failures += [
                Failure(r, "4.4.7", f"delivery time expired; last reply: {replies[r]}", remote)
                for r in deferred
            ]
            self._log_expired(row, now, deferred)
        attempts = row.attempts + 1
        errors = "; ".join(f"<{r}>: {replies[r]}" for r in deferred + failed)[:_MAX_ERROR]
        m = OutboundMessage
        finished = not (deferred and not expired)
        if not finished:
            delay = backoff(attempts, self.config.relay.retry_initial, self.config.relay.retry_max)
            changes = {
                m.recipients: json.dumps(deferred),
                m.next_attempt_at: now + dt.timedelta(seconds=delay),
            }
        else:
            changes = {
                m.state: "sent" if delivered or not failures else "bounced",
                m.recipients: json.dumps([f.recipient for f in failures]),
                m.done_at: now,
                m.credentials: None,
            }
        changes.update(
            {m.attempts: attempts, m.last_error: errors, m.claimed_by: None, m.claimed_until: None}
        )
        # Archive: the relayed copy as a "relay:sent" sighting (blob written here, row in the
        # outcome's transaction); its search-index update is left to the node's background
        # indexer (off the mail path).
        attempt = Attempt(self, row, changes, failures, credentials, original,
                          relayed_capture(self.config, row, original, delivered, remote, archived, self.spool.archive)
                          if delivered else None, self.owner)
        margin = dt.timedelta(seconds=min(CLAIM_MARGIN_MAX, self.config.relay.claim_timeout / 10))
        retry_until = row.claimed_until - margin if row.claimed_until is not None else now
        self._take_slot()
        self._store(_Outcome(attempt, finished, delivered, retry_until))

    # -- recording an outcome (and again, after a failed commit) --------------

    def _take_slot(self) -> None:
        """A slot for one more outcome (``MAX_OUTSTANDING_OUTCOMES``); at the limit, wait —
        trying the unrecorded outcomes again meanwhile, which hold slots too."""
        self._retry_unrecorded()
        while not self._outstanding.acquire(timeout=self.unrecorded.wait_hint()):
            if self._stopping():  # no waiting for a database that is away at a stop
                self._give_up_unrecorded("the worker is stopping")
            self._retry_unrecorded()

    def _store(self, outcome: _Outcome) -> None:
        """Record ``outcome`` (it holds a slot); the answer goes to ``_recorded``.  Through the
        node's group committer when there is one: the outcome shares a commit with whatever
        else is being stored (the outcomes of a batch recorded together), and the worker goes
        on with the next message meanwhile (its claim keeps the row from everyone else until
        then)."""
        done = functools.partial(self._recorded, outcome)
        if self.committer is not None:
            try:
                self.committer.post(store_attempt, outcome.attempt, on_done=done, many=store_attempts)
            except CommitterStopped as exc:  # an outcome later than the node's stop: not recorded
                done(None, exc)
            return
        try:
            with database.atomic():
                result = store_attempt(outcome.attempt)
        except Exception as exc:
            done(None, exc)
        else:
            done(result)

    def _recorded(self, outcome: _Outcome, stored: bool | None, error: BaseException | None = None) -> None:
        """The answer to ``_store`` (in the committer's answering thread, or this worker's)."""
        if error is not None:
            self._not_recorded(outcome, error)
            return
        row = outcome.attempt.row
        try:
            if not stored and not outcome.failed_commits:
                log.warning("%s: claim lost during delivery; outcome not recorded", row.queue_id)
            elif not stored:  # a commit that reported failure may have gone through after all
                log.warning("%s: relay outcome not recorded on try %d: the claim is gone (lost, or an"
                            " earlier try was committed after all; its spool file is then swept at the"
                            " next start)", row.queue_id, outcome.failed_commits + 1)
            else:
                if outcome.failed_commits:
                    log.info("%s: relay outcome recorded after %d failed commits", row.queue_id,
                             outcome.failed_commits)
                if outcome.finished:
                    self._remove_file(row)  # the file goes only after the commit
                self._count(outcome.delivered, not outcome.finished, outcome.attempt.failures)
        finally:
            self._outstanding.release()

    def _not_recorded(self, outcome: _Outcome, error: BaseException) -> None:
        """A failed commit: keep ``outcome`` (and its slot) to be recorded again after a backoff
        while its claim lasts; else give it up."""
        outcome.failed_commits += 1
        outcome.error = describe_db_error(error)  # for the log: never the values a database error quotes
        if isinstance(error, CommitterStopped):  # no commit will come: no retries either
            self._give_up(outcome, "the group commit has stopped")
            return
        if self._now() >= outcome.retry_until:
            self._give_up(outcome, "its claim runs out")
            return
        delay = self.unrecorded.keep(outcome, outcome.failed_commits)
        if delay is None:
            self._give_up(outcome, "the worker is stopping")
            return
        log.log(logging.WARNING if outcome.failed_commits == 1 else logging.DEBUG,
                "%s: could not record the relay outcome (%s); trying again in %.1f s",
                outcome.attempt.row.queue_id, outcome.error, delay)
        self.wakeup()

    def _retry_unrecorded(self) -> None:
        """In this worker's thread: record again the outcomes whose next try is due; those
        whose claim is about to run out are given up."""
        for outcome in self.unrecorded.due():
            if self._now() >= outcome.retry_until:
                self._give_up(outcome, "its claim runs out")
            else:
                self._store(outcome)

    def _give_up_unrecorded(self, why: str) -> None:
        """No more tries: every outcome waiting for one is given up (and later failures too)."""
        for outcome in self.unrecorded.close():
            self._give_up(outcome, why)

    def _give_up(self, outcome: _Outcome, why: str) -> None:
        """No more tries in the database: the outcome goes to the node's journal, recorded from
        there at the next chance (``apply_journal``; at the latest at the next start).  Without
        a journal (or with a full one) it stays unrecorded: the row stays queued under our
        claim, which expires (``[relay] claim_timeout``) and then the message is tried again —
        at least once."""
        row = outcome.attempt.row
        if self._journal(outcome):
            log.warning("%s: could not record the relay outcome after %d tries (%s; %s): kept in the node's"
                        " outcome journal, to be recorded once the database answers (at the latest at the"
                        " next start); not delivered again meanwhile", row.queue_id, outcome.failed_commits,
                        outcome.error, why)
            self._outstanding.release()
            return
        again = "may be delivered again" if outcome.delivered else "will be tried again"
        log.error("%s: could not record the relay outcome after %d tries (%s; %s): the message %s"
                  " once its claim expires (%s UTC)", row.queue_id, outcome.failed_commits, outcome.error, why,
                  again, row.claimed_until)
        self._outstanding.release()

    # -- the outcome journal (gateway/relayjournal.py) ----------------------------

    def _journal(self, outcome: _Outcome) -> bool:
        """Write ``outcome`` to the node's journal; False without one, or when it refused."""
        if self.journal is None:
            return False
        attempt = outcome.attempt
        return self.journal.append({
            "row": attempt.row.id, "queue_id": attempt.row.queue_id, "owner": attempt.owner,
            "attempts": attempt.row.attempts, "changes": encode_changes(attempt.changes),
            "failures": [[f.recipient, f.status, f.diagnostic, f.remote_mta] for f in attempt.failures],
            "delivered": outcome.delivered, "finished": outcome.finished, "remote": self.connection.host,
            "journalled": self._now().isoformat(),
        })

    def apply_journal(self) -> int:
        """Record the journalled outcomes that still apply, drop those that no longer do (both
        leave the journal); an entry whose row another node holds stays.  Blocking (this
        worker's thread, or a start-up thread).  Returns how many were recorded."""
        if self.journal is None:
            return 0
        done, recorded = [], 0
        try:
            for entry in self.journal.entries():
                result = self.record_journalled(entry)
                if result != "held":
                    done.append(entry)
                    recorded += result == "recorded"
        finally:
            if done:
                self.journal.remove(done)
        return recorded

    def record_journalled(self, entry: dict[str, Any], holder: str | None = None) -> str:
        """Record one journalled outcome if its row is as the attempt left it: still queued,
        its attempt count unchanged, and under no live claim but the attempt's own — or
        ``holder``'s (this worker's, which has just claimed the row).  Returns "recorded",
        "stale" (it no longer applies: recorded already, or another node recorded an attempt
        of its own meanwhile) or "held" (another claim holds the row: later).  A database
        error is raised, the entry kept."""
        m = OutboundMessage
        queue_id = entry.get("queue_id", entry["row"])
        row = m.get_or_none(m.id == entry["row"])
        if row is None or row.state != "queued" or row.attempts != entry["attempts"]:
            changes = entry["changes"]
            if row is None:
                log.info("%s: journalled relay outcome dropped: the row is gone", queue_id)
            elif (row.attempts == entry["attempts"] + 1 and row.last_error == changes.get("last_error")
                  and row.state == changes.get("state", "queued")):
                log.info("%s: journalled relay outcome was recorded already (its commit went through)", queue_id)
            else:
                log.warning("%s: journalled relay outcome dropped: the row has changed since (another node"
                            " took it after its claim ran out and recorded an attempt); the message may have"
                            " been delivered twice", queue_id)
            return "stale"
        now = self._now()
        owners = [entry["owner"]] + ([holder] if holder else [])
        if row.claimed_by not in (None, *owners) and row.claimed_until is not None and row.claimed_until >= now:
            return "held"
        try:
            read, archived = self.spool.read_blob(row)
        except FileNotFoundError:
            read, archived = b"", None
        original = _normalize_eol(read)
        if original is not read:
            archived = None
        try:
            credentials = self._credentials_for(row)
        except CredentialsError:
            credentials = None
        failures = [Failure(*f) for f in entry["failures"]]
        delivered = list(entry["delivered"])
        relayed = (relayed_capture(self.config, row, original, delivered, entry["remote"], archived,
                                   self.spool.archive) if delivered and read else None)
        attempt = Attempt(self, row, decode_changes(entry["changes"]), failures, credentials, original, relayed,
                          entry["owner"])
        with handoff(), database.atomic():
            # The row under the attempt's claim again (it may have run out), then its outcome.
            taken = m.update(claimed_by=entry["owner"]).where(
                (m.id == row.id) & (m.state == "queued") & (m.attempts == entry["attempts"])
                & (m.claimed_by.is_null() | m.claimed_by.in_(owners) | (m.claimed_until < now))).execute()
            if taken != 1 or not store_attempts([(attempt,)])[0]:
                return "held"  # changed in between: looked at again next time
        if entry["finished"]:
            self.spool.remove(row)
        self._count(delivered, not entry["finished"], failures)
        log.info("%s: relay outcome recorded from the node's journal (journalled %s UTC)", queue_id,
                 entry.get("journalled"))
        return "recorded"

    def bounce(
        self,
        row: OutboundMessage,
        failures: list[Failure],
        credentials: Credentials | None,
        original: bytes,
    ) -> None:
        """Queue a delivery status notification (RFC 3464) of ``failures`` to the sender,
        inside the caller's transaction."""
        if row.is_bounce or not row.mail_from:
            log.info("%s: undeliverable bounce dropped (never bounce a bounce)", row.queue_id)
            return
        dsn = build_dsn(
            original,
            row.mail_from,
            failures,
            hostname=self.config.smtp.hostname,
            company_domain=self.config.company.domains[0],
            language=self.config.company.language,
            arrival_date=row.created_at,
            queue_id=row.queue_id,
        )
        queue_id = new_queue_id()
        sealed = None
        auth_refused = any(f.status == "5.7.8" for f in failures)
        if credentials and self._employee_auth(row) and self._key is not None and not auth_refused:
            # The DSN goes to the employee with the employee's own login.
            sealed = seal(self._key, credentials[0], credentials[1], queue_id)
        try:
            bounce = self.spool.enqueue(
                "", [row.mail_from], dsn, is_bounce=True, credentials=sealed,
                employee_id=row.employee_id, queue_id=queue_id,
            )
        except SpoolError as exc:
            log.error("%s: could not queue the bounce to <%s>: %s", row.queue_id, row.mail_from, exc)
            return
        log.info("%s: sender non-delivery notification: %s", row.queue_id, bounce.queue_id)

    def _count(self, delivered: list[str], deferred: bool, failures: list[Failure]) -> None:
        if delivered:
            relay_results.labels("relayed").inc()
        if deferred:
            relay_results.labels("deferred").inc()
        if failures:
            relay_results.labels("bounced").inc()

    def _log(self, row: OutboundMessage, now: dt.datetime, replies: dict[str, Reply]) -> None:
        """One Postfix-style line per outcome of this attempt (recipients sharing it)."""
        groups: dict[tuple[str, str], list[str]] = {}
        for rcpt, reply in replies.items():
            groups.setdefault((reply.outcome, str(reply)), []).append(rcpt)
        delay = (now - row.created_at).total_seconds()
        for (outcome, reply), rcpts in groups.items():
            level = logging.INFO if outcome != "deferred" else logging.WARNING
            log.log(
                level, "%s to=%s relay=%s delay=%.1f status=%s (%s)",
                row.queue_id, ",".join(f"<{r}>" for r in rcpts), self.connection.relay,
                delay, outcome, reply,
            )

    def _log_expired(self, row: OutboundMessage, now: dt.datetime, rcpts: list[str]) -> None:
        log.info(
            "%s to=%s relay=%s delay=%.1f status=bounced (delivery time expired)",
            row.queue_id, ",".join(f"<{r}>" for r in rcpts), self.connection.relay,
            (now - row.created_at).total_seconds(),
        )


def apply_outcome_journal(config: Config, spool: Spool, credentials_key: bytes | None,
                          journal: OutcomeJournal) -> int:
    """At a node's start, before it releases its old claims: record the outcomes its journal
    holds (``RelayWorker.apply_journal``).  Blocking.  Returns how many were recorded."""
    if not len(journal):
        return 0
    worker = RelayWorker(config, spool, f"{config.node.name}-journal", credentials_key, journal=journal)
    try:
        return worker.apply_journal()
    finally:
        worker._executor.shutdown(wait=True)


@dataclass
class _Outcome:
    """An attempt on its way to the database, and what to do once it is recorded."""

    attempt: Attempt
    finished: bool  # the row leaves the queue: its spool file goes after the commit
    delivered: list[str]  # for the relay metrics, counted once the outcome is recorded
    retry_until: dt.datetime  # worker clock: a failed commit is tried again until then
    failed_commits: int = 0
    error: str = ""  # the last failed commit's


@dataclass
class Attempt:
    """The outcome of one delivery attempt, to be recorded (``store_attempts``)."""

    worker: RelayWorker
    row: OutboundMessage
    changes: dict[Any, Any]  # the queue row's new state (relayqueue.finish)
    failures: list[Failure]  # recipients to bounce
    credentials: Credentials | None
    original: bytes
    relayed: RelayedCopy | None  # the "relay:sent" archive sighting, if anything was delivered
    owner: str  # the claim it is recorded under (the worker's; a journalled outcome's own)


def store_attempt(attempt: Attempt) -> bool:
    """Record one attempt inside the caller's transaction (a group-commit savepoint)."""
    return store_attempts([(attempt,)])[0]


def store_attempts(jobs: list[tuple[Attempt]]) -> list[bool]:
    """Record attempts inside the caller's transaction (the batch form of ``store_attempt``):
    each queue row's new state — only while the claim is still ours; a lost claim changes
    nothing, False — its bounce, and the archive sightings of the relayed copies with one
    look-up of their records."""
    relayed: list[RelayedCopy] = []
    # Bounces' queue rows and the sightings: one statement per table.
    with buffered_inserts((ArchiveSighting, OutboundMessage)):
        stored = finish_many([(a.row.id, a.owner, a.changes) for (a,) in jobs])
        for (a,), ours in zip(jobs, stored, strict=True):
            if not ours:  # the claim was lost: nothing of this attempt is recorded
                continue
            if a.failures:
                a.worker.bounce(a.row, a.failures, a.credentials, a.original)
            if a.relayed is not None:
                relayed.append(a.relayed)
        record_relayed(relayed)
    return stored


def _normalize_eol(data: bytes) -> bytes:
    """Bare CR / bare LF become CRLF: no next hop can be made to split the message.
    (Counting is C-speed; the regex runs only when a bare one is there.)"""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
        return data
    return _EOL.sub(b"\r\n", data)
