"""Search indexing off the mail path: a node's archive defers the index entry, the
background indexer (indexer.index_pending / service.index_loop) catches up, never twice."""

from __future__ import annotations

import asyncio

from gateway import customers
from gateway.archive import Archive
from gateway.archive.indexer import backlog, index_batch, index_pending
from gateway.archive.schema import ArchiveRecord
from gateway.archive.search import record_ids
from gateway.archive.search_schema import SearchDoc, SearchSeen, SearchState
from gateway.archive.service import index_loop
from tests.unit.archive.conftest import message


def _deferred(archive: Archive) -> Archive:
    return Archive(archive.directory, archive.store.key_file, defer_index=True)


def _seen(record_id: int) -> list[tuple]:
    doc = SearchDoc.get(SearchDoc.record_id == record_id)
    return sorted((s.employee_id or 0, s.direction) for s in SearchSeen.select().where(SearchSeen.docid == doc.docid))


def test_deferred_records_are_indexed_by_the_indexer(archive):
    node = _deferred(archive)
    recs = [node.record(message(i, "quotation zebrafish"), direction="outbound", verdict="accepted",
                        subject=None, message_id=None) for i in range(3)]
    assert SearchDoc.select().count() == 0 and record_ids("zebrafish") == []
    assert index_pending(node) == 3
    assert sorted(record_ids("zebrafish")) == sorted(r.id for r in recs)
    assert record_ids("Offer 1") == [recs[1].id]
    assert index_pending(node) == 0  # nothing left, nothing twice
    assert SearchDoc.select().count() == 3
    assert SearchState.get_by_id("records").value == max(r.id for r in recs)


def test_inline_stays_default_and_is_not_indexed_again(archive):
    inline = archive.record(message(1), direction="outbound", verdict="accepted", subject=None, message_id=None)
    assert SearchDoc.select().where(SearchDoc.record_id == inline.id).count() == 1  # indexed in its transaction
    deferred = _deferred(archive).record(message(2), direction="outbound", verdict="accepted")
    assert index_pending(archive) == 1  # only the deferred one
    assert index_pending(archive) == 0
    assert sorted(d.record_id for d in SearchDoc.select()) == sorted([inline.id, deferred.id])


def test_batches_in_order_and_sightings_noted(archive):
    alice = customers.create_employee("alice@acme.test", "Alice")
    node = _deferred(archive)
    recs = [node.record(message(i), direction="outbound", verdict="accepted") for i in range(5)]
    # A later sighting (the relay's, another employee) before its record is indexed: noted with it.
    node.record(message(3), direction="outbound", verdict="sent", place="relay:sent", employee_id=alice.id)
    assert index_pending(node, limit=2) == 2
    assert sorted(d.record_id for d in SearchDoc.select()) == [recs[0].id, recs[1].id]
    assert index_pending(node, limit=2) == 2
    assert _seen(recs[3].id) == [(0, "out"), (alice.id, "out")]
    assert index_pending(node, limit=2) == 1
    # A sighting of an already indexed record, deferred: noted by the next pass, once.
    node.record(message(0), direction="inbound", verdict="seen", place="imap:alice/INBOX", employee_id=alice.id)
    node.record(message(0), direction="inbound", verdict="seen", place="imap:alice/INBOX", employee_id=alice.id,
                ref="again")
    assert index_pending(node) == 0
    assert _seen(recs[0].id) == [(0, "out"), (alice.id, "in")]
    assert index_pending(node) == 0
    assert _seen(recs[0].id) == [(0, "out"), (alice.id, "in")]
    assert SearchDoc.select().count() == 5


def test_crash_before_indexing_is_caught_up_at_start(archive):
    """Records committed without index entries (the node stopped before its indexer ran):
    the indexer of the next start indexes them all, then keeps up with new ones."""
    node = _deferred(archive)
    recs = [node.record(message(i, "caughtup"), direction="outbound", verdict="accepted") for i in range(7)]
    assert SearchDoc.select().count() == 0

    async def run() -> list[int]:
        stopping = asyncio.Event()
        task = asyncio.create_task(index_loop(node, stopping, poll=0.05))
        found: list[int] = []
        async with asyncio.timeout(20):
            while len(found) < 7:
                found = await asyncio.to_thread(record_ids, "caughtup")
                await asyncio.sleep(0.02)
            late = await asyncio.to_thread(node.record, message(99, "caughtup"), direction="outbound",
                                           verdict="accepted")
            while late.id not in found:
                found = await asyncio.to_thread(record_ids, "caughtup")
                await asyncio.sleep(0.02)
        stopping.set()
        await task
        return found

    found = asyncio.run(run())
    assert sorted(found) == sorted([r.id for r in recs] + [ArchiveRecord.select().count()])
    assert SearchDoc.select().count() == 8  # each once


