"""Pipelined batch ingest (``Archive.ingest_many(pipeline=True)``, gateway/archive/pipeline.py):
a batch's index rows written on a background thread while the caller goes on, one write in
flight, ``wait_indexed`` at the end; crash and failure leave records the background indexer
(``indexer.index_pending``) indexes.  On SQLite and on the real PostgreSQL fixture."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gateway.archive import Archive, Capture, pipeline, workers
from gateway.archive.indexer import index_pending
from gateway.archive.schema import ArchiveRecord, ArchiveSighting
from gateway.archive.search import record_ids
from gateway.archive.search_schema import SearchDoc, SearchSeen
from gateway.archive.verify import verify
from gateway.db import connect, is_postgres
from tests.harness.pgdb import database_name, fresh_database
from tests.unit.archive.conftest import message

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def db(request, tmp_path):
    if request.param == "postgres":
        postgres = request.getfixturevalue("postgres")
        with fresh_database(postgres, database_name("t_pipe_", request)) as database:
            database.url = postgres.url_for(database.database)  # for a child process (the crash test)
            yield database
        return
    url = "sqlite:///" + str(tmp_path / "pipe.db")
    database = connect(url)
    database.url = url
    yield database
    database.close()


@pytest.fixture
def archive(db, tmp_path, monkeypatch) -> Archive:
    monkeypatch.setattr(pipeline, "ON_SQLITE", True)  # the thread on SQLite too (its default: inline)
    return Archive(tmp_path / "archive", tmp_path / "archive.keys")


def batch(first: int, n: int = workers.MIN_BATCH + 2, word: str = "zebrafish") -> list[Capture]:
    """``n`` new messages (enough for the worker processes to extract them)."""
    return [Capture(raw=message(i, f"{word} 报价单 pipe{i}"), place="import:eml", ref=f"f{i}")
            for i in range(first, first + n)]


def documents(records: list) -> set[int]:
    """Which of ``records`` have their search document."""
    ids = [r.id for r in records]
    return {d.record_id for d in SearchDoc.select(SearchDoc.record_id).where(SearchDoc.record_id.in_(ids))}


class Gate:
    """Holds the first background index write until ``open``; notes when each write ends
    and when a caller starts waiting for the write in flight (IndexWriter's wait)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened, self.held, self.caller_waits = threading.Event(), threading.Event(), threading.Event()
        self.ended: list[int] = []  # batch numbers, in the order their writes ended
        real_index, real_wait = Archive.index_committed, pipeline.wait
        self.main = threading.current_thread()

        def index_committed(outcomes, extracted) -> None:
            n = len(self.ended) + 1
            if n == 1:
                self.held.set()
                assert self.opened.wait(60)
            real_index(outcomes, extracted)
            self.ended.append(n)

        def wait(futures, *args, **kwargs):  # noqa: ANN001, ANN202
            if threading.current_thread() is not self.main and not self.opened.is_set():
                self.caller_waits.set()
            return real_wait(futures, *args, **kwargs)

        monkeypatch.setattr(Archive, "index_committed", staticmethod(index_committed))
        monkeypatch.setattr(pipeline, "wait", wait)

    def open(self) -> None:
        self.opened.set()


def test_pipelined_batches_are_all_indexed_once_waited_for(archive, pool):
    out = []
    for first in (0, 100, 200, 300):
        out += archive.ingest_many(batch(first), pipeline=True)
    again = Capture(raw=message(0, "zebrafish 报价单 pipe0"), place="sync:alice/INBOX", direction="outbound")
    out += archive.ingest_many([*batch(400), again], pipeline=True)  # a known content: a sighting only
    archive.wait_indexed()
    assert workers._POOL is not None  # the extraction really went to another process
    records = [o.record for o in out if o.new_record]
    assert len(records) == 5 * (workers.MIN_BATCH + 2) == ArchiveRecord.select().count()
    assert documents(records) == {r.id for r in records}
    assert sorted(record_ids("zebrafish")) == sorted(r.id for r in records)
    assert record_ids("pipe203") == [out[2 * (workers.MIN_BATCH + 2) + 3].record.id]
    assert record_ids("报价单 pipe401") == [out[-(workers.MIN_BATCH + 2)].record.id]
    assert not out[-1].new_record and out[-1].new_sighting and out[-1].record.id == out[0].record.id
    doc = SearchDoc.get(SearchDoc.record_id == out[0].record.id)  # the later sighting noted with the batch
    assert {s.direction for s in SearchSeen.select().where(SearchSeen.docid == doc.docid)} == {"in", "out"}
    assert ArchiveSighting.select().count() == len(records) + 1
    assert verify(archive.store) == []
    assert index_pending(archive) == 0  # nothing left for the background indexer


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_batch_that_starts_with_a_known_content_stores_its_new_records_before_their_sightings(
        archive, pipelined):
    """The first capture a re-sighting, the rest new: the buffered inserts still go to the
    tables parents first (a sighting's record before the sighting), on both backends."""
    (known,) = archive.ingest_many(batch(0, 1))
    again = Capture(raw=message(0, "zebrafish 报价单 pipe0"), place="sync:alice/Sent", direction="outbound")
    out = archive.ingest_many([again, *batch(100, 3)], pipeline=pipelined)
    archive.wait_indexed()
    assert not out[0].new_record and out[0].new_sighting and out[0].record.id == known.record.id
    assert all(o.new_record for o in out[1:])
    assert ArchiveRecord.select().count() == 4 and ArchiveSighting.select().count() == 5
    assert documents([o.record for o in out[1:]]) == {o.record.id for o in out[1:]}
    assert verify(archive.store) == []


def test_a_pipelined_call_returns_before_its_index_write_and_the_next_one_waits_for_it(archive, monkeypatch):
    gate = Gate(monkeypatch)
    first = archive.ingest_many(batch(0), pipeline=True)
    assert gate.held.wait(60)  # the write is on the thread, held; the call returned
    assert all(o.new_record for o in first) and documents([o.record for o in first]) == set()
    second: list = []
    caller = threading.Thread(target=lambda: second.extend(archive.ingest_many(batch(100), pipeline=True)))
    caller.start()
    assert gate.caller_waits.wait(60)  # the second call committed its batch and waits to hand over
    assert second == [] and gate.ended == []
    gate.open()
    caller.join(60)
    assert second and gate.ended[:1] == [1]  # it returned only once the first write was over
    archive.wait_indexed()
    assert gate.ended == [1, 2]
    records = [o.record for o in first + second]
    assert documents(records) == {r.id for r in records}


def test_the_default_call_first_waits_for_a_pipelined_write_in_flight(archive, monkeypatch):
    gate = Gate(monkeypatch)
    first = archive.ingest_many(batch(0), pipeline=True)
    assert gate.held.wait(60)
    second: list = []

    def plain() -> None:
        second.extend(archive.ingest_many(batch(100)))
        second.append(documents([o.record for o in second]))  # what its caller sees on return

    caller = threading.Thread(target=plain)
    caller.start()
    assert gate.caller_waits.wait(60)
    assert second == [] and gate.ended == []
    gate.open()
    caller.join(60)
    *outcomes, seen = second
    assert gate.ended == [1, 2]  # the older batch's write first, then its own, inline
    assert seen == {o.record.id for o in outcomes}
    assert documents([o.record for o in first]) == {o.record.id for o in first}


def test_the_default_call_is_unchanged_inline_and_starts_no_thread(archive):
    before = set(threading.enumerate())
    out = archive.ingest_many(batch(0))
    assert documents([o.record for o in out]) == {o.record.id for o in out}  # indexed when it returns
    assert sorted(record_ids("zebrafish")) == sorted(o.record.id for o in out)
    assert not any(t.name.startswith("archive-index-write") for t in set(threading.enumerate()) - before)
    archive.wait_indexed()  # nothing in flight: returns at once


def test_by_default_only_postgresql_hands_the_write_to_the_thread(archive, monkeypatch):
    monkeypatch.setattr(pipeline, "ON_SQLITE", False)
    before = set(threading.enumerate())
    out = archive.ingest_many(batch(0), pipeline=True)
    threaded = any(t.name.startswith("archive-index-write") for t in set(threading.enumerate()) - before)
    assert threaded == is_postgres()
    if not is_postgres():  # SQLite: written inline, before the call returned
        assert documents([o.record for o in out]) == {o.record.id for o in out}
    archive.wait_indexed()
    assert documents([o.record for o in out]) == {o.record.id for o in out}


def test_a_failed_background_write_is_logged_and_its_records_are_indexed_later(archive, monkeypatch, caplog):
    def broken(outcomes, extracted) -> None:
        raise ConnectionError("the database went away")

    real = Archive.index_committed
    monkeypatch.setattr(Archive, "index_committed", staticmethod(broken))
    lost = archive.ingest_many(batch(0, word="heron"), pipeline=True)
    archive.wait_indexed()  # raises nothing
    assert "background index write failed" in caplog.text and "the database went away" in caplog.text
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)
    monkeypatch.setattr(Archive, "index_committed", staticmethod(real))
    kept = archive.ingest_many(batch(100), pipeline=True)  # the next writes go on
    archive.wait_indexed()
    assert documents([o.record for o in lost]) == set()
    assert documents([o.record for o in kept]) == {o.record.id for o in kept}
    assert index_pending(archive) == len(lost)  # the background indexer's pass
    assert sorted(record_ids("heron")) == sorted(o.record.id for o in lost)
    assert index_pending(archive) == 0


