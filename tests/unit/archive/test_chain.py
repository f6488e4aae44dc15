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
