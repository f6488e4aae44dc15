"""The background indexer: documents for the records a node committed without one
(``Archive(defer_index=True)``; run by ``gateway.archive.service``'s index loop), oldest
first, behind durable watermarks — waiting out a burst of mail (``lag``), draining a
backlog in large transactions with the next batch's text extracted ahead — and how many
records search cannot find yet (``backlog``).  A record it cannot read or write is listed
for later (``unread``).
"""

from __future__ import annotations

import datetime as dt
import logging
import weakref
from typing import NamedTuple

from peewee import fn

from gateway.archive.documents import Grams, index_sightings, insert_documents, select_in
from gateway.archive.extraction import Extracted, indexable
from gateway.archive.unread import Failure, UnreadRecord, due_for_retry, note_unread
from gateway.db import is_postgres
from gateway.db.models import database, utcnow

log = logging.getLogger("mailgate.archive.index")  # the search index's log, as before the split

INDEX_BATCH = 200  # records per pass of the background indexer while records keep arriving
DRAIN_BATCH = 600  # records per pass once none arrive (a backlog: one transaction each, see index_batch)
INDEX_CHUNK = 16  # documents per write transaction of the background indexer (see index_batch)


def index_pending(archive: object, limit: int = INDEX_BATCH) -> int:
    """Index up to ``limit`` records that have no document yet, oldest first, and note up to
    4 × ``limit`` sightings written since the last call; returns how many records were indexed."""
    return index_batch(archive, limit)[0]


def index_batch(archive: object, limit: int | None = None, lag: float = 0.0) -> tuple[int, bool]:
    """``index_pending``, also telling whether a batch was full (more work waits).  ``limit``
    None: ``INDEX_BATCH`` records while records keep arriving, ``DRAIN_BATCH`` once none
    came since the previous pass (a backlog drains in fewer, larger transactions: each one
    flushes an FTS5 segment, and each pass has its own queries and hand-offs).

    ``lag`` > 0 (``[archive] index_lag``, the node's background indexer): while records keep
    arriving, wait until the oldest unindexed one is ``lag`` seconds old — the index yields
    to the mail path during a burst and catches up, in large transactions, once it ends (or
    keeps ``lag`` behind under sustained load).  Returns ``(0, False)`` for a pass it skipped.

    Blocking (call in a thread).  The blobs are read and their text extracted outside any
    transaction; the rows go in short write transactions of ``INDEX_CHUNK`` documents while
    records keep arriving (one transaction when none came since the previous pass) that
    re-check which records are still unindexed (an inline indexer may have been faster), so
    nothing is indexed twice.  Watermarks (``archivesearchstate``) make a restart resume where
    it stopped; every archive writer appends under the chain lock, so ids become visible in order and a
    watermark never skips a row committed later.  A record the watermark moves past without a
    document — its blob unreadable, or its document write failed — is listed in
    ``archivesearchunread`` in the same transaction and tried again later (``RETRY_DELAYS``),
    unless its document was refused for its data ``GIVE_UP_AFTER`` times (given up)."""
    from gateway.archive.schema import ArchiveRecord
    from gateway.archive.search_schema import SearchState
    from gateway.db.writerlock import handoff
    from gateway.groupcommit import write_transaction

    state = {s.name: s.value for s in SearchState.select()}
    rec_mark, seen_mark = state.get("records", 0), state.get("sightings", 0)
    # Read first: every record up to ``top`` is committed, so the look-up below sees them all.
    top = max(rec_mark, int(ArchiveRecord.select(fn.MAX(ArchiveRecord.id)).scalar() or 0))
    arriving = _records_arriving(archive, top)
    if limit is None:
        limit = INDEX_BATCH if arriving else DRAIN_BATCH
    if lag > 0 and arriving:  # only the oldest one's age first: during a burst this runs every BURST_POLL
        oldest = _unindexed((ArchiveRecord.created_at,), rec_mark, top).limit(1).tuples().first()
        if oldest is not None and _age(oldest[0]) < lag:
            _waiting(archive, True)
            return 0, False  # a burst: the index waits (see the docstring)
    _waiting(archive, False)
    # Only the columns a document and a blob read need (a full row per record cost more in
    # peewee than the look-up in SQLite); sightings as plain named tuples.
    fields = (ArchiveRecord.id, ArchiveRecord.sha256, ArchiveRecord.blob_path, ArchiveRecord.created_at,
              ArchiveRecord.direction, ArchiveRecord.employee, ArchiveRecord.purged_at)
    recs = list(_unindexed(fields, rec_mark, top).limit(limit).namedtuples())
    tried = due_for_retry(archive, limit)  # record id -> failed attempts so far, of listed records due again
    retry = list(ArchiveRecord.select(*fields).where(
        ArchiveRecord.id.in_(list(tried)), ArchiveRecord.purged_at.is_null()).namedtuples()) if tried else []
    mark = "%s" if is_postgres() else "?"
    sightings = [Sighting(*row) for row in database.obj.execute_sql(
        f"SELECT {SIGHTING_COLUMNS} FROM archivesighting WHERE id > {mark} ORDER BY id LIMIT {mark}",
        (seen_mark, limit * 4)).fetchall()]
    if not recs and not sightings and not tried and top == rec_mark:
        return 0, False
    # record id -> why its blob could not be read or its document written
    failed: dict[int, Failure] = {}
    rows = read_and_extract(archive, recs + retry, failed)
    if not arriving and len(recs) == limit:  # a backlog drains: the next batch is extracted while this one is written
        _extract_ahead(archive, list(_unindexed(fields, recs[-1].id, top).limit(limit).namedtuples()))
    # A full batch: handled up to its last record; otherwise every record up to ``top``.
    # (A sighting of a record not indexed yet is noted when that record is.)
    new_rec_mark = recs[-1].id if len(recs) == limit else top
    done = 0
    # Short write transactions, a few documents each, taking the writers' hand-off lock: the
    # SMTP group commit waits for this lock before every 250, and one transaction for the
    # whole batch held it 40-220 ms at a time (bench_smtp) while every session waited.  A
    # crash between chunks loses nothing: records without a document stay "unindexed" and
    # the watermarks move only in the last chunk.  But only while records keep coming: each
    # transaction flushes a small FTS5 segment that is merged again later (16 documents a
    # transaction cost the indexer ~0.5 ms more CPU a document than 200), so a backlog left
    # once the mail stopped (no new record since the previous pass) goes in one transaction.
    # PostgreSQL has no database-wide write lock (the group commit never waits for the
    # indexer's transaction): one transaction always, its documents split over two
    # connections (``doctables.write_rows``) instead of 16-document COPYs on one.
    size = INDEX_CHUNK if arriving and not is_postgres() else max(1, len(rows))
    chunks = [rows[i:i + size] for i in range(0, len(rows), size)] or [[]]
    noted: set[int] = set()
    for n, chunk in enumerate(chunks):
        last = n == len(chunks) - 1
        with handoff(), write_transaction():
            ids = [rec.id for rec, _, _ in chunk]
            taken = {r for r, in select_in("SELECT record_id FROM archivesearchdoc WHERE record_id IN", ids)}
            written: dict[int, tuple[int, int | None, str]] = {}
            # a document that cannot be written is noted in ``failed``: listed with the
            # unreadable records (``unread.note_unread``, below) and written again on their schedule
            done += insert_documents([(rec, ex, grams) for rec, ex, grams in chunk if rec.id not in taken],
                                      written, failed)
            # Every sighting of the records just indexed (later ones may have come first) and,
            # with the last chunk, the sightings since the last call — mostly the same rows: each once.
            later = [Sighting(*row) for row in select_in(
                f"SELECT {SIGHTING_COLUMNS} FROM archivesighting WHERE record_id IN", ids)]
            todo = {s.id: s for s in [*later, *(sightings if last else [])] if s.id not in noted}
            index_sightings(list(todo.values()), written)
            noted.update(todo)
            if not last:
                continue
            marks = {"records": new_rec_mark,
                     "sightings": sightings[-1].id if sightings else seen_mark}
            for name, value in marks.items():
                if value != state.get(name):
                    SearchState.insert(name=name, value=value).on_conflict(
                        conflict_target=[SearchState.name], update={SearchState.value: value}).execute()
            note_unread(archive, tried, failed)
    return done, len(recs) == limit or len(sightings) == limit * 4