def test_a_sighting_backlog_is_worked_off_in_full_batches(archive):
    node = _deferred(archive)
    [rec] = [node.record(message(0), direction="outbound", verdict="accepted")]
    for i in range(9):
        node.record(message(0), direction="inbound", verdict="seen", place="sync:x/INBOX", ref=str(i))
    assert index_batch(node, limit=2) == (1, True)  # the record and the first 8 sightings (4 x limit): more
    assert SearchState.get_by_id("sightings").value == 8
    assert index_batch(node, limit=2) == (0, False)
    assert SearchState.get_by_id("sightings").value == 10
    assert _seen(rec.id) == [(0, "in"), (0, "out")]


def test_an_unreadable_record_does_not_stop_the_indexer(archive):
    node = _deferred(archive)
    bad, good = (node.record(message(i), direction="outbound", verdict="accepted") for i in range(2))
    node.store.path_of(bad.blob_path).unlink()
    node = _deferred(archive)  # the indexer after a restart: nothing in memory, blobs read back
    assert index_pending(node) == 1
    assert [d.record_id for d in SearchDoc.select()] == [good.id]
    assert index_pending(node) == 0  # the unreadable one is not retried on every pass
    assert backlog() == 1  # but listed to be read again later (test_unread_index.py), and counted


def test_sightings_are_noted_in_one_batch_each_pair_once(archive, caplog):
    """index_sightings: duplicates within the batch and pairs noted earlier are skipped
    without falling back to one sighting at a time (the unique index would refuse them)."""
    from gateway.archive.documents import index_sightings
    from gateway.archive.schema import ArchiveSighting

    alice = customers.create_employee("alice@acme.test", "Alice")
    rec = archive.record(message(0), direction="outbound", verdict="accepted")  # inline: (0, out) noted
    for i in range(3):
        archive.record(message(0), direction="outbound", verdict="sent", place="relay:sent", ref=str(i),
                       employee_id=alice.id, defer_index=True)
    archive.record(message(0), direction="inbound", verdict="seen", place="sync:x/INBOX", defer_index=True)
    index_sightings(list(ArchiveSighting.select()))
    assert _seen(rec.id) == [(0, "in"), (0, "out"), (alice.id, "out")]
    index_sightings(list(ArchiveSighting.select()))  # all noted already: nothing new
    assert _seen(rec.id) == [(0, "in"), (0, "out"), (alice.id, "out")]
    assert "one at a time" not in caplog.text


def test_only_an_archive_with_an_indexer_in_its_process_keeps_fresh_messages(archive, tmp_path):
    """The node's archive keeps what it prepared for its background indexer; an acceptor
    process's archive (its records are indexed by the node, from their blobs) keeps nothing."""
    from gateway.config import Config
    from gateway.smtp.stack import acceptor_archive

    node = _deferred(archive)
    assert node.keep_recent
    blob = node.prepare(message(1, "heron"))
    assert node.take_recent(blob.sha256) == message(1, "heron")
    cfg = Config()
    cfg.node.data_dir = tmp_path / "var"
    cfg.archive.key_file = archive.store.key_file
    acceptor = acceptor_archive(cfg)
    assert acceptor.defer_index and not acceptor.keep_recent and acceptor.sync_later
    blob = acceptor.prepare(message(2, "egret"))
    assert blob.data is not None and acceptor.take_recent(blob.sha256) is None


