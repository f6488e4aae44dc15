"""A document the background indexer cannot write, on the real PostgreSQL fixture: the server
refuses it part-way (its ``archivesearchdoc`` row copied, its text not), in either half of a
split write (``doctables._write_split``: the older half committed on a second connection).  The
record is listed in ``archivesearchunread`` with the reason and counted by ``backlog()``,
no part of its document stays, and once the failure stops the retry writes it — once."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from gateway.archive import Archive, doctables, indexer, reindex, unread
from gateway.archive.indexer import backlog, index_pending
from gateway.archive.search import record_ids
from gateway.archive.search_schema import SearchDoc
from gateway.archive.unread import RETRY_DELAYS, UnreadRecord
from gateway.db.models import utcnow
from tests.harness.pgdb import pg_db
from tests.unit.archive.conftest import message

pytestmark = pytest.mark.integration


db = pg_db("t_archive_index_retry_")


def _orphans(db) -> int:  # noqa: ANN001
    """Index rows whose document (``archivesearchdoc``) is not there."""
    return sum(db.execute_sql(f"SELECT count(*) FROM {table} t WHERE NOT EXISTS"
                              " (SELECT 1 FROM archivesearchdoc d WHERE d.docid = t.docid)").fetchone()[0]
               for table in ("archivesearchtext", "archivesearchseen", "archivesearchaddr"))


@pytest.mark.parametrize("bad_at", [1, 9], ids=["second-connection-half", "this-connection-half"])
def test_a_document_the_server_refuses_is_listed_and_written_once_when_the_retry_succeeds(
        db, tmp_path, monkeypatch, bad_at):
    now = [utcnow()]
    for module in (unread, indexer):  # the retry schedule's clock and the records' ages
        monkeypatch.setattr(module, "utcnow", lambda: now[0])
    monkeypatch.setattr(doctables, "PG_SPLIT_MIN", 4)  # the pass's 12 documents go out as a split write
    writer = Archive(tmp_path / "archive", tmp_path / "archive.keys", defer_index=True)
    recs = [writer.record(message(i, "plover qz" if i == bad_at else "plover"), direction="outbound",
                          verdict="accepted") for i in range(12)]
    bad = recs[bad_at]
    node = Archive(tmp_path / "archive", tmp_path / "archive.keys", defer_index=True)

    failing = {bad.id}
    real = doctables._write_ordered
    halves: list[list[int]] = []

    def write(rows: list[tuple]) -> None:  # a NUL in the subject: the text's COPY is refused
        halves.append([r[1] for r in rows])
        real([(*r[:5], dataclasses.replace(r[5], subject=r[5].subject + "\x00"), r[6]) if r[1] in failing else r
              for r in rows])

    monkeypatch.setattr(doctables, "_write_ordered", write)
    assert index_pending(node) == 11
    assert halves[:2] in ([[r.id for r in recs[6:]], [r.id for r in recs[:6]]],
                          [[r.id for r in recs[:6]], [r.id for r in recs[6:]]])  # split, as meant
    good = sorted(r.id for r in recs if r is not bad)
    assert sorted(d.record_id for d in SearchDoc.select()) == good  # each once, the bad one not at all
    assert _orphans(db) == 0  # nothing of the refused write stays
    assert sorted(record_ids("plover")) == good and record_ids("qz") == []
    row = UnreadRecord.get_by_id(bad.id)
    assert row.reason.startswith("index write failed: ") and "0x00" in row.reason
    assert "\n" not in row.reason and "CONTEXT" not in row.reason  # the COPY's quoted row stays in the log
    assert (row.attempts, row.permanent) == (1, False)
    assert backlog() == 1

    failing.clear()
    now[0] = row.retry_at
    assert index_pending(node) == 1
    assert sorted(d.record_id for d in SearchDoc.select()) == sorted(r.id for r in recs)
    assert _orphans(db) == 0
    assert db.execute_sql("SELECT count(*) FROM archivesearchtext").fetchone()[0] == len(recs)
    assert record_ids("qz") == [bad.id] and len(record_ids("plover")) == len(recs)
    assert UnreadRecord.select().count() == 0 and backlog() == 0
    now[0] += dt.timedelta(seconds=RETRY_DELAYS[-1])
    assert index_pending(node) == 0 and SearchDoc.select().count() == len(recs)


def test_a_document_the_server_refuses_for_its_data_is_given_up_and_reindexed_by_hand(db, tmp_path, monkeypatch):
    """The server's refusal (SQLSTATE 22021, a NUL in the text) is a data error: after the
    30-minute retry the record is given up (no more attempts), counted, and ``retry_failed``
    (``mailgate archive reindex --failed``) writes it once the cause is gone."""
    from gateway.archive.unread import FAILED, RETRY
    from gateway.metrics import ArchiveIndexCollector

    now = [utcnow()]
    for module in (unread, indexer):  # the retry schedule's clock and the records' ages
        monkeypatch.setattr(module, "utcnow", lambda: now[0])
    writer = Archive(tmp_path / "archive", tmp_path / "archive.keys", defer_index=True)
    bad, good = (writer.record(message(i, "curlew qz" if i == 0 else "curlew"), direction="outbound",
                               verdict="accepted") for i in range(2))
    node = Archive(tmp_path / "archive", tmp_path / "archive.keys", defer_index=True)
    failing = {bad.id}
    real = doctables._write_ordered
    writes: list[list[int]] = []

    def write(rows: list[tuple]) -> None:
        writes.append([r[1] for r in rows])
        real([(*r[:5], dataclasses.replace(r[5], subject=r[5].subject + "\x00"), r[6]) if r[1] in failing else r
              for r in rows])

    monkeypatch.setattr(doctables, "_write_ordered", write)
    assert index_pending(node) == 1
    for attempt in range(1, unread.GIVE_UP_AFTER):
        row = UnreadRecord.get_by_id(bad.id)
        assert (row.state, row.data_errors) == (RETRY, attempt)
        now[0] = row.retry_at
        assert index_pending(node) == 0
    row = UnreadRecord.get_by_id(bad.id)
    assert (row.state, row.attempts, row.data_errors) == (FAILED, unread.GIVE_UP_AFTER, unread.GIVE_UP_AFTER)
    assert "SQLSTATE" not in row.reason and "0x00" in row.reason
    assert {m.name: m.samples[0].value for m in ArchiveIndexCollector().collect()} == {
        "mailgate_archive_index_retrying_records": 0, "mailgate_archive_index_failed_records": 1}
    assert unread.given_up() == (1, [(bad.id, row.reason)]) and backlog() == 1
    writes.clear()
    now[0] += dt.timedelta(days=2)
    assert index_pending(node) == 0 and writes == []  # given up: not tried again

    assert [r for r, _ in reindex.retry_failed(node).refused] == [bad.id]  # still refused: stays given up
    assert UnreadRecord.get_by_id(bad.id).state == FAILED and _orphans(db) == 0
    failing.clear()
    assert reindex.retry_failed(node).indexed == [bad.id]
    assert record_ids("qz") == [bad.id] and sorted(record_ids("curlew")) == sorted([bad.id, good.id])
    assert UnreadRecord.select().count() == 0 and backlog() == 0 and _orphans(db) == 0


def test_migration_165_on_a_list_written_before_it(db):
    from gateway.archive.unread import RETRY, search_unread_given_up

    db.execute_sql("ALTER TABLE archivesearchunread DROP COLUMN state, DROP COLUMN data_errors")
    db.execute_sql("INSERT INTO archivesearchunread (record_id, reason, permanent, attempts, retry_at)"
                   " VALUES (5, 'index write failed: x', false, 7, now())")
    search_unread_given_up(db)
    search_unread_given_up(db)  # again: nothing to do
    row = UnreadRecord.get_by_id(5)
    assert (row.state, row.data_errors, row.attempts) == (RETRY, 0, 7)
