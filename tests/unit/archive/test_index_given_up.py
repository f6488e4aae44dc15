"""A document the database refuses for its data is given up after ``GIVE_UP_AFTER`` attempts
(gateway/archive/unread.py, migration 165), a passing failure never is; the given-up records
are counted (``backlog``, the metrics), named by ``mailgate archive verify`` as a warning and
tried again by ``mailgate archive reindex --failed`` (``reindex.retry_failed``)."""

from __future__ import annotations

import datetime as dt
import errno
import re
import sqlite3

import peewee
import pytest

from gateway.archive import Archive, doctables, indexer, reindex, unread
from gateway.archive.indexer import backlog, index_pending
from gateway.archive.search import record_ids
from gateway.archive.search_schema import SearchDoc
from gateway.archive.unread import (
    FAILED,
    GIVE_UP_AFTER,
    RETRY,
    RETRY_DELAYS,
    UnreadRecord,
    data_error,
    given_up,
    search_unread_given_up,
)
from gateway.db.models import database, utcnow
from gateway.metrics import ArchiveIndexCollector
from tests.unit.archive.conftest import message


@pytest.fixture
def clock(monkeypatch) -> list[dt.datetime]:
    now = [utcnow()]
    for module in (unread, indexer):  # the retry schedule's clock and the records' ages
        monkeypatch.setattr(module, "utcnow", lambda: now[0])
    return now


def _failing_writes(monkeypatch, bad: set[int], error: list[BaseException]) -> list[list[int]]:
    """``doctables._write_ordered`` writes its rows, then raises ``error[0]`` while a record id in
    ``bad`` is among them; returns the record ids of each write attempted."""
    real = doctables._write_ordered
    writes: list[list[int]] = []

    def write(rows: list[tuple]) -> None:
        writes.append([r[1] for r in rows])
        real(rows)
        if bad & {r[1] for r in rows}:
            raise error[0]

    monkeypatch.setattr(doctables, "_write_ordered", write)
    return writes


def _records(archive: Archive, word: str, n: int = 2) -> tuple[Archive, list]:
    writer = Archive(archive.directory, archive.store.key_file, defer_index=True)
    recs = [writer.record(message(i, word), direction="outbound", verdict="accepted") for i in range(n)]
    return Archive(archive.directory, archive.store.key_file, defer_index=True), recs


def _gauges() -> dict[str, float]:
    return {m.name: m.samples[0].value for m in ArchiveIndexCollector().collect()}


def _wrapped(cls: type, orig: Exception) -> Exception:
    """``orig`` as peewee re-raises a driver's error (``orig`` kept, its message the same)."""
    return cls(orig, *orig.args)


TOO_BIG = _wrapped(peewee.DataError, sqlite3.DataError("string or blob too big"))
LOCKED = _wrapped(peewee.OperationalError, sqlite3.OperationalError("database is locked"))


@pytest.mark.parametrize(("exc", "data"), [
    (TOO_BIG, True),
    (_wrapped(peewee.IntegrityError, sqlite3.IntegrityError("CHECK constraint failed: x")), True),
    (sqlite3.IntegrityError("UNIQUE constraint failed: archivesearchdoc.record_id"), True),
    (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), True),
    (ValueError("A string literal cannot contain NUL (0x00) characters."), True),
    (LOCKED, False),
    (_wrapped(peewee.OperationalError, sqlite3.OperationalError("disk I/O error")), False),
    (_wrapped(peewee.OperationalError, sqlite3.OperationalError("database or disk is full")), False),
    (peewee.InterfaceError("connection already closed"), False),
    (OSError(errno.EIO, "Input/output error"), False),
    (RuntimeError("something else"), False),  # not recognised: passing (tried again)
])
def test_data_errors_are_told_from_passing_ones(exc, data):
    assert data_error(exc) is data