class Sighting(NamedTuple):
    """What the indexer reads of a sighting."""

    id: int
    record_id: int
    employee_id: int | None
    direction: str


SIGHTING_COLUMNS = "id, record_id, employee_id, direction"


def _unindexed(fields: tuple, after: int, top: int | None = None):  # noqa: ANN202 - a peewee query
    """Records after id ``after`` (up to ``top``), not purged and without a document, oldest first."""
    from gateway.archive.schema import ArchiveRecord
    from gateway.archive.search_schema import SearchDoc

    r = ArchiveRecord
    where = (r.id > after) & r.purged_at.is_null() & ~fn.EXISTS(
        SearchDoc.select(SearchDoc.docid).where(SearchDoc.record_id == r.id))
    if top is not None:
        where &= r.id <= top
    return r.select(*fields).where(where).order_by(r.id)


def _age(created_at: dt.datetime) -> float:
    """Seconds since ``created_at`` (naive UTC, as the records keep it)."""
    return (utcnow() - created_at).total_seconds()


_LAST_TOP: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # archive -> newest record id seen
_WAITING: weakref.WeakSet = weakref.WeakSet()  # archives whose last pass waited out a burst


def waiting(archive: object) -> bool:
    """Whether ``index_batch``'s last pass for ``archive`` was skipped to wait out a burst
    (``lag``): the background indexer then looks again sooner, to start the drain as soon as
    the burst ends."""
    try:
        return archive in _WAITING
    except TypeError:
        return False


