"""The SMTP store path must never see "database is locked" because a job read before it wrote
while another process committed (the 451s seen with 4 parallel submissions)."""

from __future__ import annotations

import sqlite3
import threading

from gateway.archive.schema import ArchiveSighting
from gateway.db.models import Department, Employee
from gateway.groupcommit import GroupCommitter, write_transaction

from .conftest import message


def _other_writer(db) -> sqlite3.Connection:
    """Another process's connection (the relay process), not waiting for locks."""
    return sqlite3.connect(db.database, timeout=0, isolation_level=None, check_same_thread=False)


def test_group_commit_job_that_reads_first_is_not_refused(db):
    other = _other_writer(db)
    committer = GroupCommitter()
    interleaved: list[str] = []

    def job() -> str:
        Employee.select().count()  # a read first: under a deferred BEGIN this pins a snapshot
        try:  # another process commits between our read and our write
            other.execute("INSERT INTO department (name) VALUES ('from the relay process')")
            interleaved.append("committed")
        except sqlite3.OperationalError:
            interleaved.append("waited")  # the batch already holds the write lock: it must wait
        Department.create(name="from the group commit")
        return "ok"

    try:
        assert committer.run_sync(job, timeout=30) == "ok"
    finally:
        committer.stop()
        other.close()
    assert interleaved == ["waited"]
    assert Department.select().where(Department.name == "from the group commit").exists()


def test_archive_record_in_its_own_transaction_takes_the_write_lock_first(archive, db):
    other = _other_writer(db)
    try:
        with write_transaction():
            archive.record(message(1), direction="outbound", verdict="accepted", subject=None, message_id=None)
            try:
                other.execute("INSERT INTO department (name) VALUES ('x')")
                raise AssertionError("another writer got in while the archive held its transaction")
            except sqlite3.OperationalError as exc:
                assert "locked" in str(exc)
    finally:
        other.close()
    assert ArchiveSighting.select().count() == 1


def test_concurrent_writers_keep_one_unbroken_chain(archive):
    """Four threads (own connections) record the same and different messages at once:
    one record per content, no seq used twice, the chain verifies."""
    from gateway.archive.schema import ArchiveRecord
    from gateway.archive.verify import verify
    from gateway.db.models import database

    start, errors = threading.Barrier(4), []

    def writer(w: int) -> None:
        start.wait()
        try:
            for i in range(15):
                archive.record(message(i % 5 if w % 2 else 100 + w * 15 + i), direction="inbound", verdict="seen",
                               place=f"sync:w{w}", subject=None, message_id=None)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            database.close()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert ArchiveRecord.select().count() == 5 + 2 * 15
    assert ArchiveSighting.select().count() == 60
    assert verify(archive.store) == []
