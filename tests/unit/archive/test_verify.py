from __future__ import annotations

import os

import pytest

from gateway.archive import anchors, chain
from gateway.archive.schema import ArchiveChainHead, ArchiveRecord, ArchiveSighting
from gateway.archive.verify import checkpoint, verify, verify_chain

from .conftest import message


def _fill(archive, n=3):
    return [archive.record(message(i), direction="outbound", verdict="accepted", queue_id=f"Q{i}")
            for i in range(n)]


def test_intact_archive_verifies(archive):
    _fill(archive)
    assert verify(archive.store) == []


def test_altered_record_is_reported(archive):
    recs = _fill(archive)
    ArchiveRecord.update(subject="nothing to see").where(ArchiveRecord.id == recs[1].id).execute()
    problems = verify(archive.store)
    assert any(f"record {recs[1].id}" in p and "altered" in p for p in problems), problems


def test_altered_sighting_is_reported(archive):
    _fill(archive)
    s = ArchiveSighting.select().first()
    ArchiveSighting.update(verdict="accepted", reason="edited").where(ArchiveSighting.id == s.id).execute()
    assert any("sighting" in p and "altered" in p for p in verify(archive.store))


def test_rehashed_row_is_still_caught_by_the_link(archive):
    recs = _fill(archive)
    r = ArchiveRecord.get_by_id(recs[0].id)
    r.subject = "forged"
    r.digest = chain.record_digest(r)
    r.hash = chain.link(r.prev_hash, r.seq, chain.RECORD, r.digest)
    r.save()
    assert any("does not follow" in p for p in verify(archive.store))


def test_deleted_record_or_sighting_is_reported(archive):
    recs = _fill(archive)
    ArchiveSighting.delete().where(ArchiveSighting.record == recs[1].id).execute()
    ArchiveRecord.delete().where(ArchiveRecord.id == recs[1].id).execute()
    problems = verify(archive.store)
    assert any("missing (deleted)" in p for p in problems), problems


def test_cut_tail_is_reported_and_checkpoint_catches_a_rewritten_head(archive):
    _fill(archive)
    checkpoint("test")
    last = ArchiveSighting.select().order_by(ArchiveSighting.seq.desc()).first()
    ArchiveSighting.delete().where(ArchiveSighting.id == last.id).execute()
    assert any("head names entry" in p for p in verify(archive.store))
    prev = ArchiveRecord.select().order_by(ArchiveRecord.seq.desc()).first()
    ArchiveChainHead.update(seq=prev.seq, hash=prev.hash).execute()  # the attacker fixes the head
    assert any("checkpoint" in p for p in verify(archive.store))


def test_altered_or_deleted_blob_is_reported(archive):
    recs = _fill(archive)
    p0 = archive.blob_path(recs[0])
    data = bytearray(p0.read_bytes())
    data[-1] ^= 0x55
    p0.write_bytes(bytes(data))
    os.unlink(archive.blob_path(recs[2]))
    problems = verify(archive.store)
    assert any(f"record {recs[0].id}" in p and "decrypt" in p for p in problems)
    assert any(f"record {recs[2].id}" in p and "missing" in p for p in problems)
    assert verify(archive.store, blobs=False) == []


def test_swapped_blob_is_reported(archive):
    recs = _fill(archive)
    archive.blob_path(recs[0]).write_bytes(archive.blob_path(recs[1]).read_bytes())
    assert any("content hash" in p for p in verify(archive.store))


def test_blanking_without_purge_event_is_reported(archive):
    recs = _fill(archive)
    from gateway.db.models import utcnow

    ArchiveRecord.update(subject="", purged_at=utcnow()).where(ArchiveRecord.id == recs[0].id).execute()
    assert any("no purge event" in p for p in verify(archive.store))


# -- anchors kept outside the database (gateway/archive/anchors.py) -------------------------


def _cut_tail_after_checkpoints(archive):
    """Checkpoint, add entries, then do what the audit found undetected: delete the entries
    after the checkpoint, rewrite the head to the last kept one and delete the newest
    operation-log checkpoint."""
    from gateway.db.models import AuditLog

    _fill(archive)
    checkpoint("test", archive.directory)
    keep = chain.head()
    _fill(archive, 5)
    checkpoint("test", archive.directory)  # the anchor that will name the cut tail
    assert verify(archive.store) == []
    for model in (ArchiveSighting, ArchiveRecord):  # sightings first: they reference records
        model.delete().where(model.seq > keep[0]).execute()
    ArchiveChainHead.update(seq=keep[0], hash=keep[1]).execute()
    newest = AuditLog.select().where(AuditLog.action == "archive.checkpoint").order_by(AuditLog.id.desc()).first()
    AuditLog.delete().where(AuditLog.id == newest.id).execute()
    assert verify_chain() == []  # the database alone no longer shows it
    return keep


