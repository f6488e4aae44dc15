"""Records whose blob the background indexer could not read, or whose document it could not
write (gateway/archive/unread.py): listed with the reason, tried again after growing delays,
indexed once their blob reads and their document is written, counted by ``backlog()``
meanwhile, forgotten once indexed or purged."""

from __future__ import annotations

import datetime as dt
import errno

import pytest
from peewee import OperationalError

from gateway.archive import Archive, Capture, doctables, documents, indexer, unread
from gateway.archive.extraction import extract
from gateway.archive.indexer import backlog, index_pending
from gateway.archive.retention import purge
from gateway.archive.search import record_ids
from gateway.archive.search_schema import SearchDoc, SearchState
from gateway.archive.unread import RETRY_DELAYS, UnreadRecord
from gateway.archive.verify import verify
from gateway.db import is_postgres
from gateway.db.models import database, utcnow
from tests.unit.archive.conftest import message


@pytest.fixture
def clock(monkeypatch) -> list[dt.datetime]:
    """The indexer's clock, moved on by the test (no sleeps): ``clock[0] += …`` — the retry
    schedule's (``unread``) and the records' ages (``index``)."""
    now = [utcnow()]
    for module in (unread, indexer):
        monkeypatch.setattr(module, "utcnow", lambda: now[0])
    return now


def _records(archive: Archive, word: str, n: int = 2, **kw) -> tuple[Archive, list]:
    """``n`` records written by a node that defers indexing, and the indexer of a restarted
    node (nothing in memory: every blob is read back)."""
    writer = Archive(archive.directory, archive.store.key_file, defer_index=True)
    recs = [writer.record(message(i, word), direction="outbound", verdict="accepted", **kw) for i in range(n)]
    return Archive(archive.directory, archive.store.key_file, defer_index=True), recs


def _failing_reads(monkeypatch, failures: dict[int, int]) -> list[int]:
    """``Archive.read`` raises EIO for record id ``k`` the next ``failures[k]`` times (-1: always);
    returns the ids of every read attempted."""
    real = Archive.read
    reads: list[int] = []

    def read(self: Archive, record: object) -> bytes:
        reads.append(record.id)
        if failures.get(record.id, 0):
            failures[record.id] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real(self, record)

    monkeypatch.setattr(Archive, "read", read)
    return reads


def _docs() -> list[int]:
    return sorted(d.record_id for d in SearchDoc.select())


def test_a_passing_read_error_is_read_again_after_growing_delays_then_indexed_and_forgotten(
        archive, monkeypatch, clock):
    node, (bad, good) = _records(archive, "kingfisher")
    reads = _failing_reads(monkeypatch, {bad.id: 4})
    assert index_pending(node) == 1
    assert _docs() == [good.id] and record_ids("kingfisher") == [good.id]
    assert backlog() == 1  # the search page says a message is missing from the results
    row = UnreadRecord.get_by_id(bad.id)
    assert (row.attempts, row.permanent) == (1, False) and "Input/output error" in row.reason
    assert row.retry_at == clock[0] + dt.timedelta(seconds=60)

    reads.clear()
    clock[0] += dt.timedelta(seconds=59)
    assert index_pending(node) == 0 and reads == []  # not on every pass: not before its delay
    for attempts, delay in [(2, 300), (3, 1800), (4, 3600)]:  # still failing: 1, 5, 30 min, then hourly
        clock[0] = UnreadRecord.get_by_id(bad.id).retry_at
        assert index_pending(node) == 0
        row = UnreadRecord.get_by_id(bad.id)
        assert row.attempts == attempts and row.retry_at == clock[0] + dt.timedelta(seconds=delay)
        assert backlog() == 1
    assert reads == [bad.id] * 3

    clock[0] += dt.timedelta(seconds=3600)
    assert index_pending(node) == 1  # the blob reads again: indexed
    assert sorted(record_ids("kingfisher")) == sorted([bad.id, good.id])
    assert UnreadRecord.select().count() == 0 and backlog() == 0
    clock[0] += dt.timedelta(days=1)
    reads.clear()
    assert index_pending(node) == 0 and reads == []  # forgotten: never read again
    assert _docs() == sorted([bad.id, good.id])  # each once


