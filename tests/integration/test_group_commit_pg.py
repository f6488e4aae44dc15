"""The group commit's batch forms on the real PostgreSQL fixture: relay outcomes recorded
together (queue rows, a bounce, the relay:sent sightings through Archive.chain_batch), one
lost claim among them, and the SMTP handler's shape of archive records plus queue rows in
one savepoint — the same code that uses buffered inserts on SQLite inserts at once here."""

from __future__ import annotations

import asyncio

import pytest

from gateway.db import connect, is_postgres
from gateway.db.models import OutboundMessage, database
from gateway.groupcommit import GroupCommitter
from gateway.relay import RelayWorker
from gateway.spool import Spool, archive_ref
from tests.integration.test_relay import MESSAGE, Clock, bounces, received, refuse_recipient, row, via_sink

pytestmark = pytest.mark.integration


@pytest.fixture
def db(postgres, request):
    name = "t_gcommit_" + request.node.name[-30:].lower()
    postgres.drop_database(name)
    yield connect(postgres.create_database(name))
    database.close()


@pytest.fixture(autouse=True)
def clean_sink(sink):
    sink.clear()
    yield


def test_relay_outcomes_of_a_batch_are_recorded_together_on_postgresql(db, sink, tmp_path):
    from gateway.archive import Archive
    from gateway.archive.schema import ArchiveSighting

    assert is_postgres()
    cfg = via_sink(sink)
    cfg.node.data_dir = tmp_path / "var"
    cfg.archive.key_file = tmp_path / "archive.keys"
    archive = Archive.from_config(cfg)
    spool = Spool(tmp_path / "spool", archive=archive)
    refuse_recipient(sink, "gone@customer.example")
    for i in range(4):  # accepted mail, queued as its archive blob (with its record, as the handler does)
        data = MESSAGE.replace(b"Subject:", f"X-N: {i}\r\nSubject:".encode())
        archive.record(data, direction="outbound", verdict="accepted", queue_id=f"QPG{i}",
                       mail_from="alice@acme.test", recipients=["buyer@customer.example"])
        blob = archive.store.put(data)
        spool.insert(f"QPG{i}", "alice@acme.test", ["buyer@customer.example"], len(data),
                     spool_path=archive_ref(blob.name, blob.sha256))
    spool.enqueue("alice@acme.test", ["gone@customer.example"], MESSAGE, queue_id="QPGBAD")
    committer = GroupCommitter(max_batch=5, linger=60)  # the five outcomes gather into one batch
    worker = RelayWorker(cfg, spool, "w1", None, now=Clock(), committer=committer)
    real_send = worker.connection.send

    def send_and_lose_one(credentials, mail_from, recipients, data):
        if b"X-N: 2" in data:  # another node took QPG2 over meanwhile: its outcome is not ours
            OutboundMessage.update(claimed_by="other/w9/x").where(OutboundMessage.queue_id == "QPG2").execute()
        return real_send(credentials, mail_from, recipients, data)

    worker.connection.send = send_and_lose_one
    try:
        assert asyncio.run(worker.run_once()) == 5
    finally:
        committer.stop()
        asyncio.run(worker.aclose())
    assert committer.batches == 1  # every outcome in one transaction, through the batch form
    assert [row(f"QPG{i}").state for i in range(4)] == ["sent", "sent", "queued", "sent"]
    assert row("QPG2").claimed_by == "other/w9/x" and row("QPG2").attempts == 0
    assert row("QPGBAD").state == "bounced" and len(bounces()) == 1
    sent = {s.queue_id for s in ArchiveSighting.select().where(ArchiveSighting.place == "relay:sent")}
    assert sent == {"QPG0", "QPG1", "QPG3"}
    assert len(received(sink, 4)) == 4  # QPG2 was delivered too (its outcome is the other node's)


def test_a_node_on_postgresql_stores_parallel_submissions_in_shared_batches(postgres, dovecot, sink, tmp_path):
    """A whole node with its database on PostgreSQL: parallel sessions' messages go through
    the SMTP handler's batch form (archive records, sightings and queue rows of several
    messages in one savepoint), are relayed, and the archive chain verifies."""
    from concurrent.futures import ThreadPoolExecutor

    from gateway.archive.schema import ArchiveRecord, ArchiveSighting
    from gateway.demo.sample_data import seed
    from tests.harness.gateway import GatewayProcess
    from tests.integration.test_submission import QUEUED, message, submit

    postgres.drop_database("t_gcommit_node")
    url = postgres.create_database("t_gcommit_node")
    gw = GatewayProcess(tmp_path / "gw", dovecot, {"database": {"url": url}})
    connect(url)
    seed()
    gw.start()
    try:
        def send(i: int) -> str:
            code, text = submit(gw, "alice@acme.test", "alice-pw",
                                message("alice@acme.test", "einkauf@hamburg-tools.de", f"PG batch {i}"))
            assert code == 250, text
            return QUEUED.search(text).group(1).decode()

        with ThreadPoolExecutor(8) as pool:
            queue_ids = set(pool.map(send, range(16)))
        assert len(queue_ids) == 16
        assert len(sink.wait_for(16, timeout=60)) == 16
    finally:
        assert gw.stop() == 0
    records = {r.queue_id for r in ArchiveRecord.select().where(ArchiveRecord.queue_id.in_(sorted(queue_ids)))}
    assert records == queue_ids
    for place in ("smtp:submitted", "relay:sent"):
        seen = {s.queue_id for s in ArchiveSighting.select().where(ArchiveSighting.place == place)}
        assert queue_ids <= seen, place
    rows = OutboundMessage.select().where(OutboundMessage.queue_id.in_(sorted(queue_ids)))
    assert {m.state for m in rows} == {"sent"}
    from gateway.cli import main

    assert main(["-c", str(gw.config_path), "archive", "verify"]) == 0
    database.close()
