import asyncio
import threading

import pytest

from gateway.db.models import Department, database
from gateway.groupcommit import CommitterStopped, GroupCommitter
from tests.harness.pgdb import fresh_database


def test_jobs_share_a_transaction_and_fail_alone(db):
    committer = GroupCommitter(max_batch=8)
    gate, taken = threading.Event(), threading.Event()

    def blocker():
        taken.set()
        gate.wait(10)  # hold the writer so the next jobs queue up into one batch
        return "first"

    def insert(name):
        Department.create(name=name)
        return name

    def broken():
        Department.create(name="rolled back")
        raise ValueError("this job fails")

    async def main():
        first = asyncio.ensure_future(committer.submit(blocker))
        await asyncio.to_thread(taken.wait, 10)  # the writer is busy with the blocker
        rest = [asyncio.ensure_future(committer.submit(insert, f"d{i}")) for i in range(5)]
        bad = asyncio.ensure_future(committer.submit(broken))
        gate.set()
        return await first, await asyncio.gather(*rest), await asyncio.gather(bad, return_exceptions=True)

    first, names, [error] = asyncio.run(main())
    committer.stop()
    assert first == "first" and names == [f"d{i}" for i in range(5)]
    assert isinstance(error, ValueError)
    assert sorted(d.name for d in Department.select()) == [f"d{i}" for i in range(5)]
    assert committer.jobs_done == 7 and committer.batches <= 3


def test_a_failed_commit_fails_every_job(db, monkeypatch):
    committer = GroupCommitter()

    def fail_fsync(directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gateway.groupcommit.fsync_dir", fail_fsync)

    def job():
        Department.create(name="x")
        committer.sync_dir(".")

    with pytest.raises(OSError, match="No space"):
        asyncio.run(committer.submit(job))
    committer.stop()
    database.connect(reuse_if_open=True)
    assert Department.select().count() == 0


def test_run_sync_from_a_plain_thread(db):
    committer = GroupCommitter()
    results = []

    def worker(i):
        results.append(committer.run_sync(lambda: Department.create(name=f"t{i}").name))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with pytest.raises(ValueError):
        committer.run_sync(lambda: (_ for _ in ()).throw(ValueError("boom")))
    committer.stop()
    assert sorted(results) == [f"t{i}" for i in range(6)]
    assert Department.select().count() == 6


def test_archive_chain_advances_in_memory_per_batch_and_follows_rollbacks(db, tmp_path):
    """One batch: the chain head is written once; a job that appended to the chain and then
    failed leaves no gap, the next job links to the last row that stayed."""
    committer = chain_batch_checks(tmp_path)
    assert committer._wal is not None  # SQLite WAL: fsynced by the committer after each commit


def test_the_pipeline_and_the_chain_batch_on_postgresql_too(postgres, tmp_path):
    """The same on PostgreSQL, where the commit itself is durable (no WAL file to fsync)."""
    with fresh_database(postgres, "group_commit"):
        committer = chain_batch_checks(tmp_path)
        assert committer._wal is None


def chain_batch_checks(tmp_path) -> GroupCommitter:
    from gateway.archive import Archive, chain
    from gateway.archive.schema import ArchiveRecord, ArchiveSighting
    from gateway.archive.verify import verify_chain

    archive = Archive(tmp_path / "archive", tmp_path / "archive.keys")
    committer = GroupCommitter(max_batch=8)
    gate, taken = threading.Event(), threading.Event()

    def raw(n):
        return f"From: a@acme.test\r\nTo: b{n}@example.com\r\nSubject: s{n}\r\n\r\nbody {n}\r\n".encode()

    def blocker():
        taken.set()
        gate.wait(10)

    def record(n):
        return archive.record(raw(n), direction="outbound", verdict="accepted", queue_id=f"Q{n}").seq

    def record_then_fail():
        archive.record(raw(99), direction="outbound", verdict="accepted")
        raise ValueError("after the append")

    async def main():
        first = asyncio.ensure_future(committer.submit(blocker))
        await asyncio.to_thread(taken.wait, 10)
        jobs = [committer.submit(record, 1), committer.submit(record_then_fail), committer.submit(record, 2)]
        futures = [asyncio.ensure_future(j) for j in jobs]
        gate.set()
        await first
        return await asyncio.gather(*futures, return_exceptions=True)

    one, error, two = asyncio.run(main())
    committer.stop()
    database.connect(reuse_if_open=True)
    assert isinstance(error, ValueError)
    assert (one, two) == (1, 3)  # record 1, its sighting 2, record 3 (the failed job's rows are gone)
    assert ArchiveRecord.select().count() == 2 and ArchiveSighting.select().count() == 2
    assert chain.head()[0] == 4
    assert verify_chain() == []
    return committer


def test_job_directories_are_fsynced_once_per_batch_outside_the_write_lock(db, tmp_path, monkeypatch):
    """submit(dirs=): each directory of the batch is fsynced once, before the batch takes the
    database write lock (an fsync under the lock made the relay process and the indexer wait);
    a failing fsync fails the whole batch and no row is stored."""
    import gateway.groupcommit as gc

    dirs = [tmp_path / f"d{i}" for i in range(3)]
    for d in dirs:
        d.mkdir()
    calls: list[tuple] = []
    real = gc.fsync_dir

    def spy(directory):
        calls.append((directory, database.in_transaction()))
        real(directory)

    monkeypatch.setattr(gc, "fsync_dir", spy)
    committer = GroupCommitter(max_batch=8)
    gate, taken = threading.Event(), threading.Event()

    def blocker():
        taken.set()
        gate.wait(10)

    def insert(name):
        Department.create(name=name)

    async def main():
        first = asyncio.ensure_future(committer.submit(blocker))
        await asyncio.to_thread(taken.wait, 10)
        jobs = [asyncio.ensure_future(committer.submit(insert, f"d{i}", dirs=[dirs[i % 3], dirs[0]]))
                for i in range(6)]
        gate.set()
        await first
        await asyncio.gather(*jobs)

    asyncio.run(main())
    assert sorted(str(d) for d, _ in calls) == sorted(str(d) for d in dirs)  # once each
    assert not any(in_txn for _, in_txn in calls)

    def failing(directory):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(gc, "fsync_dir", failing)

    async def doomed():
        return await asyncio.gather(committer.submit(insert, "never", dirs=[dirs[1]]), return_exceptions=True)

    [error] = asyncio.run(doomed())
    committer.stop()
    assert isinstance(error, OSError)
    assert Department.select().where(Department.name == "never").count() == 0


def test_linger_gathers_posted_jobs_into_one_batch_and_stop_ends_it(db):
    """linger: the first job waits for more (up to max_batch) instead of committing alone;
    a stop during the wait commits what was gathered."""
    committer = GroupCommitter(max_batch=5, linger=60.0)
    done: list[tuple] = []
    all_done = threading.Event()

    def on_done(result, error):
        done.append((result, error))
        if len(done) == 5:
            all_done.set()

    for i in range(5):  # the fifth fills the batch: no 60 s wait
        committer.post(lambda i=i: Department.create(name=f"l{i}").name, on_done=on_done)
    assert all_done.wait(30)
    assert sorted(done) == [(f"l{i}", None) for i in range(5)] and committer.batches == 1

    results = []
    committer.post(lambda: Department.create(name="last").name, on_done=lambda r, e: results.append((r, e)))
    committer.stop()  # ends the linger of the lone job: it is committed, not lost
    assert results == [("last", None)] and committer.batches == 2
    assert Department.select().count() == 6


def _commit_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("group-commit")]