def test_the_indexer_takes_fresh_messages_from_memory_not_from_their_blobs(archive, monkeypatch):
    import gateway.archive as archive_mod

    node = _deferred(archive)
    fresh = node.record(message(1, "kingfisher"), direction="outbound", verdict="accepted")
    reads = []
    real_read = node.read
    monkeypatch.setattr(node, "read", lambda rec: reads.append(rec.id) or real_read(rec))
    assert index_pending(node) == 1 and reads == []  # the bytes prepared a moment ago were used
    assert record_ids("kingfisher") == [fresh.id]
    assert node.take_recent(fresh.sha256) is None  # handed out once
    # bounded: the oldest entries go first; a message seen by another process is read from its blob
    monkeypatch.setattr(archive_mod, "RECENT_BYTES", 2 * len(message(2, "x" * 100)))
    recs = [node.record(message(n, "x" * 100), direction="outbound", verdict="accepted") for n in (2, 3, 4)]
    assert node.take_recent(recs[0].sha256) is None and node.take_recent(recs[2].sha256) == message(4, "x" * 100)
    assert index_pending(node) == 3 and sorted(reads) == [recs[0].id, recs[2].id]
    # a message with a large attachment is kept cut to what extraction reads
    import base64
    import os

    big = (b"From: a@x.test\r\nSubject: osprey\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nosprey\r\n--b\r\nContent-Type: application/pdf; name=\"a.pdf\"\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n"
           + base64.encodebytes(os.urandom(300_000)).replace(b"\n", b"\r\n") + b"--b--\r\n")
    rec = node.record(big, direction="outbound", verdict="accepted")
    assert index_pending(node) == 1 and rec.id not in reads and record_ids("osprey") == [rec.id]


def test_short_transactions_while_records_arrive_one_for_a_backlog_left_after_the_mail_stopped(archive, monkeypatch):
    from gateway import groupcommit
    from gateway.archive.indexer import INDEX_CHUNK

    node = _deferred(archive)
    limit = INDEX_CHUNK + 4
    transactions: list[int] = []
    real = groupcommit.write_transaction

    def counted():  # noqa: ANN202
        transactions.append(SearchDoc.select().count())
        return real()

    monkeypatch.setattr(groupcommit, "write_transaction", counted)

    def add(first: int, n: int) -> None:
        for i in range(first, first + n):
            node.record(message(i, f"sandpiper arrival{i}"), direction="outbound", verdict="accepted")

    add(0, 2 * limit)
    assert index_batch(node, limit=limit) == (limit, True)
    assert len(transactions) == 2  # the first pass: mail may be flowing — chunks of INDEX_CHUNK
    transactions.clear()
    assert index_batch(node, limit=limit) == (limit, True)
    assert len(transactions) == 1  # no record since the previous pass: the backlog in one go
    add(2 * limit, limit)
    transactions.clear()
    assert index_batch(node, limit=limit) == (limit, True)
    assert len(transactions) == 2  # records arrived again: short transactions
    assert index_batch(node, limit=limit) == (0, False)
    assert len(record_ids("sandpiper")) == 3 * limit


def test_the_indexer_yields_to_a_burst_of_mail_up_to_the_lag(archive):
    """``lag``: while records keep arriving the pass is skipped until the oldest unindexed
    record is ``lag`` seconds old; once none arrive, everything waiting goes in."""
    import datetime as dt

    from gateway.archive import indexer

    node = _deferred(archive)

    def add(first: int, n: int) -> list[ArchiveRecord]:
        return [node.record(message(i, f"kittiwake burst{i}"), direction="outbound", verdict="accepted")
                for i in range(first, first + n)]

    add(0, 3)
    assert index_batch(node, lag=60) == (0, False)  # the first pass sees mail arriving: waits
    add(3, 2)
    assert index_batch(node, lag=60) == (0, False)  # more arrived: still waiting
    assert SearchDoc.select().count() == 0
    assert index_batch(node, lag=60) == (5, False)  # nothing new since the last pass: all in
    assert len(record_ids("kittiwake")) == 5

    late = add(5, 2)
    old = indexer.utcnow() - dt.timedelta(seconds=61)  # the oldest waiting one is past the lag
    ArchiveRecord.update(created_at=old).where(ArchiveRecord.id == late[0].id).execute()
    add(7, 1)
    assert index_batch(node, lag=60) == (3, False)  # arriving, but behind by more than the lag
    assert index_batch(node, lag=0) == (0, False)  # lag 0: every pass indexes (nothing left)
    assert len(record_ids("kittiwake")) == 8


def test_while_a_pass_waits_out_a_burst_the_loop_looks_again_sooner(archive, monkeypatch):
    """A pass skipped for ``lag`` marks the archive as waiting; ``index_loop`` then waits
    ``BURST_POLL`` instead of ``poll`` before the next pass, so the drain starts soon after
    the burst ends; a pass that indexes clears the mark."""
    from gateway.archive import indexer, service

    node = _deferred(archive)
    node.record(message(0, "shearwater 0"), direction="outbound", verdict="accepted")
    assert index_batch(node, lag=60) == (0, False) and indexer.waiting(node)  # mail arriving: waits
    assert index_batch(node, lag=60) == (1, False) and not indexer.waiting(node)  # quiet: drained

    node.record(message(1, "shearwater 1"), direction="outbound", verdict="accepted")
    delays: list[float] = []

    async def run() -> None:
        stopping = asyncio.Event()

        async def fake_wait(_stopping: asyncio.Event, seconds: float) -> bool:
            delays.append(seconds)
            if len(delays) == 2:
                stopping.set()
            return stopping.is_set()

        monkeypatch.setattr(service, "_wait", fake_wait)
        await index_loop(node, stopping, poll=0.5, lag=60)

    asyncio.run(run())
    assert delays == [service.BURST_POLL, 0.5]  # waited out the arrival, then drained: back to poll
    assert len(record_ids("shearwater")) == 2


