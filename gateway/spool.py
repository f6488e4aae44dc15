"""The durable outbound queue: a spooled file plus a DB row per message.

Order of writes, so that a 250 always means "stored":
  1. the message bytes go to ``spool/<queue id>.eml.tmp``, fsync, rename to
     ``.eml``, fsync the directory;
  2. the ``OutboundMessage`` row is committed (SQLite synchronous=FULL, or
     PostgreSQL's commit);
  3. only then does the SMTP layer answer 250 with the queue id.
A crash between 1 and 2 leaves an orphan file that ``sweep_orphans`` removes (at start and
hourly while the node runs; a file younger than an hour stays, and so does every file whose
row exists: a COMMIT that reported failure but was applied keeps its message); the client got
no 250 and sends again.  A commit known to have failed removes its files at once: the SMTP handler its
own, the group commit those its jobs wrote (``files_written``: a bounce, an approval notice,
a held message's original); neither when the commit's outcome is unknown
(``gateway.groupcommit.outcome_unknown``).  All functions here block: call them from a
worker thread, never on the event loop.

An accepted submission is not written twice: its archive blob (encrypted,
compressed, fsynced like a spool file) holds the very bytes the relay sends, so
its queue row points at the blob instead (``spool_path`` = ``archive:<blob
name>:<sha256>``, see ``archive_ref``) and the relay reads it back through the
archive; no spool file exists for it and none is removed after delivery.
Bounces, held messages and shared spools keep spool files.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gateway.db.inserts import insert_row
from gateway.db.models import OutboundMessage, database, utcnow

log = logging.getLogger("mailgate")

# Spool files with no queue row are removed once older than this (``Spool.sweep_orphans``),
# at start and every ``SWEEP_INTERVAL`` while the node runs.
ORPHAN_AGE = 3600.0
SWEEP_INTERVAL = 3600.0


class SpoolError(OSError):
    """The message could not be stored (disk full, DB down …): answer 4xx.

    ``errno`` is ENOSPC when the disk is full."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def new_queue_id() -> str:
    """Time-ordered, unguessable id: 11 hex digits of ms time + 6 random."""
    return f"{int(time.time() * 1000):011X}{secrets.token_hex(3).upper()}"