def test_a_job_after_stop_raises_and_starts_no_threads(db):
    """A stopped committer stays stopped: a job handed in later — by any of the four ways in —
    raises CommitterStopped and is not run, instead of starting threads nobody stops."""
    committer = GroupCommitter()
    before = set(_commit_threads())
    assert committer.run_sync(lambda: Department.create(name="before").name) == "before"
    assert len(set(_commit_threads()) - before) == 3  # the pipeline's threads, started by the first job
    committer.stop()
    assert set(_commit_threads()) <= before  # ended by the stop

    ran: list[str] = []

    def job(name):
        ran.append(name)
        Department.create(name=name)

    with pytest.raises(CommitterStopped, match="group commit stopped"):
        committer.post(job, "posted", on_done=lambda result, error: ran.append("answered"))
    with pytest.raises(CommitterStopped):
        committer.run_sync(job, "synced")

    async def from_the_loop() -> None:
        with pytest.raises(CommitterStopped):
            committer.enqueue(job, "enqueued")
        with pytest.raises(CommitterStopped):
            await committer.submit(job, "submitted")

    asyncio.run(from_the_loop())
    assert isinstance(CommitterStopped(), RuntimeError)
    assert ran == [] and committer._threads == [] and set(_commit_threads()) <= before
    database.connect(reuse_if_open=True)
    assert [d.name for d in Department.select()] == ["before"]
    committer.stop()  # a second stop is harmless

    never_started = GroupCommitter()
    never_started.stop()  # a node stopped before any mail: later jobs fail all the same
    with pytest.raises(CommitterStopped):
        never_started.post(job, "late", on_done=lambda result, error: None)
    assert never_started._threads == [] and set(_commit_threads()) <= before


