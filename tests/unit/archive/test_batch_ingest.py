"""Batch ingest (``Archive.ingest_many``): text extracted in worker processes, documents
written after the chain commit, inbound senders' last contact updated once per batch."""

from __future__ import annotations

import datetime as dt

import pytest

from gateway.archive import Capture, workers
from gateway.archive.schema import ArchiveRecord, ArchiveSighting
from gateway.archive.search import record_ids
from gateway.archive.search_schema import SearchDoc, SearchSeen
from gateway.archive.verify import verify
from tests.unit.archive.conftest import message


def test_a_batch_is_chained_and_indexed_through_the_worker_pool(archive, pool):
    caps = [Capture(raw=message(i, f"zebrafish 报价单 batch{i}"), place="import:eml", ref=f"f{i}")
            for i in range(workers.MIN_BATCH + 4)]
    caps.append(Capture(raw=message(0, "zebrafish 报价单 batch0"), place="sync:alice/INBOX",
                        direction="outbound"))  # the same content again: a sighting only
    out = archive.ingest_many(caps)
    assert workers._POOL is not None  # the extraction really went to another process
    assert [o.new_record for o in out] == [True] * (len(caps) - 1) + [False]
    assert out[-1].record.id == out[0].record.id and out[-1].new_sighting
    assert ArchiveRecord.select().count() == len(caps) - 1
    assert ArchiveSighting.select().count() == len(caps)
    assert SearchDoc.select().count() == len(caps) - 1
    assert sorted(record_ids("zebrafish")) == sorted(o.record.id for o in out[:-1])
    assert record_ids("batch3") == [out[3].record.id]
    assert record_ids("报价单 batch5") == [out[5].record.id]
    doc = SearchDoc.get(SearchDoc.record_id == out[0].record.id)
    assert {s.direction for s in SearchSeen.select().where(SearchSeen.docid == doc.docid)} == {"in", "out"}
    # again: idempotent by ref, nothing indexed twice
    again = archive.ingest_many(caps[:-1])
    assert not any(o.new_record or o.new_sighting for o in again)
    assert SearchDoc.select().count() == len(caps) - 1
    assert verify(archive.store) == []


def test_a_dead_worker_pool_falls_back_to_inline_extraction(pool, monkeypatch):
    pending = workers.Pending([message(i) for i in range(workers.MIN_BATCH)])
    monkeypatch.setattr(pending, "_futures", [(0, _Failed())])
    got = pending.result()
    assert [ex.subject for ex, _ in got] == [f"Offer {i}" for i in range(workers.MIN_BATCH)]


class _Failed:
    def result(self):
        raise workers.BrokenProcessPool("a worker died")


def test_inbound_batch_moves_each_customers_last_contact_to_its_latest_message(archive):
    from gateway.customers import create_customer
    from gateway.db.models import Customer

    hamburg = create_customer("Hamburg GmbH", contacts=["hans@hamburg.de"], domains=["hamburg.de"])
    lagos = create_customer("Lagos Imports", contacts=["buyer@lagos-imports.ng"])
    private = create_customer("Private buyer", contacts=["someone@gmail.com"])
    t0 = dt.datetime(2026, 5, 1, 12, 0)

    def inbound(sender: str, n: int, at: dt.datetime) -> Capture:
        raw = f"From: {sender}\r\nTo: alice@acme.test\r\nSubject: rfq {n}\r\n\r\nhi\r\n".encode()
        return Capture(raw=raw, place="import:eml", direction="inbound", seen_at=at)

    archive.ingest_many([
        inbound("hans@hamburg.de", 1, t0),
        inbound("Other <other@Hamburg.de>", 2, t0 + dt.timedelta(days=3)),  # the company domain, later
        inbound("hans@hamburg.de", 3, t0 + dt.timedelta(days=1)),
        inbound("buyer@lagos-imports.ng", 4, t0 - dt.timedelta(days=9)),
        inbound("x@gmail.com", 5, t0),  # a public mail domain: never by domain
    ])
    assert Customer.get_by_id(hamburg.id).last_contact_at == t0 + dt.timedelta(days=3)
    assert Customer.get_by_id(lagos.id).last_contact_at == t0 - dt.timedelta(days=9)
    assert Customer.get_by_id(private.id).last_contact_at is None
    archive.ingest_many([inbound("hans@hamburg.de", 6, t0 - dt.timedelta(days=30))])  # only moves forward
    assert Customer.get_by_id(hamburg.id).last_contact_at == t0 + dt.timedelta(days=3)