def write_durably(path: Path, data: bytes, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` atomically and durably (fsync file and directory).

    ``sync_dir=False`` leaves the directory fsync to the caller, who may do it
    once for many files (see gateway.groupcommit)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """fsync a directory's entries (any path opened read-only: a file's data too)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


_written = threading.local()  # .files: the list ``files_written`` collects into, in this thread


@contextmanager
def files_written() -> Iterator[list[Path]]:
    """The queue files written in this thread meanwhile (``Spool.write``, and ``note_written``
    for others such as a held message's original), for a caller that removes them should the
    rows they belong to not be committed (``gateway.groupcommit``, per job).  Nested: the outer
    collection gets the inner one's files too."""
    outer = getattr(_written, "files", None)
    files: list[Path] = []
    _written.files = files
    try:
        yield files
    finally:
        _written.files = outer
        if outer is not None:
            outer.extend(files)


def note_written(path: Path) -> None:
    """``path`` was just written for a row of the current transaction (see ``files_written``;
    nothing happens outside one)."""
    files = getattr(_written, "files", None)
    if files is not None:
        files.append(Path(path))


def remove_files(paths: Iterable[Path]) -> int:
    """Unlink ``paths`` (already gone: fine); how many were there."""
    removed = 0
    for path in paths:
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
    return removed


ARCHIVE_PREFIX = "archive:"


def archive_ref(blob_name: str, sha256: str) -> str:
    """The ``spool_path`` of a queue row whose bytes are an archive blob."""
    return f"{ARCHIVE_PREFIX}{blob_name}:{sha256}"


def parse_archive_ref(spool_path: str) -> tuple[str, str] | None:
    """(blob name, sha256) of an archive-backed row, None for a spool file."""
    if not spool_path.startswith(ARCHIVE_PREFIX):
        return None
    name, _, sha256 = spool_path[len(ARCHIVE_PREFIX):].rpartition(":")
    return name, sha256


class Spool:
    def __init__(self, directory: Path, node: str = "", archive: Any = None):
        """``node``: recorded on each row so only this node relays it ("" = shared spool).
        ``archive``: a gateway.archive.Archive to read archive-backed rows from."""
        self.directory = Path(directory)
        self.node = node
        self.archive = archive
        self.directory.mkdir(parents=True, exist_ok=True)

    def path_for(self, queue_id: str) -> Path:
        return self.directory / f"{queue_id}.eml"

    def enqueue(
        self,
        mail_from: str,
        recipients: Iterable[str],
        data: bytes,
        *,
        queue_id: str | None = None,
        **fields: object,
    ) -> OutboundMessage:
        """Store a message durably (file, then row); return its queue row.  Raises SpoolError.

        ``fields``: employee_id, message_id, credentials, is_bounce, state."""
        queue_id = queue_id or new_queue_id()
        self.write(queue_id, data)
        return self.insert(queue_id, mail_from, recipients, len(data), **fields)

    def write(self, queue_id: str, data: bytes, sync_dir: bool = True) -> Path:
        """Phase 1: the message file, fsynced (and its directory entry unless the
        caller syncs the directory itself).  Raises SpoolError.  Inside a group-commit job
        the file is noted (``note_written``) and removed should the job's rows not be stored:
        there, write only the files of new rows, never one a committed row points at."""
        path = self.path_for(queue_id)
        try:
            write_durably(path, data, sync_dir=sync_dir)
        except OSError as exc:
            raise SpoolError(exc.errno, f"spool write failed: {exc.strerror or exc}") from exc
        note_written(path)
        return path

    def insert(
        self,
        queue_id: str,
        mail_from: str,
        recipients: Iterable[str],
        size: int,
        **fields: Any,
    ) -> OutboundMessage:
        """Phase 2: the queue row for a file already written (or, with ``spool_path`` =
        ``archive_ref(…)``, for an archive blob already written), in a savepoint.  On failure
        the file is removed and SpoolError raised.  ``fields``: as ``row``."""
        try:
            with database.atomic():
                return insert_row(self.row(queue_id, mail_from, recipients, size, **fields))
        except Exception as exc:
            self.discard(queue_id)
            raise SpoolError(getattr(exc, "errno", None), f"queue record failed: {exc}") from exc

    def row(
        self,
        queue_id: str,
        mail_from: str,
        recipients: Iterable[str],
        size: int,
        *,
        employee_id: int | None = None,
        message_id: str = "",
        credentials: bytes | None = None,
        is_bounce: bool = False,
        state: str = "queued",
        spool_path: str | None = None,
    ) -> OutboundMessage:
        """The queue row of a message (not saved): for ``insert``, or for a caller that inserts
        many inside a transaction of its own (``gateway.db.inserts.insert_row``)."""
        return OutboundMessage(
            queue_id=queue_id,
            employee=employee_id,
            mail_from=mail_from,
            recipients=json.dumps(list(recipients)),
            spool_path=spool_path or self.path_for(queue_id).name,
            size=size,
            message_id=message_id[:998],
            credentials=credentials,
            is_bounce=is_bounce,
            state=state,
            node=self.node,
        )

    def discard(self, queue_id: str) -> None:
        """Remove a message file whose row was never committed."""
        _unlink(self.path_for(queue_id))

    def read(self, row: OutboundMessage) -> bytes:
        """The message bytes.  FileNotFoundError when the file (or the archive blob) is
        gone or the blob does not open/match its hash (the relay treats it as missing)."""
        return self.read_blob(row)[0]

    def read_blob(self, row: OutboundMessage) -> tuple[bytes, Any]:
        """``read``, and for an archive-backed row the archive blob it came from (a
        gateway.archive.PreparedBlob; None for a spool file or a legacy blob)."""
        ref = parse_archive_ref(row.spool_path)
        if ref is None:
            return (self.directory / row.spool_path).read_bytes(), None
        if self.archive is None:
            raise FileNotFoundError(f"{row.spool_path}: no archive to read it from")
        from gateway.archive import BlobError

        try:
            return self.archive.store.read_blob(*ref)
        except BlobError as exc:
            raise FileNotFoundError(str(exc)) from None

    def remove(self, row: OutboundMessage) -> None:
        """Delete the spooled file of a finished message (the row stays as history).
        An archive blob stays: it is the archive's copy."""
        if parse_archive_ref(row.spool_path) is None:
            _unlink(self.directory / row.spool_path)

    def sweep_orphans(self, older_than: float = ORPHAN_AGE) -> int:
        """Remove the files with no queue row waiting for them (queued or held): a crash
        before the commit, a COMMIT of unknown outcome that was not applied, a finished row
        whose unlink a crash cut off.  Run at start and every ``SWEEP_INTERVAL`` by the node
        (``gateway.service``); returns how many files were removed, logs the counts (INFO when
        it removed any) and counts them in ``mailgate_spool_orphans_removed``.

        Safe beside the writers, whose order is always file first, then row: (1) the directory
        is listed and every file's age taken first; a file younger than ``older_than`` is
        never touched (it may be one whose row is still being committed); (2) only then are
        the rows read, so a row committed before that read — whenever its file was written —
        keeps its file; (3) then the old files without a row are unlinked (one already gone:
        fine).  A row that commits after (2) for a file listed in (1) would belong to a commit
        that began more than ``older_than`` after its file was written — an hour, where
        commits are bounded by seconds (the group committer's batches, SQLite's busy
        timeout).  On a shared spool (``node.shared_spool``) every node sweeps the one
        directory: safe because the nodes share the database too (a shared spool's rows are
        relayed by any node), so the rows of every node's files are read in (2), and an hour is
        far beyond the clock skew between the nodes and the file server that stamps the
        times."""
        cutoff = time.time() - older_than
        old: list[str] = []
        listed = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                listed += 1
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:  # removed meanwhile (a finished message)
                    continue
                if mtime < cutoff:
                    old.append(entry.name)
        removed = 0
        if old:
            waiting = {
                p for (p,) in OutboundMessage.select(OutboundMessage.spool_path)
                .where(OutboundMessage.state.in_(["queued", "held"])).tuples()
            }
            removed = remove_files(self.directory / name for name in old if row_file(name) not in waiting)
        if removed:
            from gateway import metrics

            metrics.spool_orphans_removed.inc(removed)
        log.log(logging.INFO if removed else logging.DEBUG,
                "spool sweep: %d files listed, %d older than %d s, %d removed (no queue row waiting)",
                listed, len(old), older_than, removed)
        return removed


def row_file(name: str) -> str:
    """The queue row's ``spool_path`` a spool directory entry belongs to: ``<id>.eml``
    itself, its write-in-progress ``<id>.eml.tmp``, and a held message's original as
    submitted, ``<id>.orig.eml`` (see gateway.approval), and its ``.tmp``."""
    return name.removesuffix(".tmp").replace(".orig.eml", ".eml")


def queue_stats() -> tuple[int, float]:
    """(messages waiting, age in seconds of the oldest one)."""
    waiting = OutboundMessage.select().where(OutboundMessage.state == "queued")
    count = waiting.count()
    oldest = waiting.order_by(OutboundMessage.created_at).first()
    age = (utcnow() - oldest.created_at).total_seconds() if oldest else 0.0
    return count, age