def _waiting(archive: object, value: bool) -> None:
    try:
        if value:
            _WAITING.add(archive)
        else:
            _WAITING.discard(archive)
    except TypeError:  # not weakly referable: never counts as waiting
        pass


def _records_arriving(archive: object, top: int) -> bool:
    """Whether a record came since this archive's previous indexer pass (or this is the first)."""
    try:
        before = _LAST_TOP.get(archive)
        _LAST_TOP[archive] = top
    except TypeError:  # not weakly referable: assume mail is flowing (short transactions)
        return True
    return before is None or top != before


class _Extraction(NamedTuple):
    """Text extraction under way (``workers.Pending``) for the records whose bytes were read."""

    recs: list
    pending: object


_AHEAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # archive -> _Extraction of its next batch


def _extract_ahead(archive: object, recs: list) -> None:
    """Start extracting the next batch of a backlog while this one is written (``index_batch``):
    the worker processes and the write transaction overlap instead of waiting for each other.
    Extraction depends on a record's content only (immutable under its hash), so the next
    pass uses these results for the same records and extracts any others itself."""
    try:
        _AHEAD[archive] = _start_extraction(archive, recs)
    except TypeError:  # not weakly referable: no look-ahead
        pass


def read_and_extract(archive: object, recs: list,
                     failed: dict[int, Failure] | None = None) -> list[tuple[object, Extracted, Grams]]:
    """Text of ``recs``: taken from the extraction the previous pass started ahead where it
    covers them, else started now (``_start_extraction``); unreadable blobs are skipped (and
    noted in ``failed``: a record unreadable ahead is read once more here)."""
    try:
        ahead = _AHEAD.pop(archive, None)
    except TypeError:
        ahead = None
    got: dict[tuple[int, str], tuple[Extracted, Grams]] = {}
    if ahead is not None:
        got.update(zip([(r.id, r.sha256) for r in ahead.recs], ahead.pending.result(), strict=True))
    rest = [rec for rec in recs if (rec.id, rec.sha256) not in got]
    if rest:
        now = _start_extraction(archive, rest, failed)
        got.update(zip([(r.id, r.sha256) for r in now.recs], now.pending.result(), strict=True))
    return [(rec, *got[(rec.id, rec.sha256)]) for rec in recs if (rec.id, rec.sha256) in got]


def _start_extraction(archive: object, recs: list, failed: dict[int, Failure] | None = None) -> _Extraction:
    """Fresh messages from the archive's memory (``take_recent``, here: a dict look-up is
    cheaper than a thread hand-off), the others' blobs read on threads (decryption and zstd
    release the GIL); text extraction started in the worker processes (gateway.archive.workers);
    unreadable blobs are logged, noted in ``failed`` (record id -> (error, permanent: the blob
    missing or altered)) and left out."""
    from gateway.archive import _pool
    from gateway.archive.store import BlobError
    from gateway.archive.workers import extract_async

    take = getattr(archive, "take_recent", None)

    def recent(rec: object) -> bytes | None:
        return take(rec.sha256) if take is not None and getattr(rec, "purged_at", None) is None else None

    def read(rec: object) -> bytes | None:
        try:
            # only what extract reads (attachment bodies cut): less to hold and to send to a worker
            return indexable(archive.read(rec))  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - an unreadable blob (verify reports it) must not stop the indexer
            permanent = isinstance(exc, BlobError | FileNotFoundError)
            log.warning("archive record %s: cannot read the blob to index it (skipped, read again later): %s",
                        rec.id, exc, exc_info=not permanent)
            if failed is not None:
                failed[rec.id] = Failure(f"{type(exc).__name__}: {exc}", permanent)
            return None

    raws = [recent(rec) for rec in recs]
    missing = [i for i, raw in enumerate(raws) if raw is None]
    if missing:
        got = list(_pool().map(read, [recs[i] for i in missing])) if len(missing) > 1 else [read(recs[missing[0]])]
        for i, raw in zip(missing, got, strict=True):
            raws[i] = raw
    readable = [(rec, raw) for rec, raw in zip(recs, raws, strict=True) if raw is not None]
    return _Extraction([rec for rec, _ in readable],
                       extract_async([raw for _, raw in readable], headers=False))  # the records exist


BACKLOG_CAP = 10_000


def backlog() -> int:
    """Records the search cannot find yet: committed without a document, after the indexer's
    watermark (the node's background indexer waits out a burst, ``[archive] index_lag``), and
    those whose blob it could not read or whose document it could not write
    (``archivesearchunread``, tried again later or given up).  Counted
    up to ``BACKLOG_CAP`` (the panel asks on every search page)."""
    from gateway.archive.schema import ArchiveRecord
    from gateway.archive.search_schema import SearchState

    mark = SearchState.select(SearchState.value).where(SearchState.name == "records").scalar() or 0
    unread = UnreadRecord.select().limit(BACKLOG_CAP).count()
    return min(BACKLOG_CAP, unread + _unindexed((ArchiveRecord.id,), mark).limit(BACKLOG_CAP).count())
