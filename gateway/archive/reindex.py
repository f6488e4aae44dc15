"""``mailgate archive reindex --failed``: the administrator's retry of the records the
background indexer gave up on (``unread``: their document refused for its data), a batch
per transaction, resumable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from gateway.archive.documents import index_sightings, insert_documents, select_in
from gateway.archive.indexer import SIGHTING_COLUMNS, Sighting, read_and_extract
from gateway.archive.unread import FAILED, Failure, Listed, UnreadRecord, note_unread


class Retried(NamedTuple):
    """What ``retry_failed`` did: records indexed (or found indexed, or purged meanwhile:
    forgotten), still refused for their data (left given up, with the new reason), and back on
    the indexer's schedule (a passing failure)."""

    indexed: list[int]
    refused: list[tuple[int, str]]
    rescheduled: list[tuple[int, str]]


RETRY_BATCH = 200  # given-up records per transaction of ``retry_failed``


def retry_failed(archive: object, record_ids: Iterable[int] | None = None, *,
                 progress: Callable[[int, int], None] | None = None, batch: int | None = None) -> Retried:
    """The administrator's retry (``mailgate archive reindex --failed``) of the records the
    indexer gave up on (all, or those of ``record_ids``), in record id order, ``RETRY_BATCH``
    at a time: each batch's blobs read and its documents written in one transaction, like a
    pass of ``indexer.index_batch`` (their sightings noted with them; a document another writer wrote
    meanwhile is not written twice).  Indexed: its row goes.  Refused for its data again: stays
    given up, with the new reason (one attempt: the software or the data has to change first).
    A passing failure (the database busy, an unreadable blob): back on the indexer's schedule.

    Resumable: each batch commits on its own, and a record's state changes only in its batch's
    commit, so a crash (or ^C) mid-way leaves the records of the unfinished batches given up,
    as they were, for the next run; one run never takes a record twice (it goes on after the
    last id it took).  ``progress(done, total)`` after each batch, ``total`` counted first
    (the records given up when the run began)."""

    u = UnreadRecord
    size = batch or RETRY_BATCH
    wanted = None if record_ids is None else sorted(set(record_ids))
    where = u.state == FAILED
    if wanted is not None:
        where &= u.record_id.in_(wanted)
    total = u.select().where(where).count()
    result = Retried([], [], [])
    done, after = 0, None
    while True:
        query = u.select(u.record_id, u.attempts, u.data_errors).where(where)
        if after is not None:
            query = query.where(u.record_id > after)
        tried = {r.record_id: Listed(r.attempts, r.data_errors)
                 for r in query.order_by(u.record_id).limit(size)}
        if not tried:
            return result
        part = _retry_batch(archive, tried)
        result.indexed.extend(part.indexed)
        result.refused.extend(part.refused)
        result.rescheduled.extend(part.rescheduled)
        after = max(tried)
        done += len(tried)
        if progress is not None:
            progress(done, max(total, done))


def _retry_batch(archive: object, tried: dict[int, Listed]) -> Retried:
    """One transaction of ``retry_failed``: the given-up records ``tried``."""
    from gateway.archive.schema import ArchiveRecord
    from gateway.db.writerlock import handoff
    from gateway.groupcommit import write_transaction

    fields = (ArchiveRecord.id, ArchiveRecord.sha256, ArchiveRecord.blob_path, ArchiveRecord.created_at,
              ArchiveRecord.direction, ArchiveRecord.employee, ArchiveRecord.purged_at)
    recs = list(ArchiveRecord.select(*fields).where(
        ArchiveRecord.id.in_(list(tried)), ArchiveRecord.purged_at.is_null()).namedtuples())
    failed: dict[int, Failure] = {}
    rows = read_and_extract(archive, recs, failed)
    with handoff(), write_transaction():
        ids = [rec.id for rec, _, _ in rows]
        taken = {r for r, in select_in("SELECT record_id FROM archivesearchdoc WHERE record_id IN", ids)}
        written: dict[int, tuple[int, int | None, str]] = {}
        insert_documents([(rec, ex, grams) for rec, ex, grams in rows if rec.id not in taken], written, failed)
        later = [Sighting(*row) for row in select_in(
            f"SELECT {SIGHTING_COLUMNS} FROM archivesighting WHERE record_id IN", list(written))]
        index_sightings(later, written)
        note_unread(archive, tried, failed, by_hand=True)
    return Retried([rid for rid in tried if rid not in failed],
                   [(rid, f.reason) for rid, f in failed.items() if f.data],
                   [(rid, f.reason) for rid, f in failed.items() if not f.data])