def test_a_document_refused_for_its_data_is_given_up_after_the_30_minute_retry(archive, monkeypatch, clock):
    node, (bad, good) = _records(archive, "avocet")
    error: list[BaseException] = [TOO_BIG]
    writes = _failing_writes(monkeypatch, {bad.id}, error)
    assert index_pending(node) == 1
    for attempt in range(1, GIVE_UP_AFTER):
        row = UnreadRecord.get_by_id(bad.id)
        assert (row.state, row.attempts, row.data_errors) == (RETRY, attempt, attempt)
        assert row.retry_at == clock[0] + dt.timedelta(seconds=RETRY_DELAYS[attempt - 1])
        assert given_up() == (0, [])
        clock[0] = row.retry_at
        assert index_pending(node) == 0
    assert sum(delay for delay in RETRY_DELAYS[:GIVE_UP_AFTER - 1]) == 60 + 300 + 1800  # the 30-minute retry
    row = UnreadRecord.get_by_id(bad.id)
    assert (row.state, row.attempts, row.data_errors) == (FAILED, GIVE_UP_AFTER, GIVE_UP_AFTER)
    assert row.reason.startswith("index write failed: ") and "string or blob too big" in row.reason
    assert given_up() == (1, [(bad.id, row.reason)])
    assert backlog() == 1  # search still says a message is missing
    assert _gauges() == {"mailgate_archive_index_retrying_records": 0, "mailgate_archive_index_failed_records": 1}

    writes.clear()
    for _ in range(3):  # given up: never tried again
        clock[0] += dt.timedelta(days=1)
        assert index_pending(node) == 0
    assert writes == [] and UnreadRecord.get_by_id(bad.id).attempts == GIVE_UP_AFTER
    assert record_ids("avocet") == [good.id]
    assert node.read(bad) == message(0, "avocet")  # the record itself is intact


def test_passing_failures_are_retried_for_ever_and_do_not_count_towards_giving_up(archive, monkeypatch, clock):
    node, (bad, good) = _records(archive, "stint")
    error: list[BaseException] = [LOCKED]
    _failing_writes(monkeypatch, {bad.id}, error)
    assert index_pending(node) == 1
    kinds = [LOCKED] * 3 + [TOO_BIG] * (GIVE_UP_AFTER - 1) + [LOCKED] * 4
    for n, kind in enumerate(kinds, start=2):
        error[0] = kind
        clock[0] = UnreadRecord.get_by_id(bad.id).retry_at
        assert index_pending(node) == 0
        row = UnreadRecord.get_by_id(bad.id)
        assert row.attempts == n and row.state == RETRY  # data errors: GIVE_UP_AFTER - 1, no more
    assert row.data_errors == GIVE_UP_AFTER - 1
    assert row.retry_at == clock[0] + dt.timedelta(seconds=RETRY_DELAYS[-1])
    assert row.reason == "index write failed: OperationalError: database is locked"
    error[0] = TOO_BIG  # one more data error: given up
    clock[0] = row.retry_at
    index_pending(node)
    assert UnreadRecord.get_by_id(bad.id).state == FAILED