def test_a_missing_blob_stays_listed_is_read_hourly_and_indexed_once_restored(archive, clock):
    node, (bad, good) = _records(archive, "sandpiper")
    path = node.store.path_of(bad.blob_path)
    kept = path.read_bytes()
    path.unlink()
    assert index_pending(node) == 1 and _docs() == [good.id]
    row = UnreadRecord.get_by_id(bad.id)
    assert row.permanent and row.reason.startswith("BlobError:") and "missing" in row.reason
    assert row.retry_at == clock[0] + dt.timedelta(seconds=RETRY_DELAYS[-1])  # hourly from the start
    assert backlog() == 1
    assert any(f"record {bad.id}" in p for p in verify(node.store))  # verify names it too

    clock[0] = row.retry_at
    assert index_pending(node) == 0
    assert UnreadRecord.get_by_id(bad.id).attempts == 2 and backlog() == 1  # still listed

    path.write_bytes(kept)  # restored from a backup
    clock[0] += dt.timedelta(seconds=RETRY_DELAYS[-1])
    assert index_pending(node) == 1
    assert sorted(record_ids("sandpiper")) == sorted([bad.id, good.id])
    assert UnreadRecord.select().count() == 0 and backlog() == 0


def test_a_purged_record_is_forgotten(archive, monkeypatch, clock):
    old = utcnow() - dt.timedelta(days=365 * 8)
    node, (bad, good) = _records(archive, "dunlin", seen_at=old)
    _failing_reads(monkeypatch, {bad.id: -1})
    assert index_pending(node) == 1 and backlog() == 1
    assert sorted(purge(node.store, 7).purged) == sorted([bad.id, good.id])
    assert UnreadRecord.select().count() == 0 and backlog() == 0 and _docs() == []


def test_a_listed_record_purged_meanwhile_is_dropped_by_the_next_retry(archive, monkeypatch, clock):
    """Should a purge miss the list (its hook failed), the retry finds the record purged."""
    from gateway.archive.schema import ArchiveRecord

    node, (bad, _) = _records(archive, "godwit")
    _failing_reads(monkeypatch, {bad.id: -1})
    index_pending(node)
    ArchiveRecord.update(purged_at=utcnow()).where(ArchiveRecord.id == bad.id).execute()
    clock[0] += dt.timedelta(seconds=RETRY_DELAYS[0])
    assert index_pending(node) == 0
    assert UnreadRecord.select().count() == 0 and backlog() == 0


def test_a_restarted_indexer_reads_the_listed_records_when_due(archive, monkeypatch, clock):
    node, (bad, _) = _records(archive, "turnstone")
    _failing_reads(monkeypatch, {bad.id: 1})
    index_pending(node)
    restarted = Archive(archive.directory, archive.store.key_file, defer_index=True)
    assert index_pending(restarted) == 0  # not due yet
    clock[0] += dt.timedelta(seconds=RETRY_DELAYS[0])
    assert index_pending(restarted) == 1 and backlog() == 0


def test_a_record_listed_by_another_indexer_is_read_within_a_minute_of_its_time(archive, monkeypatch, clock):
    """Each indexer keeps when to look at the list next; rows another one wrote are seen too."""
    other = Archive(archive.directory, archive.store.key_file, defer_index=True)
    assert index_pending(other) == 0  # looked: nothing listed
    node, (bad, _) = _records(archive, "whimbrel")
    _failing_reads(monkeypatch, {bad.id: 1})
    index_pending(node)
    clock[0] += dt.timedelta(seconds=RETRY_DELAYS[0])
    assert index_pending(other) == 1 and UnreadRecord.select().count() == 0


def _failing_writes(monkeypatch, bad: set[int | str]) -> list[list[int]]:
    """``doctables._write_ordered`` writes its rows, then raises while a record id or a subject in
    ``bad`` is among them (a failure after the rows went in: the savepoint must take every one
    back); returns the record ids of each write attempted."""
    real = doctables._write_ordered
    writes: list[list[int]] = []

    def write(rows: list[tuple]) -> None:
        writes.append([r[1] for r in rows])
        real(rows)
        if bad & {key for r in rows for key in (r[1], r[5].subject)}:
            raise OperationalError("disk I/O error")

    monkeypatch.setattr(doctables, "_write_ordered", write)
    return writes


def _text_rows() -> tuple[int, int]:
    """(text index rows, those holding the short gram "qz"): SQLite's FTS5 tables archivefts and
    archivegrams, PostgreSQL's archivesearchtext."""
    db = database.obj
    if is_postgres():
        return db.execute_sql("SELECT count(*), count(*) FILTER (WHERE grams @> ARRAY['qz'])"
                              " FROM archivesearchtext").fetchone()
    return (db.execute_sql("SELECT count(*) FROM archivefts").fetchone()[0],
            db.execute_sql("SELECT count(*) FROM archivegrams WHERE archivegrams MATCH 'qz'").fetchone()[0])


