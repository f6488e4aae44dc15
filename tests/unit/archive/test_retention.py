from __future__ import annotations

import datetime as dt

import pytest

from gateway.archive import ArchiveError
from gateway.archive.retention import HoldError, is_held, place_hold, purge, release_hold
from gateway.archive.schema import ArchiveRecord, ArchiveSighting
from gateway.archive.verify import verify
from gateway.db.models import AuditLog, Employee, utcnow

from .conftest import message

OLD = utcnow() - dt.timedelta(days=365 * 8)


@pytest.fixture
def bob(db):
    return Employee.create(email="bob@acme.test", name="Bob")


def _old(archive, n, employee=None):
    return archive.record(message(n), direction="outbound", verdict="accepted", seen_at=OLD,
                          employee_id=employee.id if employee else None)


def test_purge_removes_old_unheld_records_and_keeps_the_chain_verifiable(archive, bob):
    old = [_old(archive, i) for i in range(3)]
    bobs = _old(archive, 10, bob)
    fresh = archive.record(message(99), direction="outbound", verdict="accepted")
    held = place_hold("record", str(old[1].id), "litigation 2026-17", "auditor@acme.test")
    place_hold("employee", "bob@acme.test", "investigation", "auditor@acme.test")
    assert is_held(ArchiveRecord.get_by_id(old[1].id)) and is_held(ArchiveRecord.get_by_id(bobs.id))

    dry = purge(archive.store, 7, dry_run=True)
    assert sorted(dry.purged) == [old[0].id, old[2].id] and dry.held == 2
    assert ArchiveRecord.select().where(ArchiveRecord.purged_at.is_null(False)).count() == 0

    result = purge(archive.store, 7, actor="system")
    assert sorted(result.purged) == [old[0].id, old[2].id] and result.held == 2
    gone = ArchiveRecord.get_by_id(old[0].id)
    assert gone.purged_at is not None and gone.subject == "" and not archive.blob_path(gone).exists()
    with pytest.raises(ArchiveError, match="purged"):
        archive.read(gone)
    assert archive.read(ArchiveRecord.get_by_id(old[1].id)) == message(1)
    assert archive.read(ArchiveRecord.get_by_id(fresh.id)) == message(99)
    assert AuditLog.select().where(AuditLog.action == "archive.purge").count() == 1
    assert verify(archive.store) == []

    release_hold(held.id, "auditor@acme.test", "case closed")
    assert purge(archive.store, 7).purged == [old[1].id]
    assert verify(archive.store) == []


def test_zero_years_keeps_everything(archive):
    _old(archive, 1)
    assert purge(archive.store, 0).purged == []


def test_hold_all_suspends_every_purge(archive):
    _old(archive, 1)
    place_hold("all", "", "regulator request", "auditor@acme.test")
    r = purge(archive.store, 1)
    assert r.purged == [] and r.held == 1


def test_purged_content_seen_again_is_archived_anew(archive):
    rec = _old(archive, 1)
    purge(archive.store, 7)
    again = archive.record(message(1), direction="inbound", verdict="seen", place="import:eml")
    assert again.id != rec.id and archive.read(again) == message(1)
    assert ArchiveSighting.select().where(ArchiveSighting.record == again.id).count() == 1
    assert verify(archive.store) == []


def test_bad_holds_are_refused(archive):
    with pytest.raises(HoldError):
        place_hold("record", "12345", "x", "a")
    with pytest.raises(HoldError):
        place_hold("employee", "nobody@acme.test", "x", "a")
    with pytest.raises(HoldError):
        place_hold("record", "1", "", "a")
    with pytest.raises(HoldError):
        release_hold(999, "a")


def test_a_failed_purge_commit_leaves_every_blob(archive, monkeypatch):
    from gateway.db.models import database

    old = [_old(archive, i) for i in range(2)]
    real = database.obj.commit
    calls = []

    def failing_commit():
        calls.append(1)
        if len(calls) == 1:  # the purge's own transaction
            raise RuntimeError("disk full")
        return real()

    monkeypatch.setattr(database.obj, "commit", failing_commit)
    with pytest.raises(RuntimeError, match="disk full"):
        purge(archive.store, 7)
    monkeypatch.setattr(database.obj, "commit", real)
    assert all(ArchiveRecord.get_by_id(r.id).purged_at is None for r in old)
    assert all(archive.blob_path(r).exists() for r in old)
    assert verify(archive.store) == []  # no record lost its blob
    assert sorted(purge(archive.store, 7).purged) == [r.id for r in old]
    assert not any(archive.blob_path(r).exists() for r in old) and verify(archive.store) == []


def test_blob_deletion_spares_content_archived_again_and_sweeps_leftovers(archive):
    from gateway.archive import retention

    first = _old(archive, 1)
    other = _old(archive, 2)
    real = retention.delete_blobs
    retention.delete_blobs = lambda store, names: 0  # a crash right after the purge's commit
    try:
        assert sorted(purge(archive.store, 7).purged) == [first.id, other.id]
    finally:
        retention.delete_blobs = real
    assert archive.blob_path(first).exists()  # left behind
    again = archive.record(message(1), direction="outbound", verdict="accepted")  # the same content, new record
    assert again.id != first.id and again.blob_path == first.blob_path
    assert retention.delete_blobs(archive.store, [first.blob_path, other.blob_path]) == 1  # only the purged one
    assert archive.read(ArchiveRecord.get_by_id(again.id)) == message(1)
    assert not archive.store.path_of(other.blob_path).exists()
    assert verify(archive.store) == []


def test_the_next_purge_deletes_blobs_an_interrupted_one_left(archive):
    from gateway.archive import retention

    old = _old(archive, 3)
    real = retention.delete_blobs
    retention.delete_blobs = lambda store, names: 0
    try:
        purge(archive.store, 7)
    finally:
        retention.delete_blobs = real
    assert archive.blob_path(old).exists()
    assert purge(archive.store, 7).purged == []  # nothing new to purge ...
    assert not archive.blob_path(old).exists()  # ... but the leftover is gone
    assert verify(archive.store) == []
