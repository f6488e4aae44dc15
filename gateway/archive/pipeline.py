"""``Archive.ingest_many(pipeline=True)``: the index step of one batch (``index_committed``,
its documents written after the chain commit) runs on a background thread while the caller
goes on with the next batch — on PostgreSQL that step mostly waits for the server (GIN
upkeep) while the next batch's blobs are client CPU.

At most one write in flight (order kept; memory: one batch's extracted texts): a hand-over
first waits for the write before it.  The thread connects to the database for each write and
closes the connection after it (peewee keeps a connection per thread; none stays open to
hold a database), and it is a ``ThreadPoolExecutor`` worker: joined when the interpreter
exits, so a write in flight ends first, and the thread never keeps the process alive.  A
write that fails is logged here; its records stay without documents, which the background
indexer (``indexer.index_pending``) indexes — as after a kill -9 during the write.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from gateway.db import is_postgres
from gateway.db.models import database

log = logging.getLogger("mailgate.archive")


# SQLite too?  Measured (bench_archive's batch shape, 2 cores, 2026-12-01): no gain there — the
# document write is in-process CPU (≈ 0.3 ms a message inline) that the next batch's sealing
# threads then compete with for the GIL and the cores: 1-9 % fewer msg/s in 3 of 4 pairs and up
# to 0.6 ms more CPU a message (BENCHMARKS.md, archive, 2026-12-01).  Tests set it to run the
# thread on SQLite as well.
ON_SQLITE = False


def worthwhile() -> bool:
    """Whether ``ingest_many(pipeline=True)`` hands its index write to the thread on this
    database: on PostgreSQL, where the write mostly waits for the server (GIN upkeep)."""
    return ON_SQLITE or is_postgres()


class IndexWriter:
    """One thread (started on first use) that runs one batch's index write at a time."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # hand-overs from several threads: still one write in flight
        self._inflight: Future | None = None

    def hand_over(self, write: Callable[[], object]) -> None:
        """Wait for the write in flight, then start ``write`` on the thread and return."""
        with self._lock:
            self.wait()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="archive-index-write")
            self._inflight = self._pool.submit(_run, write)

    def wait(self) -> None:
        """Until the write in flight (if any) is over; raises nothing (``_run`` logged a failure)."""
        inflight = self._inflight
        if inflight is not None:
            wait([inflight])


def _run(write: Callable[[], object]) -> None:
    try:
        with database.obj.connection_context():  # this thread's connection, closed after the write
            write()
    except Exception:
        log.exception("archive batch: background index write failed (records kept; the indexer indexes them)")
