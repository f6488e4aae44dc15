"""The group commit's batch forms on the real PostgreSQL fixture: relay outcomes recorded
together (queue rows, a bounce, the relay:sent sightings through Archive.chain_batch), one
lost claim among them, and the SMTP handler's shape of archive records plus queue rows in
one savepoint; buffered inserts on PostgreSQL (ids drawn from the sequences in blocks, one
multi-row INSERT a table)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.db import connect, is_postgres
from gateway.db.models import OutboundMessage, database
from gateway.groupcommit import GroupCommitter
from gateway.relay import RelayWorker
from gateway.spool import Spool, archive_ref
from tests.harness.pgdb import pg_db
from tests.integration.test_relay import MESSAGE, Clock, bounces, received, refuse_recipient, row, via_sink

pytestmark = pytest.mark.integration


db = pg_db("t_gcommit_")


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


def test_buffered_inserts_draw_ids_from_the_sequence_and_insert_in_one_go(db, monkeypatch):
    from gateway.db.inserts import PG_ID_BLOCK, buffered_inserts, flush_inserts, insert_row
    from gateway.db.models import Customer, Department
    from gateway.groupcommit import write_transaction

    Department.create(name="existing")  # id 1
    n = 3 * PG_ID_BLOCK + 5  # several blocks of ids
    statements = []
    with write_transaction(), buffered_inserts((Department, Customer)):
        rows = [insert_row(Department(name=f"b{i}")) for i in range(n)]
        ids = [r.id for r in rows]
        assert ids == sorted(ids) and len(set(ids)) == n and ids[0] == 2  # in order, from the sequence
        assert Department.select().count() == 1  # not inserted yet
        other = database.connection().cursor()  # the sequence is shared: another writer's id is its own
        other.execute("SELECT nextval(pg_get_serial_sequence('department', 'id'))")
        assert other.fetchone()[0] not in ids
        cursor = database.obj.cursor
        with monkeypatch.context() as m:
            m.setattr(database.obj, "cursor", lambda *a, **k: _Counting(cursor(*a, **k), statements))
            flush_inserts()
        assert Department.select().count() == n + 1
        customer = insert_row(Customer(name="c"))
    assert [s.split(" VALUES ")[0] for s in statements] == ['INSERT INTO "department" ("id", "name")']  # one statement
    assert {d.id: d.name for d in Department.select().where(Department.id.in_(ids))} == {
        i: f"b{k}" for k, i in enumerate(ids)}
    assert Customer.get_by_id(customer.id).name == "c"

    with pytest.raises(RuntimeError), write_transaction(), buffered_inserts():
        insert_row(Department(name="never"))
        raise RuntimeError("the block fails: nothing it buffered is inserted")
    assert Department.select().where(Department.name == "never").count() == 0
    later = Department.create(name="after")  # the unused ids of a block are gaps, not reused
    assert later.id > max(ids)


def test_a_block_draws_as_many_ids_as_the_previous_one_used_in_one_round_trip(db, monkeypatch):
    """A group commit's batches are alike: the second block of 40 rows draws its ids in one
    statement (60 at once: half as many again as the first used), where the first drew 8, 16,
    32 — and the ids still come in order."""
    from gateway.db import inserts
    from gateway.db.inserts import PG_ID_BLOCK, buffered_inserts, insert_row
    from gateway.db.models import Department
    from gateway.groupcommit import write_transaction

    monkeypatch.setattr(inserts, "_used", threading.local())
    draws: list[int] = []
    real = inserts._draw_ids
    monkeypatch.setattr(inserts, "_draw_ids", lambda model, n: (draws.append(n), real(model, n))[1])
    blocks = []
    for _ in range(3):
        with write_transaction(), buffered_inserts():
            blocks.append([insert_row(Department(name=f"d{len(blocks)}-{i}")).id for i in range(40)])
    assert draws == [PG_ID_BLOCK, 2 * PG_ID_BLOCK, 4 * PG_ID_BLOCK, 60, 60]
    flat = [i for block in blocks for i in block]
    assert flat == sorted(flat) and len(set(flat)) == 120
    assert Department.select().where(Department.name.startswith("d")).count() == 120


def test_the_archive_chain_draws_a_batchs_ids_in_one_statement_under_its_lock(db, tmp_path, monkeypatch):
    """``chain_batch`` on PostgreSQL: once the chain lock is held, the ids of every table the
    previous batch used (records, sightings) come in one statement; the rows of all tables go
    in one more.  Records, sightings and the chain are as without it (verify passes)."""
    from gateway.archive import Archive, Capture
    from gateway.archive.schema import ArchiveRecord, ArchiveSighting
    from gateway.archive.verify import verify_chain
    from gateway.db import inserts

    monkeypatch.setattr(inserts, "_used", threading.local())
    archive = Archive(tmp_path / "blobs", tmp_path / "key")

    def captures(tag: str) -> list:
        return [Capture(raw=f"Subject: {tag} {i}\r\nMessage-ID: <{tag}{i}@x>\r\n\r\nbody {tag} {i}\r\n".encode(),
                        place="smtp:submitted", direction="outbound", verdict="accepted",
                        employee_email="s@acme.test") for i in range(20)]

    def batch(tag: str) -> list[str]:
        caps = captures(tag)
        blobs = archive._durable_blobs(caps, None)
        statements: list[str] = []
        cursor = database.obj.cursor
        with monkeypatch.context() as m:
            m.setattr(database.obj, "cursor", lambda *a, **k: _Counting(cursor(*a, **k), statements))
            archive.chain_batch(caps, blobs)
        return statements

    batch("first")  # learns what a batch inserts
    statements = batch("second")
    draws = [s for s in statements if "nextval" in s]
    assert len(draws) == 1 and "archiverecord_id_seq" in draws[0] and "archivesighting_id_seq" in draws[0]
    inserts_sent = [s for s in statements if s.lstrip().startswith("INSERT")]
    assert len(inserts_sent) == 1
    assert 'INSERT INTO "archiverecord"' in inserts_sent[0] and 'INSERT INTO "archivesighting"' in inserts_sent[0]
    assert ArchiveRecord.select().count() == 40 and ArchiveSighting.select().count() == 40
    ids = [r.id for r in ArchiveRecord.select().order_by(ArchiveRecord.seq)]
    assert ids == sorted(ids)  # in chain order
    assert verify_chain() == []


class _Counting:
    """A cursor that notes each statement it runs."""

    def __init__(self, cursor, statements):
        self._cursor, self._statements = cursor, statements

    def execute(self, sql, params=None):
        self._statements.append(sql.decode() if isinstance(sql, bytes) else sql)
        return self._cursor.execute(sql, params)

    def __getattr__(self, name):
        return getattr(self._cursor, name)
