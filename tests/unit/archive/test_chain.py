from __future__ import annotations

from gateway.archive import chain
from gateway.archive.schema import ArchiveRecord, ArchiveSighting

from .conftest import message


def test_one_record_per_content_many_sightings(archive):
    raw = message(1)
    r1 = archive.record(raw, direction="outbound", verdict="accepted", queue_id="Q1", trace=[{"rule": "x"}])
    r2 = archive.record(raw, direction="outbound", verdict="sent", place="relay:sent", queue_id="Q1")
    assert r1.id == r2.id and ArchiveRecord.select().count() == 1
    places = [s.place for s in ArchiveSighting.select().order_by(ArchiveSighting.seq)]
    assert places == ["smtp:submitted", "relay:sent"]
    assert archive.read(r1) == raw
    first = ArchiveSighting.select().order_by(ArchiveSighting.seq).first()
    assert (first.verdict, first.queue_id, first.trace) == ("accepted", "Q1", '[{"rule": "x"}]')


def test_ref_makes_sightings_idempotent(archive):
    raw = message(2)
    for _ in range(3):
        archive.record(raw, direction="inbound", verdict="seen", place="sync:a@acme.test/INBOX", ref="7:12")
    assert ArchiveSighting.select().count() == 1
    archive.record(raw, direction="inbound", verdict="seen", place="sync:a@acme.test/INBOX", ref="7:13")
    assert ArchiveSighting.select().count() == 2


def test_chain_links_every_row_in_seq_order(archive):
    for n in range(4):
        archive.record(message(n), direction="outbound", verdict="accepted")
    ev = chain.append_event("checkpoint", "test")
    rows = sorted([(r.seq, r.prev_hash, r.hash) for m in (ArchiveRecord, ArchiveSighting)
                   for r in m.select()] + [(ev.seq, ev.prev_hash, ev.hash)])
    assert [s for s, _, _ in rows] == list(range(1, 10))
    prev = chain.GENESIS
    for _, p, h in rows:
        assert p == prev
        prev = h
    assert chain.head() == (9, prev)


def test_headers_filled_from_the_message_when_not_given(archive):
    from gateway.archive import Capture

    out = archive.ingest_many([Capture(raw=message(5), place="import:eml")])
    rec = out[0].record
    assert (rec.subject, rec.message_id, rec.mail_from) == ("Offer 5", "<m5@acme.test>", "alice@acme.test")
    assert out[0].new_record and out[0].new_sighting


def test_a_staged_capture_chains_as_an_unstaged_one_and_again_after_a_rollback(archive):
    """Archive.stage (the SMTP handler's phase 1) makes the record and its digest before the
    transaction; the rows are those chain_batch makes unstaged.  A batch that rolls back and
    runs again (the group commit's one-by-one fallback) inserts the record again, not an
    UPDATE of a row that is gone."""
    import pytest

    from gateway.archive import Capture
    from gateway.archive.verify import verify
    from gateway.db.models import database
    from gateway.groupcommit import write_transaction

    def capture(n: int) -> Capture:
        return Capture(raw=message(n), place="smtp:submitted", direction="outbound", verdict="accepted",
                       mail_from="alice@acme.test", recipients=[f"buyer{n}@example.com"], subject=f"Offer {n}",
                       message_id=f"<m{n}@acme.test>", employee_email="", trace=[{"rule": "r"}], queue_id=f"Q{n}")

    staged = archive.stage(capture(1), blob := archive.prepare(message(1)))
    assert staged.staged is not None and staged.staged.record.digest == chain.record_digest(staged.staged.record)
    archive.store.write(blob)
    with pytest.raises(RuntimeError), write_transaction():
        archive.chain_batch([staged], [blob])
        assert ArchiveRecord.select().count() == 1
        raise RuntimeError("the batch fails after its rows were written")
    assert ArchiveRecord.select().count() == 0 and chain.head()[0] == 0
    with database.atomic():
        (out,) = archive.chain_batch([staged], [blob])
    plain = archive.prepare(message(2))
    archive.store.write(plain)
    with database.atomic():
        (other,) = archive.chain_batch([capture(2)], [plain])
    assert out.new_record and ArchiveRecord.select().count() == 2
    rec = ArchiveRecord.get(ArchiveRecord.sha256 == blob.sha256)
    assert (rec.subject, rec.queue_id, rec.trace, rec.recipients) == (
        "Offer 1", "Q1", '[{"rule": "r"}]', '["buyer1@example.com"]')
    assert ArchiveSighting.get(ArchiveSighting.record == rec).trace == '[{"rule": "r"}]'
    assert other.record.trace == rec.trace  # staged or not, the same fields
    assert verify(archive.store) == []