def test_workers_exit_when_the_process_that_started_them_dies(tmp_path):
    """A node killed with -9 must not leave extraction workers behind."""
    import os
    import signal
    import subprocess
    import sys

    from tests.harness import wait_until

    script = (
        "import os, sys\n"
        "from gateway.archive import workers\n"
        "pending = workers.extract_async([b'Subject: x\\r\\n\\r\\nbody'] * workers.MIN_BATCH)\n"
        "pending.result()\n"
        "print(' '.join(str(p) for p in workers._POOL._processes), flush=True)\n"
        "sys.stdin.read()\n"
    )
    env = {**os.environ, "MAILGATE_ARCHIVE_WORKERS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=env, cwd=os.getcwd(), text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert pids and all(_alive(p) for p in pids)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_until(lambda: not any(_alive(p) for p in pids), timeout=15)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_verify_catches_tampering_with_a_batch(archive, pool):
    import os

    out = archive.ingest_many([Capture(raw=message(i, f"batch body {i}"), place="import:eml")
                               for i in range(workers.MIN_BATCH + 2)])
    assert verify(archive.store) == []
    recs = [o.record for o in out]
    blob = archive.blob_path(recs[0])
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x55
    blob.write_bytes(bytes(data))
    os.unlink(archive.blob_path(recs[1]))
    ArchiveRecord.update(subject="changed").where(ArchiveRecord.id == recs[2].id).execute()
    ArchiveSighting.delete().where(ArchiveSighting.record == recs[3].id).execute()
    problems = verify(archive.store)
    assert any(f"record {recs[0].id}" in p and "decrypt" in p for p in problems), problems
    assert any(f"record {recs[1].id}" in p and "missing" in p for p in problems), problems
    assert any("altered" in p for p in problems), problems
    assert any("missing (deleted)" in p for p in problems), problems


def test_batch_ingest_takes_record_headers_from_the_extraction_not_a_second_parse(archive, monkeypatch):
    import gateway.archive as archive_mod

    parsed = []
    real = archive_mod.headers_of
    monkeypatch.setattr(archive_mod, "headers_of", lambda raw: parsed.append(raw) or real(raw))
    raws = [message(n, "heron") for n in range(10)]
    outs = archive.ingest_many([Capture(raw=r, place="import:eml") for r in raws])
    assert parsed == []  # the extraction's parse gave them
    assert [o.record.subject for o in outs] == [f"Offer {n}" for n in range(10)]
    assert [o.record.message_id for o in outs] == [f"<m{n}@acme.test>" for n in range(10)]
    assert outs[3].record.mail_from == "alice@acme.test" and outs[3].record.recipients == '["buyer3@example.com"]'


def test_start_spawns_every_worker_before_the_first_batch(monkeypatch):
    monkeypatch.setenv("MAILGATE_ARCHIVE_WORKERS", "2")
    workers.shutdown()
    try:
        workers.start()
        assert workers._POOL is not None and len(workers._POOL._processes) == 2
        assert all(p.is_alive() for p in workers._POOL._processes.values())
    finally:
        workers.shutdown()


def test_short_grams_from_the_workers_are_those_computed_inline(archive, pool):
    """The workers hand the short grams over as one text; the index holds the same tokens."""
    from gateway.archive import extraction, terms

    raw = message(1, "报价单 PI 样 for CE")
    ex, grams = workers.extract_one(raw)
    assert grams.split(" ") == terms.short_grams(extraction.all_text(ex))
    caps = [Capture(raw=message(i, f"报价单 PI 样 godwit{i}"), place="import:eml") for i in range(workers.MIN_BATCH)]
    out = archive.ingest_many(caps)
    assert workers._POOL is not None
    ids = sorted(o.record.id for o in out)
    assert sorted(record_ids("报价")) == ids and sorted(record_ids("样")) == ids and sorted(record_ids("PI")) == ids
    assert record_ids("godwit3") == [out[3].record.id]


def test_a_blob_that_cannot_be_written_stops_the_batch_before_any_row(archive, monkeypatch):
    real = archive.store.write
    calls: list[int] = []

    def write(blob, sync_dir=True):  # noqa: ANN001, ANN202
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(blob, sync_dir)

    monkeypatch.setattr(archive.store, "write", write)
    caps = [Capture(raw=message(i, f"whimbrel {i}"), place="import:eml") for i in range(6)]
    with pytest.raises(OSError, match="disk full"):
        archive.ingest_many(caps)
    assert ArchiveRecord.select().count() == 0 and ArchiveSighting.select().count() == 0
    monkeypatch.setattr(archive.store, "write", real)
    assert len(archive.ingest_many(caps)) == 6 and verify(archive.store) == []


def test_remembered_address_parsing_is_the_email_packages():
    import email.utils

    from gateway.archive.headertext import getaddresses

    for values in (("Ann <ann@x.test>, bob@y.test",), ('"Lee, K" <k@z.test>', "=?utf-8?b?5p2O?= <li@c.test>"), ()):
        assert list(getaddresses(values)) == email.utils.getaddresses(list(values))
        assert getaddresses(values) is getaddresses(tuple(values))  # remembered


def test_workers_run_at_a_lower_priority_than_their_parent(pool):
    import os

    pending = workers._pool().submit(os.nice, 0)  # a worker's own niceness
    assert pending.result() == min(19, os.nice(0) + workers.WORKER_NICE)
