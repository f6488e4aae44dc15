"""Records whose blob the background indexer could not read (gateway/archive/unread.py):
listed with the reason, read again after growing delays, indexed once their blob reads
again, counted by ``backlog()`` meanwhile, forgotten once indexed or purged."""

from __future__ import annotations

import datetime as dt
import errno

import pytest

from gateway.archive import Archive, index
from gateway.archive.index import RETRY_DELAYS, backlog, index_pending
from gateway.archive.retention import purge
from gateway.archive.search import record_ids
from gateway.archive.search_schema import SearchDoc
from gateway.archive.unread import UnreadRecord
from gateway.archive.verify import verify
from gateway.db.models import utcnow
from tests.unit.archive.conftest import message


@pytest.fixture
def clock(monkeypatch) -> list[dt.datetime]:
    """The indexer's clock, moved on by the test (no sleeps): ``clock[0] += …``."""
    now = [utcnow()]
    monkeypatch.setattr(index, "utcnow", lambda: now[0])
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