def test_anchors_file_catches_a_cut_tail_with_head_and_checkpoint_rewritten(archive):
    _cut_tail_after_checkpoints(archive)
    problems = verify(archive.store)
    assert any("tail was cut" in p and "chain-anchors.log line 3" in p for p in problems), problems


def test_deleted_anchors_file_is_reported(archive):
    _cut_tail_after_checkpoints(archive)
    (archive.directory / "chain-anchors.log").unlink()
    problems = verify(archive.store)
    assert any("anchors file missing" in p for p in problems), problems


def test_anchors_file_lines_removed_are_reported(archive):
    _fill(archive)
    checkpoint("test", archive.directory)
    path = archive.directory / "chain-anchors.log"
    assert verify(archive.store) == []
    path.write_text("")  # emptied: the operation log's anchored checkpoint is not in it
    assert any("is not in" in p for p in verify(archive.store))


def test_malformed_anchors_line_is_reported(archive):
    _fill(archive)
    checkpoint("test", archive.directory)
    with open(archive.directory / "chain-anchors.log", "a") as f:
        f.write("12:nothex 2026-12-01T00:00:00Z\n")
    problems = verify(archive.store)
    assert len(problems) == 1 and "line 3 is malformed" in problems[0], problems


def test_rewritten_entry_contradicts_an_anchor(archive):
    _fill(archive)
    seq, h = checkpoint("test", archive.directory)
    ArchiveSighting.update(hash="f" * 64).where(ArchiveSighting.seq == seq).execute()
    assert any("another hash" in p for p in verify(archive.store))


def test_anchor_kept_off_host(archive):
    _fill(archive)
    seq, h = chain.head()
    assert verify(archive.store, anchors=[anchors.Anchor(seq, h)]) == []
    problems = verify(archive.store, anchors=[anchors.Anchor(seq + 5, h)])
    assert any("--anchor" in p and "tail was cut" in p for p in problems), problems
    assert any("another hash" in p for p in verify(archive.store, anchors=[anchors.Anchor(seq, "0" * 64)]))


def test_checkpoint_without_directory_needs_no_anchors_file(archive):
    _fill(archive)
    checkpoint("test")  # the op log only (as before anchors existed)
    assert verify(archive.store) == [] and not (archive.directory / "chain-anchors.log").exists()


def test_parse_anchor():
    h = "a" * 64
    assert anchors.parse(f" 12:{h.upper()} ") == anchors.Anchor(12, h)
    op = anchors.parse(f"oplog:7:{h}")
    assert op == anchors.Anchor(7, h, anchors.OPLOG) and op != anchors.Anchor(7, h)
    assert anchors.parse(str(op)) == op and str(op) == f"oplog:7:{h}"
    for bad in ("12", f"x:{h}", "12:abc", f"-1:{h}", f"12:{h}0", f"oplog:{h}", f"oplog:x:{h}", f"log:7:{h}"):
        with pytest.raises(anchors.AnchorError):
            anchors.parse(bad)


def test_checkpoint_of_an_empty_archive_stays_valid(archive):
    """The node's first daily checkpoint may come before any mail (seq 0, GENESIS)."""
    assert verify(archive.store) == []
    assert checkpoint("test", archive.directory) == (0, chain.GENESIS)
    assert verify(archive.store) == []
    _fill(archive)
    assert verify(archive.store) == []


def test_the_operation_logs_own_chain_is_verified_too(archive):
    """The checkpoints, the purges and the auditors' trail are in the operation log: an entry
    altered or deleted there is an archive verify problem too."""
    from gateway import oplog
    from gateway.db.models import AuditLog

    archive.record(message(1), direction="outbound", verdict="accepted")
    searched = oplog.record("local:auditor", "archive.search", "archive", {"query": "报价单"})
    oplog.record("local:auditor", "archive.view", "archive:1")
    assert verify(archive.store) == []
    AuditLog.update(details='{"query": "lunch"}').where(AuditLog.id == searched.id).execute()
    assert verify(archive.store) == [f"operation log: entry {searched.id} was altered"]
    AuditLog.delete().where(AuditLog.id == searched.id).execute()
    assert [p for p in verify(archive.store) if p.startswith("operation log")] == [
        f"operation log: entry {searched.id + 1} does not follow the one before it "
        "(an entry was deleted or reordered)"]


