from __future__ import annotations

import os

from gateway.archive import chain
from gateway.archive.schema import ArchiveChainHead, ArchiveRecord, ArchiveSighting
from gateway.archive.verify import checkpoint, verify

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
