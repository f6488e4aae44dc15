"""Group commit: one writer thread, many messages per transaction.

Each accepted message needs a few rows (archive record, queue row, maybe an
approval) committed before its 250.  With SQLite every commit is an fsync and
concurrent writers queue on one lock; so jobs from all SMTP sessions go to
one thread, which takes whatever is waiting (up to ``max_batch``), runs each
job in its own savepoint (one failing job does not spoil the others), fsyncs
the directories the jobs asked for once, commits once, and only then
resolves the callers' futures — nobody hears 250 before the commit.

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
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from peewee import Model, SqliteDatabase

from gateway.db.models import database
from gateway.spool import fsync_dir

log = logging.getLogger("mailgate.store")

_STOP = object()


def write_transaction() -> Any:
    """A transaction that will write: ``BEGIN IMMEDIATE`` on SQLite (the write lock first, so
    the busy timeout applies), a plain transaction on PostgreSQL; a savepoint when the caller
    already holds a transaction."""
    if isinstance(database.obj, SqliteDatabase) and not database.in_transaction():
        return database.atomic(lock_type="IMMEDIATE")
    return database.atomic()


_INSERT_SQL: dict[tuple, str] = {}


def insert_row(instance: Model) -> Model:
    """``instance.save(force_insert=True)`` for the hot path, without peewee building the
    statement again each time (its SQL generation costs more CPU than SQLite's insert):
    the INSERT text is cached per model, column set and backend.  The same columns and
    values as ``save()`` (the fields set on the instance, defaults included), the new id
    set on the instance.  Plain models only (no ``save()`` overrides, no signals)."""
    model = type(instance)
    meta = model._meta
    data = instance.__data__
    pk = meta.primary_key
    fields = [f for f in meta.sorted_fields if f.name in data and not (f is pk and data[f.name] is None)]
    db = database.obj
    key = (model, tuple(f.name for f in fields), type(db))
    sql = _INSERT_SQL.get(key)
    returning = not isinstance(db, SqliteDatabase) and pk.name not in data
    if sql is None:
        q = db.quote  # the identifier quote characters, e.g. '""'

        def ident(name: str) -> str:
            return f"{q[0]}{name}{q[1]}"

        columns = ", ".join(ident(f.column_name) for f in fields)
        params = ", ".join([db.param] * len(fields))
        sql = f"INSERT INTO {ident(meta.table_name)} ({columns}) VALUES ({params})"
        if returning:
            sql += f" RETURNING {ident(pk.column_name)}"
        _INSERT_SQL[key] = sql
    cursor = database.execute_sql(sql, [f.db_value(data[f.name]) for f in fields])
    if data.get(pk.name) is None:
        setattr(instance, pk.name, cursor.fetchone()[0] if returning else cursor.lastrowid)
    instance._dirty.clear()
    return instance


class GroupCommitter:
    def __init__(self, max_batch: int = 32):
        self.max_batch = max_batch
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._dirs: set[Path] = set()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches = 0
        self.jobs_done = 0

    async def submit(self, fn: Callable[..., Any], *args: Any, dirs: Iterable[Path] = ()) -> Any:
        """Run ``fn(*args)`` in the writer thread inside the next batch's transaction.
        ``dirs``: directories holding files this job wrote (renamed into place already);
        they are fsynced, once per batch and in parallel, before the batch takes the
        database write lock — not while holding it."""
        self._ensure_thread()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((fn, args, future, loop, frozenset(dirs)))
        return await future

    def run_sync(self, fn: Callable[..., Any], *args: Any, timeout: float = 300.0) -> Any:
        """The same from a plain thread (e.g. a relay worker): block until committed."""
        self._ensure_thread()
        done = threading.Event()
        box: dict[str, Any] = {}
        self._jobs.put((fn, args, (done, box), None, frozenset()))
        if not done.wait(timeout):
            raise TimeoutError("group commit did not answer in time")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def post(self, fn: Callable[..., Any], *args: Any,
             on_done: Callable[[Any, BaseException | None], None]) -> None:
        """From a plain thread, without waiting: ``on_done(result, error)`` runs in the
        writer thread after the commit (keep it short: no DB work, no blocking)."""
        self._ensure_thread()
        self._jobs.put((fn, args, on_done, None, frozenset()))

    def sync_dir(self, directory: Path) -> None:
        """Called from a job: fsync ``directory`` before this batch commits."""
        self._dirs.add(Path(directory))

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(_STOP)
            self._thread.join(30)
            self._thread = None

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            first = self._jobs.get()
            if first is _STOP:
                break
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    self._jobs.put(_STOP)
                    break
                batch.append(job)
            self._run_batch(batch)
        if not database.is_closed():
            database.close()

    def _run_batch(self, batch: list) -> None:
        outcomes: list[tuple[Any, BaseException | None]] = []
        self._dirs = set()
        from gateway.archive import chain  # here: gateway.archive imports this module

        try:
            # Directory entries of the batch's files first, outside the write lock: an fsync
            # takes milliseconds, and the relay process and the indexer wait for that lock.
            synced = set().union(*(job[4] for job in batch))
            _fsync_dirs(synced)
            # The archive hash chain is advanced in memory for the whole batch: its head row is
            # locked and read at the first archive append and written once before the commit.
            with write_transaction(), chain.batch(lazy=True):
                for fn, args, _, _, _ in batch:
                    try:
                        with database.atomic(), chain.savepoint():  # a savepoint per job
                            outcomes.append((fn(*args), None))
                    except Exception as exc:  # the job's own failure, reported to its caller
                        outcomes.append((None, exc))
                _fsync_dirs(self._dirs - synced)  # asked for by jobs with sync_dir()
        except Exception as exc:  # the commit itself failed: nobody's rows are stored
            log.error("group commit of %d jobs failed: %s", len(batch), exc)
            outcomes = [(None, exc)] * len(batch)
        self.batches += 1
        self.jobs_done += len(batch)
        for (_, _, future, loop, _), outcome in zip(batch, outcomes, strict=True):
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
                loop.call_soon_threadsafe(_resolve, future, outcome)


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


def _resolve(future: asyncio.Future, outcome: tuple[Any, BaseException | None]) -> None:
    if future.done():
        return
    result, exc = outcome
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
