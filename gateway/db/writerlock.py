"""Hand-off of the SQLite write lock between the group committers of a node's processes.

SQLite has one write lock per database and no queue for it: a writer that finds it
taken sleeps in its busy handler — 1, 2, 5, 10, 15, 20, 25 … ms — and looks again.  The
node's group committer and the relay process's both write several times a second, so
each often slept well past the moment the other let go (bench_smtp: the node's
committer waited ~7 ms per batch for a lock the relay held ~9 ms at a time, one fifth of
the time).  Taking an exclusive ``flock`` on a file beside the database before the
transaction makes the waiter sleep in the kernel instead, woken the moment the holder
releases it.

Only a hand-off, never what keeps data safe: SQLite's own lock still decides.  The group
committers, the relay's claims, the background indexer's write transactions and the blob
syncer take it; writers that do not (the panel, CLI tools) are unaffected and still wait
in SQLite's busy handler.  A holder only ever waits for SQLite's lock, never for
another holder, so there is no deadlock; a process that dies drops its flock.
PostgreSQL and in-memory databases: a no-op.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from peewee import SqliteDatabase

from gateway.db.models import database

_LOCKS: dict[str, WriterLock] = {}
_LOCKS_GUARD = threading.Lock()


class WriterLock:
    """One per database file and process: a thread lock (flock does not exclude threads
    that share the file) and the flock."""

    def __init__(self, path: Path):
        self.path = path
        self._threads = threading.Lock()
        self._pid = 0
        self._fd = -1

    def _file(self) -> int:
        # A forked child shares the parent's open file and with it the flock: its own, then.
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600), os.getpid()
        return self._fd

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._threads:
            fd = self._file()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)


def writer_lock() -> WriterLock | None:
    """The hand-off lock of the bound database (None: not a SQLite file)."""
    db = database.obj
    if not isinstance(db, SqliteDatabase) or db.database in ("", ":memory:") or db.database.startswith("file:"):
        return None
    key = os.path.abspath(db.database)
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = WriterLock(Path(f"{key}-writer.lock"))
        return lock


def handoff() -> AbstractContextManager[None]:
    """Hold the hand-off lock around a write transaction (see the module doc)."""
    lock = writer_lock()
    return lock.held() if lock is not None else nullcontext()
