from __future__ import annotations

import datetime as dt

import pytest

from gateway.archive import ArchiveError
from gateway.archive.retention import HoldError, active_holds, is_held, place_hold, purge, release_hold
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


def test_a_hold_released_or_deleted_in_the_table_still_holds_and_verify_reports_it(archive):
    """The hold table is not the authority: the chained hold/release events are."""
    from gateway.archive.schema import ArchiveHold

    old = [_old(archive, i) for i in range(3)]
    by_record = place_hold("record", str(old[0].id), "litigation", "auditor@acme.test")
    place_hold("record", str(old[1].id), "regulator", "auditor@acme.test")
    # an administrator "releases" one in the database and deletes the other
    ArchiveHold.update(released_at=utcnow(), released_by="dba").where(ArchiveHold.id == by_record.id).execute()
    ArchiveHold.delete().where(ArchiveHold.target == str(old[1].id)).execute()
    assert is_held(ArchiveRecord.get_by_id(old[0].id)) and is_held(ArchiveRecord.get_by_id(old[1].id))
    result = purge(archive.store, 7)
    assert result.purged == [old[2].id] and result.held == 2
    problems = verify(archive.store)
    assert len(problems) == 2
    assert any(f"hold {by_record.id} " in p and "without a chained release" in p for p in problems)
    assert any("missing from the hold table" in p for p in problems)
    # released properly (chained), both are lifted and the table is made true again
    for rec in old[:2]:
        hold = next(h for h in active_holds() if h.target == str(rec.id))
        release_hold(hold.id, "auditor@acme.test", "case closed")
    assert verify(archive.store) == []
    assert sorted(purge(archive.store, 7).purged) == [old[0].id, old[1].id]


def test_a_hold_inserted_behind_the_chains_back_is_reported_and_a_real_release_is_clean(archive):
    from gateway.archive.schema import ArchiveHold

    rec = _old(archive, 1)
    forged = ArchiveHold.create(scope="record", target=str(rec.id), reason="not chained", created_by="dba")
    assert verify(archive.store) == [f"archive: legal hold {forged.id} (record:{rec.id}) is active in the hold "
                                     "table but no chained event places it (or a chained release lifted it)"]
    forged.delete_instance()
    hold = place_hold("record", str(rec.id), "case", "auditor@acme.test")
    release_hold(hold.id, "auditor@acme.test", "closed")
    assert verify(archive.store) == [] and purge(archive.store, 7).purged == [rec.id]


def test_the_command_line_may_keep_mail_longer_but_never_shorter(tmp_path, capsys):
    from gateway.archive import Archive
    from gateway.cli import main
    from gateway.config import load
    from gateway.db import connect
    from tests.harness.gateway import write_config

    path = tmp_path / "mailgate.toml"
    cfg = {"node": {"name": "t", "data_dir": "var"}, "database": {"url": "sqlite:///var/m.db"},
           "company": {"name": "ACME", "domains": ["acme.test"]},
           "relay": {"mode": "relay_account", "username": "relay@acme.test", "password": "pw"},
           "archive": {"retention_years": 7}}
    write_config(path, cfg)
    assert main(["-c", str(path), "init"]) == 0
    db = connect(load(path).database.url)
    archive = Archive.from_config(load(path))
    rec = archive.record(message(1), direction="outbound", verdict="accepted", seen_at=utcnow() - dt.timedelta(
        days=365 * 5))
    db.close()
    capsys.readouterr()
    assert main(["-c", str(path), "archive", "purge", "--years", "3"]) == 2
    assert "shorter than [archive] retention_years = 7" in capsys.readouterr().err
    assert main(["-c", str(path), "archive", "purge", "--years", "10"]) == 0  # longer: allowed
    assert main(["-c", str(path), "archive", "purge"]) == 0
    assert "purged 0 record(s) older than 7 years" in capsys.readouterr().out
    cfg["archive"] = {"retention_years": 0}
    write_config(path, cfg)
    assert main(["-c", str(path), "archive", "purge", "--years", "3"]) == 2  # 0 = keep forever
    connect(load(path).database.url)
    assert ArchiveRecord.get_by_id(rec.id).purged_at is None
