"""Deferred blob durability: the SMTP path's blob files made durable in bulk, after the 250.

Before this, every accepted message cost an fsync of its blob file (and one of its folder)
before the 250: each forces the file's data to disk on its own, and under load those
synchronous small writes were the largest cost left on the mail path (bench_smtp: without
them +25-35 % msg/s; moving them to other threads or batching them gained nothing — the
data writes themselves are the cost).

So the sealed blob (compressed and encrypted, the very bytes of the file) also goes into the
group commit's transaction as an ``ArchivePendingBlob`` row: the WAL fsync that makes the
queue row durable makes the message's bytes durable with it, in the same sequential write.
The file itself is written (temporary name, rename) without an fsync.  ``BlobSyncer`` then,
about once a second, makes every file written so far durable with one ``syncfs`` of the
archive's file system (all processes' writes: the node's and its acceptors') and deletes the
rows committed before it started.  After a crash or power cut, ``recover`` (node start-up,
before anything reads a blob) writes every file that still has a row again, durably, from
the row, then deletes the rows.  So from the 250 on, the bytes are always in one durable
place: the row until the file is synced, the file after.

Only blobs up to ``PENDING_MAX`` sealed bytes take this way; a larger one is written and
fsynced before the 250 as before (and so is nothing else: a blob whose file existed already
is not written at all).  Through the WAL a blob costs its size in sequential writes (and again
at the checkpoint); its own fsync costs a journal commit and a small random write.  Measured:
5 KB messages (2–3 KB sealed) gain with the WAL (bench_smtp +2–32 % msg/s, CPU −15 %);
the archive bench's realistic 86 KiB messages (~70 KB sealed) lose (bench_archive node shape
−10 to −20 %).  So the cut lies between: plain-text mail takes the WAL, mail with attachments
its own fsync.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from pathlib import Path
from typing import Any

from peewee import BlobField, CharField, DateTimeField

from gateway.db.migrations import migration
from gateway.db.models import BaseModel, database, utcnow

log = logging.getLogger("mailgate.archive")

PENDING_MAX = 32 * 1024  # sealed bytes; larger blobs are fsynced before the 250 (see above)
SYNC_INTERVAL = 1.0  # seconds between two syncfs of the archive's file system


class ArchivePendingBlob(BaseModel):
    """A blob file written without an fsync, and its sealed bytes until it is synced."""

    node = CharField(max_length=100)  # the node whose archive directory holds the file
    name = CharField(max_length=200)  # BlobStore file name
    data = BlobField()
    created_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "archivependingblob"
        indexes = ((("node", "id"), False),)


@migration(156)
def archive_pending_blobs(db) -> None:
    """Sealed blobs kept in the database until their files are synced (see this module)."""
    db.create_tables([ArchivePendingBlob], safe=True)


def row(node: str, name: str, data: bytes) -> ArchivePendingBlob:
    """The row for a blob written without an fsync (insert it in the message's transaction)."""
    return ArchivePendingBlob(node=node, name=name, data=data, created_at=utcnow())


_libc: Any = None


def syncfs(directory: Path) -> None:
    """Make every write to ``directory``'s file system durable: ``syncfs(2)`` on Linux, else
    ``sync(2)`` (which waits for the writes on Linux and most systems)."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name, use_errno=True) if name else False
    if _libc and hasattr(_libc, "syncfs"):
        fd = os.open(directory, os.O_RDONLY)
        try:
            if _libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs {directory}: {os.strerror(err)}")
        finally:
            os.close(fd)
    else:
        os.sync()


def sync_once(store: Any, node: str) -> int:
    """One round: the rows of ``node`` committed so far noted, the file system synced, those
    rows deleted.  Returns how many rows were dropped.

    The rows themselves, not "every id up to the newest": on PostgreSQL ids are drawn from
    the sequence before the commit (in blocks, ``gateway.db.inserts``), so with several
    writers (acceptor processes) a row with a smaller id can commit after the look-up — its
    file written after the sync began — and must wait for the next round."""
    from gateway.db.writerlock import handoff
    from gateway.groupcommit import write_transaction

    m = ArchivePendingBlob
    ids = [i for i, in m.select(m.id).where(m.node == node).tuples()]
    if not ids:
        return 0
    syncfs(store.directory)  # every file of these rows was renamed into place before its commit
    dropped = 0
    with handoff(), write_transaction():
        for start in range(0, len(ids), 500):
            dropped += m.delete().where(m.id.in_(ids[start:start + 500])).execute()
    return dropped


def recover(store: Any, node: str) -> int:
    """After a crash: every blob file that still has a row is written again from it, durably,
    and the rows go.  Call before anything reads a blob (node start-up).  Returns how many."""
    from gateway.archive.store import PreparedBlob

    m = ArchivePendingBlob
    rows = list(m.select().where(m.node == node).order_by(m.id))
    if not rows:
        return 0
    for r in rows:
        data = bytes(r.data)
        path = store.path_of(r.name)
        try:
            path.unlink(missing_ok=True)  # maybe empty or torn: its data never reached the disk
            store.write(PreparedBlob("", r.name, 0, 0, data, len(data)))
        except OSError as exc:  # disk full, read-only: every row stays for the next start
            raise OSError(exc.errno, f"archive: {len(rows)} blob file(s) held in the database after an unclean "
                                     f"stop cannot be written to {store.directory} ({exc.strerror or exc}); "
                                     "they stay in the database until a start can write them") from exc
    with database.atomic():
        m.delete().where((m.node == node) & (m.id <= rows[-1].id)).execute()
    log.warning("archive: %d blob files written again from the database after an unclean stop", len(rows))
    return len(rows)


class BlobSyncer:
    """The node's thread that runs ``sync_once`` every ``interval`` seconds until stopped."""

    def __init__(self, store: Any, node: str, interval: float = SYNC_INTERVAL) -> None:
        self.store, self.node, self.interval = store, node, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="blob-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop, after a last round: a clean stop leaves no row behind."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        self._round()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._round()
        if not database.is_closed():
            database.close()

    def _round(self) -> None:
        try:
            sync_once(self.store, self.node)
        except Exception:  # the rows stay: the next round (or recover) takes them
            log.exception("archive: syncing pending blob files failed (retried)")
            from gateway.db import drop_connection

            drop_connection()  # the database may have been restarted: the next round reconnects