def test_reindex_failed_tries_again_once_and_indexes_once_the_cause_is_gone(archive, monkeypatch, clock):
    node, (bad, good) = _records(archive, "sanderling")
    failing = {bad.id}
    error: list[BaseException] = [TOO_BIG]
    writes = _failing_writes(monkeypatch, failing, error)
    index_pending(node)
    for _ in range(GIVE_UP_AFTER - 1):
        clock[0] = UnreadRecord.get_by_id(bad.id).retry_at
        index_pending(node)
    assert UnreadRecord.get_by_id(bad.id).state == FAILED

    writes.clear()
    result = reindex.retry_failed(node)  # still refused: one attempt, given up again at once
    assert writes and result.indexed == [] and result.rescheduled == []
    assert [rid for rid, _ in result.refused] == [bad.id] and "too big" in result.refused[0][1]
    row = UnreadRecord.get_by_id(bad.id)
    assert (row.state, row.attempts, row.data_errors) == (FAILED, GIVE_UP_AFTER + 1, GIVE_UP_AFTER + 1)

    error[0] = LOCKED  # a passing failure during the retry: back on the indexer's schedule
    result = reindex.retry_failed(node)
    assert [rid for rid, _ in result.rescheduled] == [bad.id] and result.refused == []
    row = UnreadRecord.get_by_id(bad.id)
    assert row.state == RETRY and row.retry_at > clock[0]
    clock[0] = row.retry_at
    error[0] = TOO_BIG
    index_pending(node)  # refused again: the count goes on from where it was, given up at once
    assert UnreadRecord.get_by_id(bad.id).state == FAILED

    failing.clear()  # fixed (the software, or the database's limits)
    result = reindex.retry_failed(node)
    assert result == reindex.Retried([bad.id], [], [])
    assert UnreadRecord.select().count() == 0 and backlog() == 0 and given_up() == (0, [])
    assert sorted(record_ids("sanderling")) == sorted([bad.id, good.id])
    assert sorted(d.record_id for d in SearchDoc.select()) == sorted([bad.id, good.id])
    assert reindex.retry_failed(node) == reindex.Retried([], [], [])  # nothing left


def test_a_given_up_record_purged_meanwhile_is_forgotten_by_the_retry(archive, monkeypatch, clock):
    from gateway.archive.schema import ArchiveRecord

    node, (bad, _) = _records(archive, "knot")
    UnreadRecord.create(record_id=bad.id, reason="index write failed: x", attempts=4, data_errors=4,
                        retry_at=clock[0], state=FAILED)
    ArchiveRecord.update(purged_at=utcnow()).where(ArchiveRecord.id == bad.id).execute()
    assert reindex.retry_failed(node).indexed == [bad.id]
    assert UnreadRecord.select().count() == 0


class Crash(BaseException):
    """The process dying mid-way (kill, ^C): nothing after it runs."""


def test_reindex_failed_goes_a_batch_per_transaction_and_a_crash_leaves_the_rest_given_up(
        archive, monkeypatch, clock):
    node, recs = _records(archive, "whimbrel", n=7)
    ids = sorted(r.id for r in recs)
    for rid in ids:
        UnreadRecord.create(record_id=rid, reason="index write failed: x", attempts=4, data_errors=4,
                            retry_at=clock[0], state=FAILED)
    monkeypatch.setattr(reindex, "RETRY_BATCH", 3)
    real_note = reindex.note_unread
    notes: list[list[int]] = []

    def note(archive, tried, failed, **kw):  # noqa: ANN001, ANN202
        notes.append(sorted(tried))
        if len(notes) == 2:  # the second batch's documents are written, not yet committed
            assert SearchDoc.select().where(SearchDoc.record_id.in_(ids[3:6])).count() == 3
            raise Crash
        return real_note(archive, tried, failed, **kw)

    monkeypatch.setattr(reindex, "note_unread", note)
    with pytest.raises(Crash):
        reindex.retry_failed(node)
    assert notes == [ids[:3], ids[3:6]]
    assert sorted(d.record_id for d in SearchDoc.select()) == ids[:3]  # the first batch committed alone
    left = {r.record_id: (r.state, r.attempts) for r in UnreadRecord.select()}
    assert left == {rid: (FAILED, 4) for rid in ids[3:]}  # the rest given up, untouched

    monkeypatch.setattr(reindex, "note_unread", real_note)
    seen: list[tuple[int, int]] = []
    result = reindex.retry_failed(node, progress=lambda done, total: seen.append((done, total)))
    assert result == reindex.Retried(ids[3:], [], [])
    assert seen == [(3, 4), (4, 4)]  # the run takes up the rest, a batch at a time
    assert sorted(d.record_id for d in SearchDoc.select()) == ids and UnreadRecord.select().count() == 0
    assert sorted(record_ids("whimbrel")) == ids