# -- the operation log's own end, anchored in the same file -----------------------------------


def _trail(n: int) -> list:
    from gateway import oplog

    return [oplog.record("local:auditor", "archive.search", "archive", {"query": f"q{i}"}) for i in range(n)]


def test_checkpoint_anchors_the_operation_logs_end_before_its_own_entry(archive):
    from gateway import oplog

    _fill(archive)
    last = _trail(2)[-1]
    seq, h = checkpoint("test", archive.directory)
    lines = (archive.directory / "chain-anchors.log").read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == [f"{seq}:{h}", f"oplog:{last.id}:{last.hash}"]
    assert oplog.head()[0] == last.id + 1  # the checkpoint's own entry, covered by the next one
    assert verify(archive.store) == []


def test_cut_at_the_operation_logs_end_is_reported(archive):
    """The auditors' newest trail entries (and the checkpoint after them) deleted: the log's
    own chain still verifies, its anchor in chain-anchors.log does not."""
    from gateway import oplog
    from gateway.db.models import AuditLog

    _fill(archive)
    checkpoint("test", archive.directory)  # lines 1-2
    trail = _trail(3)
    checkpoint("test", archive.directory)  # lines 3-4: line 4 names trail[-1]
    assert verify(archive.store) == []
    AuditLog.delete().where(AuditLog.id >= trail[0].id).execute()
    assert oplog.verify() == [] and verify_chain() == []  # the database alone no longer shows it
    problems = verify(archive.store)
    assert any(p.startswith(f"operation-log anchor {trail[-1].id}:") and "chain-anchors.log line 4" in p
               and "tail was cut" in p for p in problems), problems
    _trail(5)  # written over the cut (SQLite reuses the ids): still not the anchored entry
    problems = verify(archive.store)
    assert any(p.startswith("operation-log anchor") and "line 4" in p for p in problems), problems


def test_operation_log_anchor_line_removed_is_reported(archive):
    _fill(archive)
    _trail(1)
    checkpoint("test", archive.directory)
    path = archive.directory / "chain-anchors.log"
    path.write_text("".join(ln for ln in path.read_text().splitlines(True) if not ln.startswith("oplog:")))
    problems = verify(archive.store)
    assert len(problems) == 1 and "anchor of its own end" in problems[0] and "is not in" in problems[0], problems


def test_anchors_file_from_before_operation_log_anchors_still_verifies(archive):
    """Files (and checkpoints) written before op-log anchors existed: chain lines only."""
    from gateway import oplog

    _fill(archive)
    seq, h = chain.head()
    anchors.append(archive.directory, anchors.Anchor(seq, h))  # what the old checkpoint wrote ...
    oplog.record("test", "archive.checkpoint", f"seq {seq}", {"seq": seq, "hash": h, "anchored": True})
    _trail(2)
    assert verify(archive.store) == []
    checkpoint("test", archive.directory)  # a new checkpoint appends both kinds to the old file
    assert verify(archive.store) == []
    assert len((archive.directory / "chain-anchors.log").read_text().splitlines()) == 3


def test_operation_log_anchor_kept_off_host(archive):
    from gateway import oplog
    from gateway.db.models import AuditLog

    _fill(archive)
    trail = _trail(3)
    kept = anchors.Anchor(*oplog.head(), anchors.OPLOG)
    assert verify(archive.store, anchors=[kept, anchors.Anchor(0, oplog.GENESIS, anchors.OPLOG)]) == []
    AuditLog.delete().where(AuditLog.id == trail[-1].id).execute()
    problems = verify(archive.store, anchors=[kept])
    assert len(problems) == 1 and "--anchor" in problems[0] and "tail was cut" in problems[0], problems
    problems = verify(archive.store, anchors=[anchors.Anchor(trail[0].id, "0" * 64, anchors.OPLOG)])
    assert len(problems) == 1 and "operation log was rewritten" in problems[0], problems