def test_a_kill_during_the_index_write_leaves_records_the_indexer_indexes(archive, db, tmp_path):
    """kill -9 while a batch's document transaction is open on the background thread: the
    records (committed before) stay, without documents; ``index_pending`` indexes them."""
    script = f"""
import os, sys, threading
from gateway.archive import Archive, Capture, index, pipeline
from gateway.db import connect
connect({db.url!r})
pipeline.ON_SQLITE = True
archive = Archive({str(archive.directory)!r}, {str(archive.store.key_file)!r})
real = index.index_new
def held(entries):
    real(entries)  # the rows written, the transaction still open
    say("writing")
    threading.Event().wait()
index.index_new = held
def say(line):  # one write(2) a line (atomic on a pipe): two threads' print() can interleave
    os.write(1, (line + "\\n").encode())
caps = [Capture(raw=("From: a@acme.test\\r\\nSubject: osprey %d\\r\\n\\r\\nosprey body %d\\r\\n" % (i, i)).encode(),
                place="import:eml", ref=str(i)) for i in range(5)]
out = archive.ingest_many(caps, pipeline=True)
say("committed " + " ".join(str(o.record.id) for o in out))
sys.stdin.read()
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=env, cwd=ROOT, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert {line.split(" ", 1)[0].strip() for line in lines} == {"committed", "writing"}, lines
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    recs = list(ArchiveRecord.select())
    assert len(recs) == 5 and documents(recs) == set()  # committed; the documents died with the process
    assert index_pending(archive) == 5
    assert sorted(record_ids("osprey")) == sorted(r.id for r in recs)