def test_reindex_failed_takes_each_record_once_per_run_even_when_it_stays_refused(archive, monkeypatch, clock):
    """The records refused again stay given up, behind the run's cursor: a run over more records
    than a batch ends, each tried once, however many stay refused."""
    node, recs = _records(archive, "dunlin", n=5)
    ids = sorted(r.id for r in recs)
    for rid in ids:
        UnreadRecord.create(record_id=rid, reason="index write failed: x", attempts=4, data_errors=4,
                            retry_at=clock[0], state=FAILED)
    writes = _failing_writes(monkeypatch, set(ids[:4]), [TOO_BIG])
    result = reindex.retry_failed(node, record_ids=ids, batch=2)
    assert [rid for rid, _ in result.refused] == ids[:4] and result.indexed == ids[4:]
    assert writes and all(len(w) <= 2 for w in writes)  # two records per transaction at most
    assert {r.record_id: r.state for r in UnreadRecord.select()} == {rid: FAILED for rid in ids[:4]}
    assert {r.record_id: r.attempts for r in UnreadRecord.select()} == {rid: 5 for rid in ids[:4]}  # once each


def test_migration_165_adds_the_state_to_an_existing_list(db):
    """A database listed before 165: its rows are kept, on the retry schedule."""
    database.obj.execute_sql("DROP TABLE archivesearchunread")
    database.obj.execute_sql("CREATE TABLE archivesearchunread (record_id INTEGER NOT NULL PRIMARY KEY,"
                             " reason VARCHAR(300) NOT NULL, permanent INTEGER NOT NULL, attempts INTEGER NOT NULL,"
                             " retry_at DATETIME NOT NULL)")
    database.obj.execute_sql("INSERT INTO archivesearchunread VALUES (7, 'index write failed: x', 0, 9,"
                             " '2026-11-30 10:00:00')")
    search_unread_given_up(database.obj)
    search_unread_given_up(database.obj)  # again: nothing to do
    row = UnreadRecord.get_by_id(7)
    assert (row.state, row.data_errors, row.attempts, row.reason) == (RETRY, 0, 9, "index write failed: x")


def test_verify_warns_about_given_up_records_and_reindex_failed_indexes_them(cli_config, capsys):
    from gateway.archive.search_schema import SearchDoc as Doc
    from gateway.cli import main
    from gateway.config import load
    from gateway.db import connect

    cfg = load(cli_config)
    connect(cfg.database.url)
    archive = Archive.from_config(cfg)
    rec = Archive(archive.directory, archive.store.key_file, defer_index=True).record(
        message(3, "ruff"), direction="outbound", verdict="accepted")
    UnreadRecord.create(record_id=rec.id, reason="index write failed: DataError: string or blob too big",
                        attempts=4, data_errors=4, retry_at=utcnow(), state=FAILED)
    database.close()
    capsys.readouterr()
    assert main(["-c", str(cli_config), "archive", "verify", "--quiet"]) == 0  # a warning, not a problem
    out = capsys.readouterr().out
    assert "warning: 1 record(s) cannot be found by search" in out and "reindex --failed" in out
    assert f"warning: record {rec.id}: index write failed: DataError: string or blob too big" in out
    assert "archive verify: OK" in out

    assert main(["-c", str(cli_config), "archive", "reindex", "--failed"]) == 0
    out, err = capsys.readouterr()
    assert "archive reindex: 1 record(s) indexed, 0 still refused, 0 left to the indexer" in out
    assert re.search(r"^reindex: 1/1 records \(\d+/s\), done$", err, re.M), err  # the progress's last line
    connect(cfg.database.url)
    assert UnreadRecord.select().count() == 0 and Doc.select().where(Doc.record_id == rec.id).count() == 1
    from gateway.db.models import AuditLog

    assert AuditLog.select().where(AuditLog.action == "archive.reindex").count() == 1
    database.close()
    assert main(["-c", str(cli_config), "archive", "verify", "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().out