def test_a_failed_wal_fsync_is_answered_as_a_failure(db, monkeypatch):
    """The commit happened but may not be durable: the caller hears an error, never success
    (an SMTP client then gets 451 and sends again)."""
    import gateway.groupcommit as gc

    real = gc._fsync_file

    def failing(path):
        if str(path).endswith("-wal"):
            raise OSError(5, "I/O error")
        real(path)

    monkeypatch.setattr(gc, "_fsync_file", failing)
    committer = GroupCommitter()
    with pytest.raises(OSError, match="I/O error"):
        asyncio.run(committer.submit(lambda: Department.create(name="maybe").name))
    committer.stop()
    assert committer._wal is not None and committer._wal.name.endswith("-wal")


def test_jobs_with_a_batch_form_run_together_and_fall_back_one_by_one(db):
    committer = GroupCommitter(max_batch=16)
    gate, taken = threading.Event(), threading.Event()
    calls: list[list[str]] = []

    def blocker():
        taken.set()
        gate.wait(10)

    def insert(name):
        if name == "bad":
            raise ValueError("bad job")
        Department.create(name=name)
        return name

    def insert_many(jobs):
        calls.append([name for (name,) in jobs])
        return [insert(name) for (name,) in jobs]

    async def main(names):
        first = asyncio.ensure_future(committer.submit(blocker))
        await asyncio.to_thread(taken.wait, 10)  # the next jobs queue up into one batch
        rest = [asyncio.ensure_future(committer.submit(insert, n, many=insert_many)) for n in names]
        gate.set()
        await first
        return await asyncio.gather(*rest, return_exceptions=True)

    assert asyncio.run(main(["a", "b", "c"])) == ["a", "b", "c"]
    assert calls == [["a", "b", "c"]]  # one call for the three
    gate.clear()
    taken.clear()
    results = asyncio.run(main(["d", "bad", "e"]))
    committer.stop()
    # The batch form failed (and rolled back "d"); each job then ran alone: only "bad" failed.
    assert results[0] == "d" and results[2] == "e" and isinstance(results[1], ValueError)
    assert calls[1] == ["d", "bad", "e"]
    assert sorted(d.name for d in Department.select()) == ["a", "b", "c", "d", "e"]


def test_buffered_inserts_count_ids_and_insert_in_one_go(db):
    from gateway.db.inserts import buffered_inserts, flush_inserts, insert_row
    from gateway.db.models import Customer
    from gateway.groupcommit import write_transaction

    Department.create(name="existing")
    with write_transaction(), buffered_inserts():
        database.execute_sql("UPDATE department SET name = name")  # the write lock, as a caller holds it
        rows = [insert_row(Department(name=f"b{i}")) for i in range(3)]
        assert [r.id for r in rows] == [2, 3, 4]  # counted on from the largest id
        assert Department.select().count() == 1  # not inserted yet
        flush_inserts()
        assert Department.select().count() == 4
        later = insert_row(Department(name="after flush"))
        customer = insert_row(Customer(name="c"))
    assert later.id == 5 and customer.id == 1
    assert {d.id: d.name for d in Department.select()} == {1: "existing", 2: "b0", 3: "b1", 4: "b2", 5: "after flush"}
    assert Customer.get_by_id(1).name == "c"

    with pytest.raises(RuntimeError), write_transaction(), buffered_inserts():
        database.execute_sql("UPDATE department SET name = name")
        insert_row(Department(name="never"))
        raise RuntimeError("the block fails: nothing it buffered is inserted")
    assert Department.select().count() == 5


def test_buffered_inserts_read_the_largest_ids_of_the_named_tables_at_once(db):
    from gateway.db.inserts import buffered_inserts, insert_row
    from gateway.db.models import Customer
    from gateway.groupcommit import write_transaction

    Department.create(name="existing")
    for name in ("c1", "c2"):
        Customer.create(name=name)
    statements: list[str] = []
    with write_transaction(), buffered_inserts((Department, Customer)):
        database.execute_sql("UPDATE department SET name = name")
        database.connection().set_trace_callback(statements.append)
        try:
            d = insert_row(Department(name="d"))
            c = insert_row(Customer(name="c3"))
            d2 = insert_row(Department(name="d2"))
        finally:
            database.connection().set_trace_callback(None)
    assert (d.id, c.id, d2.id) == (2, 3, 3)
    reads = [s for s in statements if s.startswith("SELECT")]
    assert len(reads) == 1 and "department" in reads[0] and "customer" in reads[0]
    assert Customer.get_by_id(3).name == "c3" and Department.get_by_id(3).name == "d2"


def test_the_writer_handoff_lock_excludes_other_processes(tmp_path):
    import subprocess
    import sys

    from gateway.db.writerlock import WriterLock

    path = tmp_path / "db-writer.lock"
    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    print('busy')\n"
             "else:\n    print('free')")

    def other_process() -> str:
        return subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()

    lock = WriterLock(path)
    with lock.held():
        assert other_process() == "busy"
    assert other_process() == "free"
    with lock.held():  # taken again after a release
        assert other_process() == "busy"
