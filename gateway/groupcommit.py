"""Group commit: one writer thread, many messages per transaction.

Each accepted message needs a few rows (archive record, queue row, maybe an
approval) committed before its 250.  With SQLite every commit is an fsync and
concurrent writers queue on one lock; so jobs from all SMTP sessions go to
one writer thread, which takes whatever is waiting (up to ``max_batch``), runs each
job in its own savepoint (one failing job does not spoil the others) and commits
once.  A job may have a batch form (``submit(…, many=)``): the jobs of a batch that share
it run as one call in one savepoint — one look-up and a few statements for all of them
instead of a savepoint and a dozen statements each (every statement is a moment the
writer gives up the GIL, and under load it waits milliseconds to get it back, holding
the write lock) — and, should that call fail, again one by one in savepoints of their
own, so one bad job still spoils only itself.  Around it, a pipeline
(``GroupCommitter``): before, a thread fsyncs the directories the batch's files were
written into (outside the write lock); after, a thread fsyncs the WAL and only then
resolves the callers' futures — nobody hears 250 before the commit is durable.

On SQLite (WAL) the committer's connection commits without an fsync of its own
(``synchronous=NORMAL``) and fsyncs the WAL file itself right after the commit — after
the write lock is released, before any caller is answered.  WAL frames are appended in
order, so that fsync makes this commit (and every earlier one) durable exactly as
``synchronous=FULL`` would, but the relay process, the indexer and the next batch no
longer wait for our disk flush while holding the lock (under load a WAL fsync took
6–10 ms, and the write lock, not the CPU, was what limited the SMTP path).  A checkpoint
in between does not matter: with NORMAL, SQLite syncs the WAL before a checkpoint and the
database file after it, before the WAL can be reused.  The one difference: the batch's
rows are visible to other connections a few milliseconds before they are durable, so a
relay worker could deliver a message whose queue row a power cut (not a crash: kill -9
loses nothing committed) then takes back — the client, which never heard 250, sends it
again.  That is the same at-least-once window as an upstream 250 followed by a power
cut before the relay outcome's commit.

A failed job or batch is answered with its exception.  The queue files a job wrote for its
rows (``gateway.spool.files_written``: a relay outcome's bounce, a hold's original and its
notices) are removed here once the failure is known to have stored nothing: a job's own
failure (its savepoint rolled back: at once, before the jobs of a failed batch form run
again one by one), a batch that failed before its COMMIT, a COMMIT the database refused; the
SMTP handler removes the files it wrote before the job on the same rule.  When the COMMIT's
outcome is not known — the connection lost while it was under way (PostgreSQL: the server
may have applied it before the reply was lost), an I/O error inside SQLite's commit, or a
commit that went through but whose WAL fsync failed — the exception is marked
(``outcome_unknown``): the rows may exist, so their files stay (a file whose row may exist
is never deleted), and the orphan sweep (``Spool.sweep_orphans``, at start and hourly) removes those whose rows
do not, keeps the others (the message relayed, the hold decided).

On SQLite the batch transaction is ``BEGIN IMMEDIATE``: it takes the write lock up
front, waiting (busy_timeout) for other writers such as the relay process.  A
deferred transaction would start as a reader, and if any job reads before it
writes while another process commits, SQLite cannot upgrade the stale read
snapshot and fails at once with "database is locked" — the busy timeout does not
apply to that case.  ``write_transaction()`` gives other writers the same start.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from peewee import SqliteDatabase

from gateway.db.errors import describe_db_error
from gateway.db.models import database
from gateway.db.writerlock import handoff
from gateway.spool import files_written, fsync_dir, remove_files

log = logging.getLogger("mailgate.store")

_STOP = object()


class CommitterStopped(RuntimeError):
    """A job handed to a ``GroupCommitter`` after its ``stop()``: it is not run (a stopped
    committer does not start its threads again — they would outlive the node's stop)."""

    def __init__(self) -> None:
        super().__init__("group commit stopped")


_UNKNOWN = "mailgate_commit_outcome_unknown"  # the mark an exception gets (``mark_commit_failure``)
# SQLite errors of a COMMIT that say it did not happen: the lock or the disk space was not
# there, so nothing was written.  Any other error inside the commit (an I/O error once the
# WAL frames may be written, a corruption) leaves its outcome unknown.
_SQLITE_NOT_COMMITTED = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL")


def outcome_unknown(exc: BaseException | None) -> bool:
    """Whether a failed group-commit job (or a transaction marked by ``mark_commit_failure``)
    may have been stored all the same: its COMMIT failed without saying whether it was applied,
    or was applied but not made durable.  Its files must then stay (the orphan sweep decides);
    any other failure stored nothing, and the caller removes the files its job wrote."""
    return exc is not None and bool(getattr(exc, _UNKNOWN, False))


def commit_outcome_unknown(exc: BaseException) -> bool:
    """For an exception raised by a COMMIT: True unless it says the transaction was not applied.
    PostgreSQL: the server answering the COMMIT with an error (any SQLSTATE but connection
    exception, class 08, and operator intervention, 57 — a shutdown may end the backend after
    its commit record was written) rolled the transaction back; an error with no SQLSTATE (the
    connection lost, the driver's own) is unknown.  SQLite: busy, locked or full said no;
    anything else is unknown."""
    import sqlite3

    from gateway.db.errors import is_postgres_error

    driver = getattr(exc, "orig", None)
    if not isinstance(driver, BaseException):
        driver = exc
    if is_postgres_error(driver):
        code = getattr(driver, "pgcode", None) or ""
        return not code or code[:2] in ("08", "57")
    if isinstance(driver, sqlite3.Error):
        return getattr(driver, "sqlite_errorname", "") not in _SQLITE_NOT_COMMITTED \
            and "database is locked" not in str(driver) and "database or disk is full" not in str(driver)
    return True


def mark_commit_failure(exc: BaseException) -> BaseException:
    """``exc``, raised by a COMMIT, marked as of an unknown outcome (``outcome_unknown``) when
    ``commit_outcome_unknown`` says so."""
    if commit_outcome_unknown(exc):
        _mark_unknown(exc)
    return exc


def _mark_unknown(exc: BaseException) -> None:
    try:
        setattr(exc, _UNKNOWN, True)
    except AttributeError:  # an exception type without a __dict__: nothing to mark
        log.warning("group commit: cannot mark %s as of an unknown outcome", type(exc).__name__)


class _Job(NamedTuple):
    fn: Callable[..., Any]
    args: tuple
    reply: Any  # a future (submit), (Event, box) (run_sync) or a callback (post)
    loop: asyncio.AbstractEventLoop | None  # the future's event loop (submit only)
    dirs: frozenset  # directories to fsync before the batch's transaction
    many: Callable[[list[tuple]], list] | None  # the batch form of fn


def write_transaction() -> Any:
    """A transaction that will write: ``BEGIN IMMEDIATE`` on SQLite (the write lock first, so
    the busy timeout applies), a plain transaction on PostgreSQL; a savepoint when the caller
    already holds a transaction."""
    if isinstance(database.obj, SqliteDatabase) and not database.in_transaction():
        return database.atomic(lock_type="IMMEDIATE")
    return database.atomic()


class GroupCommitter:
    """Three threads, a pipeline: ``group-commit-sync`` gathers waiting jobs into a batch and
    fsyncs the directories they named; ``group-commit`` runs batches in one transaction each
    (taking whatever batches are ready, up to ``max_batch`` jobs); ``group-commit-done``
    fsyncs the SQLite WAL once for every batch committed meanwhile and only then answers the
    callers.  So the thread that holds the database write lock never waits for a disk flush,
    and the next batch's directory fsyncs overlap the current batch's transaction."""

    def __init__(self, max_batch: int = 32, linger: float = 0.0):
        """``linger``: seconds the first job of a batch may wait for more to join it — for a
        committer whose callers do not wait for the answer (the relay process's outcomes),
        so that fewer, larger transactions take the shared write lock."""
        self.max_batch = max_batch
        self.linger = linger
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._ready: queue.SimpleQueue = queue.SimpleQueue()  # (batch, fsynced dirs) for the writer
        self._done: queue.SimpleQueue = queue.SimpleQueue()  # (batch, outcomes, wal) to answer
        self._dirs: set[Path] = set()
        self._thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopped = False  # by stop(): every later job raises CommitterStopped
        self.batches = 0
        self.jobs_done = 0
        # Seconds spent per phase (logged at stop): directory fsyncs, waiting for the write
        # lock (BEGIN), running the jobs, committing, the WAL fsync.  Where the time goes.
        # jobs_cpu: the writer thread's CPU while running jobs (jobs - jobs_cpu ≈ waits for the GIL).
        self.seconds = dict.fromkeys(("fsync_dirs", "begin", "jobs", "jobs_cpu", "commit", "fsync_wal"), 0.0)
        self._wal_conn: Any = None  # the connection set to synchronous=NORMAL (see _wal_path)
        self._wal: Path | None = None

    async def submit(self, fn: Callable[..., Any], *args: Any, dirs: Iterable[Path] = (),
                     many: Callable[[list[tuple]], list] | None = None) -> Any:
        """Run ``fn(*args)`` in the writer thread inside the next batch's transaction.
        ``dirs``: directories holding files this job wrote (renamed into place already);
        they are fsynced, once per batch and in parallel, before the batch takes the
        database write lock — not while holding it.  ``many``: the batch form of ``fn``,
        called with the ``args`` of every job of the batch that names the same ``many`` and
        returning their results in order; it must do what ``fn`` would do for each (``fn``
        runs instead, job by job, if it raises)."""
        return await self.enqueue(fn, *args, dirs=dirs, many=many)

    def enqueue(self, fn: Callable[..., Any], *args: Any, dirs: Iterable[Path] = (),
                many: Callable[[list[tuple]], list] | None = None) -> asyncio.Future:
        """``submit`` without the wait, from the event loop: the job is queued at once and the
        returned future (of the running loop) gets its outcome after the commit is durable.
        Once queued, a job runs and commits whatever happens to its caller: a caller that may
        be cancelled meanwhile awaits ``asyncio.shield(future)`` and reads the outcome in a
        done-callback (cancelling the future itself only discards the outcome, not the job)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._put(_Job(fn, args, future, loop, frozenset(dirs), many))
        return future

    def run_sync(self, fn: Callable[..., Any], *args: Any, timeout: float = 300.0) -> Any:
        """The same from a plain thread (e.g. a relay worker): block until committed."""
        done = threading.Event()
        box: dict[str, Any] = {}
        self._put(_Job(fn, args, (done, box), None, frozenset(), None))
        if not done.wait(timeout):
            raise TimeoutError("group commit did not answer in time")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def post(self, fn: Callable[..., Any], *args: Any,
             on_done: Callable[[Any, BaseException | None], None],
             many: Callable[[list[tuple]], list] | None = None, dirs: Iterable[Path] = ()) -> None:
        """From a plain thread, without waiting: ``on_done(result, error)`` runs in the
        committer's answering thread after the commit is durable (keep it short: no DB
        work, no blocking).  ``many`` and ``dirs``: as for ``submit``."""
        self._put(_Job(fn, args, on_done, None, frozenset(dirs), many))

    def sync_dir(self, directory: Path) -> None:
        """Called from a job: fsync ``directory`` before this batch commits."""
        self._dirs.add(Path(directory))

    def stop(self) -> None:
        """Run the jobs queued so far, then end the threads (waiting up to 30 s for each).
        For good: a job handed in afterwards raises ``CommitterStopped`` (``submit``,
        ``enqueue``, ``run_sync``, ``post`` alike) — so the callers (SMTP sessions, relay
        workers) are stopped first."""
        with self._lock:
            self._stopped = True
            threads, self._threads, self._thread = self._threads, [], None
            if threads:  # under the lock: no job can be queued behind the stop
                self._jobs.put(_STOP)  # passes through every stage, after the jobs queued before it
        for thread in threads:
            thread.join(30)
        if threads and self.batches:
            log.info("group commit: %d jobs in %d batches (%.1f per batch); seconds %s", self.jobs_done,
                     self.batches, self.jobs_done / self.batches,
                     " ".join(f"{k}={v:.2f}" for k, v in self.seconds.items()))

    def _put(self, job: _Job) -> None:
        """Queue ``job``, starting the threads at the first one; ``CommitterStopped`` after ``stop``."""
        with self._lock:
            if self._stopped:
                raise CommitterStopped()
            if self._thread is None:
                self._threads = [
                    threading.Thread(target=self._gather, name="group-commit-sync", daemon=True),
                    threading.Thread(target=self._run, name="group-commit", daemon=True),
                    threading.Thread(target=self._answer, name="group-commit-done", daemon=True),
                ]
                self._thread = self._threads[1]
                for thread in self._threads:
                    thread.start()
            self._jobs.put(job)

    @staticmethod
    def _take(source: queue.SimpleQueue, first: Any, limit: int, size: Callable[[Any], int]) -> tuple[list, bool]:
        """``first`` and whatever else is waiting in ``source`` (up to ``limit`` by ``size``);
        True as well if a stop came after them."""
        items, total = [first], size(first)
        while total < limit:
            try:
                item = source.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return items, True
            items.append(item)
            total += size(item)
        return items, False

    def _gather(self) -> None:
        """Stage 1: a batch of waiting jobs, their directories fsynced (no lock held)."""
        stopping = False
        while not stopping:
            first = self._jobs.get()
            if first is _STOP:
                break
            batch, stopping = self._take(self._jobs, first, self.max_batch, lambda _: 1)
            if self.linger and not stopping:
                stopping = self._linger(batch)
            synced = set().union(*(job.dirs for job in batch))
            started = time.monotonic()
            try:
                # Directory entries of the batch's files first, outside the write lock: an fsync
                # takes milliseconds, and the relay process and the indexer wait for that lock.
                _fsync_dirs(synced)
            except Exception as exc:  # nothing of this batch may be committed
                log.error("group commit: fsync of %d directories failed: %s", len(synced), exc)
                self._done.put((batch, [(None, exc)] * len(batch), None))
                continue
            finally:
                self.seconds["fsync_dirs"] += time.monotonic() - started
            self._ready.put((batch, synced))
        self._ready.put(_STOP)

    def _linger(self, batch: list) -> bool:
        """Let more jobs join ``batch`` for up to ``linger`` seconds; True if a stop came."""
        deadline = time.monotonic() + self.linger
        while len(batch) < self.max_batch and (left := deadline - time.monotonic()) > 0:
            try:
                job = self._jobs.get(timeout=left)
            except queue.Empty:
                break
            if job is _STOP:
                return True
            batch.append(job)
        return False

    def _run(self) -> None:
        """Stage 2: every batch that is ready, in one transaction (the write lock's holder)."""
        stopping = False
        while not stopping:
            first = self._ready.get()
            if first is _STOP:
                break
            ready, stopping = self._take(self._ready, first, self.max_batch, lambda item: len(item[0]))
            batch = [job for jobs, _ in ready for job in jobs]
            synced = set().union(*(dirs for _, dirs in ready))
            outcomes, wal = self._run_batch(batch, synced)
            self._done.put((batch, outcomes, wal))
        self._done.put(_STOP)
        if not database.is_closed():
            database.close()

    def _answer(self) -> None:
        """Stage 3: one WAL fsync for the batches committed meanwhile, then their answers."""
        stopping = False
        while not stopping:
            first = self._done.get()
            if first is _STOP:
                break
            done, stopping = self._take(self._done, first, 1 << 30, lambda _: 1)
            wals = {wal for _, _, wal in done if wal is not None}
            failed: BaseException | None = None
            started = time.monotonic()
            for wal in wals:
                try:
                    _fsync_file(wal)  # the commits are durable from here on (see the module doc)
                except OSError as exc:
                    # Committed but perhaps not durable: answered as a failure (a client then
                    # sends again, and may store the message twice; never a 250 for it), of an
                    # unknown outcome — the rows are there now, and may be after a restart, so
                    # their files stay.
                    log.error("group commit: fsync of %s failed: %s; the batches' files are kept"
                              " (the orphan sweep removes those whose rows did not last)", wal, exc)
                    _mark_unknown(exc)
                    failed = exc
            self.seconds["fsync_wal"] += time.monotonic() - started
            for batch, outcomes, wal in done:
                if failed is not None and wal is not None:
                    outcomes = [(None, failed)] * len(batch)
                self._resolve_all(batch, outcomes)

    def _run_batch(self, batch: list, synced: set[Path]) -> tuple[list, Path | None]:
        """One transaction for the batch, a savepoint per job; the outcomes, and the WAL file to
        fsync before answering (None: nothing to flush, or the commit was durable already)."""
        outcomes: list[tuple[Any, BaseException | None]] = []
        self._dirs = set()
        from gateway.archive import chain  # here: gateway.archive imports this module

        seconds = self.seconds
        wal = None
        committing = False
        files: list[Path] = []  # written by the batch's jobs that succeeded
        try:
            wal = self._wal_path()
            t1 = time.monotonic()
            # The archive hash chain is advanced in memory for the whole batch: its head row is
            # locked and read at the first archive append and written once before the commit.
            # The hand-off lock first (gateway.db.writerlock): woken the moment another
            # writer lets go, instead of SQLite's busy handler sleeping past it.
            with handoff(), write_transaction():
                with chain.batch(lazy=True):
                    t2, c2 = time.monotonic(), time.thread_time()
                    seconds["begin"] += t2 - t1
                    outcomes = _run_jobs(batch, files)
                    seconds["jobs_cpu"] += time.thread_time() - c2
                    _fsync_dirs(self._dirs - synced)  # asked for by jobs with sync_dir()
                    t1 = time.monotonic()
                    seconds["jobs"] += t1 - t2
                committing = True  # what fails from here on is the COMMIT
            seconds["commit"] += time.monotonic() - t1
        except Exception as exc:  # the batch failed: nobody's rows are stored (or, at the COMMIT, perhaps all)
            if committing and outcome_unknown(mark_commit_failure(exc)):
                log.error("group commit of %d jobs: the COMMIT failed with an unknown outcome (%s); their files"
                          " (%d written by the jobs) are kept: the orphan sweep removes those whose rows were"
                          " not stored", len(batch), describe_db_error(exc), len(files))
            else:
                log.error("group commit of %d jobs failed: %s", len(batch), describe_db_error(exc))
                _remove_written(files)
            outcomes = [(None, exc)] * len(batch)
            wal = None
        self.batches += 1
        self.jobs_done += len(batch)
        return outcomes, wal

    @staticmethod
    def _resolve_all(batch: list, outcomes: list[tuple[Any, BaseException | None]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}  # one wake-up per event loop, not per job
        for job, outcome in zip(batch, outcomes, strict=True):
            future, loop = job.reply, job.loop
            if callable(future):  # post(): the caller's callback
                try:
                    future(*outcome)
                except Exception:
                    log.exception("group commit: a completion callback failed")
            elif loop is None:  # a run_sync caller waiting on an Event
                done, box = future
                box["result"], error = outcome
                if error is not None:
                    box["error"] = error
                done.set()
            else:
                by_loop.setdefault(loop, []).append((future, outcome))
        for loop, answers in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_many, answers)
            except RuntimeError:  # the caller's event loop is closed: nobody to answer
                log.warning("group commit: an event loop closed before its %d answers", len(answers))

    def _wal_path(self) -> Path | None:
        """SQLite in WAL mode: switch this thread's connection to ``synchronous=NORMAL`` (once
        per connection) and return the WAL file that ``_answer`` fsyncs after each commit.
        None elsewhere (PostgreSQL, other journal modes): the commit itself is durable."""
        db = database.obj
        if not isinstance(db, SqliteDatabase):
            return None
        conn = database.connection()
        if self._wal_conn is not conn:
            self._wal_conn, self._wal = conn, None
            (mode,) = database.execute_sql("PRAGMA journal_mode").fetchone()
            if str(mode).lower() == "wal":
                database.execute_sql("PRAGMA synchronous=NORMAL")
                wal = Path(f"{db.database}-wal")
                _fsync_file(wal.parent)  # the WAL file's own directory entry, once
                self._wal = wal
        return self._wal


def _run_jobs(batch: list[_Job], files: list[Path]) -> list[tuple[Any, BaseException | None]]:
    """Inside the batch's transaction: every job in a savepoint of its own, except jobs with a
    batch form, which run together (see ``GroupCommitter.submit``).  The queue files written
    by a job that fails (its savepoint rolled back) are removed at once; those of the jobs that
    succeed are added to ``files`` (removed if the commit fails)."""
    from gateway.archive import chain  # here: gateway.archive imports this module

    def one(job: _Job) -> tuple[Any, BaseException | None]:
        with files_written() as written:
            try:
                with database.atomic(), chain.savepoint():  # a savepoint per job
                    result = job.fn(*job.args)
            except Exception as exc:  # the job's own failure, reported to its caller
                _remove_written(written)
                return None, exc
        files.extend(written)
        return result, None

    outcomes: list[Any] = [None] * len(batch)
    groups: dict[Callable, list[int]] = {}
    for i, job in enumerate(batch):
        if job.many is not None:
            groups.setdefault(job.many, []).append(i)
        else:
            outcomes[i] = one(job)
    for many, members in groups.items():
        with files_written() as written:
            try:
                with database.atomic(), chain.savepoint():
                    results = many([batch[i].args for i in members])
                    if len(results) != len(members):  # inside: its rows roll back before each job runs alone
                        raise RuntimeError(f"{many!r} answered {len(results)} results for {len(members)} jobs")
            except Exception as exc:  # one job's failure must not spoil the others: each alone
                failed: Exception | None = exc
            else:
                failed = None
        if failed is not None:
            log.warning("group commit: the batch form of %d jobs failed (%s); running them one by one",
                        len(members), describe_db_error(failed))
            _remove_written(written)  # rolled back: before the jobs write them again
            for i in members:
                outcomes[i] = one(batch[i])
        else:
            files.extend(written)
            for i, result in zip(members, results, strict=True):
                outcomes[i] = (result, None)
    return outcomes


def _remove_written(files: list[Path]) -> None:
    """The queue files of rows that were not stored (a rolled-back savepoint, a failed batch)."""
    try:
        if removed := remove_files(files):
            log.info("group commit: removed %d file(s) written for rows that were not stored", removed)
    except OSError as exc:  # left to the orphan sweep
        log.error("group commit: could not remove the files of rows that were not stored: %s", exc)


_fsync_file = fsync_dir  # opens the path read-only and fsyncs it: a directory or a file alike


_DIR_POOL: ThreadPoolExecutor | None = None


def _fsync_dirs(dirs: set[Path]) -> None:
    """fsync every directory; several in parallel (concurrent fsyncs share journal commits)."""
    global _DIR_POOL
    if len(dirs) <= 1:
        for directory in dirs:
            fsync_dir(directory)
        return
    if _DIR_POOL is None:
        _DIR_POOL = ThreadPoolExecutor(8, thread_name_prefix="dir-fsync")
    list(_DIR_POOL.map(fsync_dir, dirs))  # re-raises the first failure


def _resolve_many(answers: list[tuple[asyncio.Future, tuple[Any, BaseException | None]]]) -> None:
    for future, (result, exc) in answers:
        if future.done():
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