def test_a_failed_document_write_is_listed_counted_and_written_again_when_due(archive, monkeypatch, clock):
    writer = Archive(archive.directory, archive.store.key_file, defer_index=True)
    bad = writer.record(message(0, "kingfisher qz"), direction="outbound", verdict="accepted")
    good = [writer.record(message(i, "kingfisher"), direction="outbound", verdict="accepted") for i in (1, 2)]
    node = Archive(archive.directory, archive.store.key_file, defer_index=True)
    failing: set[int | str] = {bad.id}
    writes = _failing_writes(monkeypatch, failing)
    monkeypatch.setattr(indexer, "INDEX_CHUNK", 1)  # the failure in the pass's first transaction, not its last
    assert index_pending(node) == 2
    assert [bad.id] in writes  # the bulk write failed, then the record alone
    assert _docs() == [r.id for r in good]
    assert sorted(record_ids("kingfisher")) == [r.id for r in good] and record_ids("qz") == []
    assert _text_rows() == (2, 0)  # nothing of the failed write is left in the FTS5 tables
    assert SearchState.get(SearchState.name == "records").value == good[-1].id  # the watermark moved past it
    row = UnreadRecord.get_by_id(bad.id)
    assert row.reason == "index write failed: OperationalError: disk I/O error"
    assert (row.attempts, row.permanent) == (1, False)
    assert row.retry_at == clock[0] + dt.timedelta(seconds=RETRY_DELAYS[0])
    assert backlog() == 1  # the search page says a message is missing from the results

    writes.clear()
    clock[0] += dt.timedelta(seconds=RETRY_DELAYS[0] - 1)
    assert index_pending(node) == 0 and writes == []  # not before its time
    clock[0] = row.retry_at
    assert index_pending(node) == 0  # still failing: listed again, 5 minutes on
    row = UnreadRecord.get_by_id(bad.id)
    assert row.attempts == 2 and row.retry_at == clock[0] + dt.timedelta(seconds=RETRY_DELAYS[1])
    assert backlog() == 1 and _docs() == [r.id for r in good]

    failing.clear()  # the failure stops
    clock[0] = row.retry_at
    assert index_pending(node) == 1
    assert sorted(record_ids("kingfisher")) == sorted([bad.id, *(r.id for r in good)])
    assert record_ids("qz") == [bad.id]
    assert UnreadRecord.select().count() == 0 and backlog() == 0
    assert _docs() == sorted([bad.id, *(r.id for r in good)])  # each once
    assert _text_rows() == (3, 1)
    writes.clear()
    clock[0] += dt.timedelta(days=1)
    assert index_pending(node) == 0 and writes == []  # forgotten: never written again


def test_a_listed_record_indexed_meanwhile_by_another_writer_is_not_written_twice(archive, monkeypatch, clock):
    node, (bad, good) = _records(archive, "redshank")
    failing: set[int | str] = {bad.id}
    writes = _failing_writes(monkeypatch, failing)
    assert index_pending(node) == 1 and UnreadRecord.get_by_id(bad.id).reason.startswith("index write failed:")
    failing.clear()
    with database.atomic():  # another writer (a batch ingest's step 4) writes its document
        assert documents.index_new([(bad, extract(node.read(bad)), None)]) == 1
    assert backlog() == 1  # still listed until the indexer looks again
    writes.clear()
    clock[0] += dt.timedelta(seconds=RETRY_DELAYS[0])
    assert index_pending(node) == 0 and writes == []  # the retry finds the document: nothing written
    assert UnreadRecord.select().count() == 0 and backlog() == 0
    assert _docs() == sorted([bad.id, good.id]) and sorted(record_ids("redshank")) == sorted([bad.id, good.id])


def test_a_failed_write_of_a_batch_ingest_is_left_to_the_background_indexer(archive, monkeypatch, clock, caplog):
    """``index_new`` lists nothing: the record stays after the indexer's watermark (counted by
    ``backlog()`` as waiting), the indexer's next pass writes it — or lists it, should its
    own write fail too — and the retry writes it once the failure stops."""
    caps = [Capture(raw=message(i, "stilt"), place="import:eml", ref=f"s{i}") for i in range(3)]
    first = archive.ingest_many(caps[:1])[0].record
    failing: set[int | str] = {"Offer 1"}  # the second capture's
    _failing_writes(monkeypatch, failing)
    out = archive.ingest_many(caps[1:])
    second, third = (o.record for o in out)
    assert [r.args for r in caplog.records if "full-text indexing failed" in r.getMessage()] == [(second.id,)]
    assert _docs() == [first.id, third.id] and UnreadRecord.select().count() == 0
    assert backlog() == 1  # waiting for the background indexer

    assert index_pending(archive) == 0  # its write fails too: now listed
    assert UnreadRecord.get_by_id(second.id).reason == "index write failed: OperationalError: disk I/O error"
    assert backlog() == 1  # counted once, not as waiting and listed
    failing.clear()
    clock[0] += dt.timedelta(seconds=RETRY_DELAYS[0])
    assert index_pending(archive) == 1
    assert _docs() == sorted([first.id, second.id, third.id]) and backlog() == 0
    assert sorted(record_ids("stilt")) == sorted([first.id, second.id, third.id])
