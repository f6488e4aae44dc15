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
