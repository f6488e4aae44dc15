"""Unreferenced blobs (gateway/archive/gc.py) on the real PostgreSQL fixture: the SQLite cases,
and a writer whose record waits for gc's chain lock while gc removes the blob it had found on
disk — it writes the blob again, and its record is readable."""

from __future__ import annotations

import threading
import time

import pytest

from gateway.archive import gc
from gateway.archive.verify import verify
from gateway.db.models import database
from tests.harness.pgdb import pg_db
from tests.unit.archive import test_gc as cases
from tests.unit.archive.conftest import archive, message  # noqa: F401 - the SQLite cases' fixture, on this db

pytestmark = pytest.mark.integration


db = pg_db("t_archive_gc_")

world = cases.world
test_verify_lists_the_unreferenced_and_gc_removes_the_old_ones_only = (
    cases.test_verify_lists_the_unreferenced_and_gc_removes_the_old_ones_only)
test_more_shards_than_one_find_the_same = cases.test_more_shards_than_one_find_the_same
test_a_record_committed_after_the_names_were_read_keeps_its_blob = (
    cases.test_a_record_committed_after_the_names_were_read_keeps_its_blob)
test_a_writer_that_found_the_blob_before_gc_removed_it_writes_it_again = (
    cases.test_a_writer_that_found_the_blob_before_gc_removed_it_writes_it_again)


def _lock_waiters() -> int:
    """Backends of this database waiting for a lock (asked inside gc's transaction: the
    statistics snapshot is taken afresh each time)."""
    database.execute_sql("SELECT pg_stat_clear_snapshot()")
    return database.execute_sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                " AND datname = current_database()").fetchone()[0]


def test_a_writer_waiting_for_the_chain_lock_during_gc_writes_the_blob_again(archive, monkeypatch):  # noqa: F811
    name = cases.left_behind(archive, message(7))
    prepared = archive.prepare(message(7))
    assert prepared.data is None  # found on disk: the writer will not write it
    recorded: list = []
    failed: list[BaseException] = []

    def writer() -> None:
        try:
            recorded.append(archive.record(message(7), direction="outbound", verdict="accepted", prepared=prepared))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failed.append(exc)
        finally:
            database.close()

    real = gc._named
    thread = threading.Thread(target=writer)

    def named(shard, shards, since_seq=None):  # noqa: ANN001, ANN202
        if since_seq is not None and not thread.is_alive():  # gc holds the chain lock now
            thread.start()
            deadline = time.monotonic() + 30
            while _lock_waiters() == 0:  # the writer is blocked on the chain's head row
                assert time.monotonic() < deadline, "the writer never waited for the chain lock"
                time.sleep(0.01)
        return real(shard, shards, since_seq)

    monkeypatch.setattr(gc, "_named", named)
    assert [f.name for f in gc.collect(archive.store, cases.HOUR, "cli:test").removed] == [name]
    thread.join(30)
    assert not failed and recorded, failed
    assert recorded[0].blob_path == name and archive.read(recorded[0]) == message(7)
    assert verify(archive.store) == []