def test_a_backlog_drains_in_larger_passes_once_no_record_arrives(archive, monkeypatch):
    """``index_batch`` without a limit: ``INDEX_BATCH`` records a pass while records keep
    arriving, ``DRAIN_BATCH`` once none came since the previous pass."""
    from gateway.archive import indexer

    monkeypatch.setattr(indexer, "INDEX_BATCH", 2)
    monkeypatch.setattr(indexer, "DRAIN_BATCH", 3)
    node = _deferred(archive)
    recs = [node.record(message(i, f"turnstone drain{i}"), direction="outbound", verdict="accepted")
            for i in range(7)]
    assert index_batch(node) == (2, True)  # the first pass: mail may be flowing
    assert index_batch(node) == (3, True)  # nothing new since: a larger pass
    recs.append(node.record(message(7, "turnstone drain7"), direction="outbound", verdict="accepted"))
    assert index_batch(node) == (2, True)  # a record arrived: the smaller pass again
    assert index_batch(node) == (1, False)
    assert sorted(record_ids("turnstone")) == sorted(r.id for r in recs)


def test_a_blob_read_back_is_cut_to_what_extraction_reads(archive, monkeypatch):
    """The indexer extracts the same text from a blob read back as from the message."""
    import base64
    import os

    from gateway.archive import extraction

    node = _deferred(archive)
    big = (b"From: a@x.test\r\nSubject: dunlin report\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\ndunlin body text\r\n--b\r\nContent-Type: application/pdf\r\n"
           b"Content-Disposition: attachment; filename=\"dunlin.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + base64.encodebytes(os.urandom(300_000)).replace(b"\n", b"\r\n") + b"--b--\r\n")
    rec = node.record(big, direction="outbound", verdict="accepted")
    node.take_recent(rec.sha256)  # as if the node had restarted: the indexer reads the blob
    sent: list[bytes] = []
    real = extraction.extract

    def spy(raw: bytes, headers: bool = True) -> extraction.Extracted:
        sent.append(raw)
        return real(raw, headers)

    monkeypatch.setattr(extraction, "extract", spy)
    assert index_pending(node) == 1
    assert sent == [extraction.indexable(big)] and len(sent[0]) < len(big) // 10
    assert record_ids("dunlin") == [rec.id] and record_ids("dunlin.pdf") == [rec.id]
    assert extraction.extract(sent[0]) == extraction.extract(big)


def test_a_draining_backlog_is_extracted_one_batch_ahead_and_each_record_gets_its_own_text(archive, monkeypatch):
    from gateway.archive import indexer, workers

    monkeypatch.setattr(indexer, "INDEX_BATCH", 3)
    monkeypatch.setattr(indexer, "DRAIN_BATCH", 3)
    node = _deferred(archive)
    words = ["heron", "egret", "stork", "crane", "ibis", "plover", "curlew", "avocet"]
    recs = [node.record(message(i, w), direction="outbound", verdict="accepted") for i, w in enumerate(words)]
    extracted: list[int] = []
    real = workers.extract_async
    monkeypatch.setattr(workers, "extract_async", lambda raws, headers=True: extracted.append(len(raws))
                        or real(raws, headers))
    assert index_batch(node) == (3, True) and extracted == [3]  # mail may be arriving: no look-ahead
    assert index_batch(node) == (3, True)
    assert extracted == [3, 3, 2] and node in indexer._AHEAD  # the backlog's next batch started ahead
    ArchiveRecord.update(purged_at=ArchiveRecord.created_at).where(ArchiveRecord.id == recs[7].id).execute()
    assert index_batch(node) == (1, False)  # from the look-ahead; the purged one is not indexed
    assert extracted == [3, 3, 2] and node not in indexer._AHEAD
    for rec, word in zip(recs[:7], words, strict=False):
        assert record_ids(word) == [rec.id]
    assert record_ids("avocet") == []
