"""The queue files a group-commit job writes (a bounce, an approval's notices, a held
message's original: ``gateway.spool.files_written``) follow the commit's outcome: removed
when the job or the commit is known to have stored nothing, kept when the COMMIT's outcome
is unknown (``outcome_unknown``: the rows may exist; the orphan sweep decides), and kept
by the orphan sweep when the rows do exist."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import peewee
import psycopg2
import pytest

from gateway.db.models import OutboundMessage, database
from gateway.groupcommit import GroupCommitter, commit_outcome_unknown, outcome_unknown
from gateway.spool import Spool
from tests.harness.commitfault import CommitFault

WAIT = 10.0


@pytest.fixture
def spool(db, tmp_path) -> Spool:
    return Spool(tmp_path / "spool")


@pytest.fixture
def committer():
    made = GroupCommitter(max_batch=16)
    yield made
    made.stop()


def _files(spool: Spool) -> list[str]:
    return sorted(p.name for p in spool.directory.iterdir())


def _queue(spool: Spool, queue_id: str, fail: bool = False) -> str:
    """A job's shape: a queue file and its row (a bounce, a notice); ``fail``: then it raises."""
    spool.enqueue("", ["alice@acme.test"], b"Subject: x\r\n\r\nbody\r\n", queue_id=queue_id)
    if fail:
        raise ValueError("this job fails after writing its file")
    return queue_id


def _run(committer: GroupCommitter, *jobs: tuple) -> list:
    """Submit ``jobs`` ((fn, args, many)) so that they share one batch; their outcomes."""
    gate, taken = threading.Event(), threading.Event()

    def blocker() -> None:
        taken.set()
        assert gate.wait(WAIT)

    async def main() -> list:
        first = asyncio.ensure_future(committer.submit(blocker))
        await asyncio.to_thread(taken.wait, WAIT)  # the writer is busy: the jobs queue up behind it
        rest = [asyncio.ensure_future(committer.submit(fn, *args, many=many)) for fn, args, many in jobs]
        gate.set()
        await asyncio.gather(first, return_exceptions=True)  # (its own commit may fail too)
        return await asyncio.gather(*rest, return_exceptions=True)

    return asyncio.run(main())


def _rows() -> list[str]:
    return sorted(m.queue_id for m in OutboundMessage.select())


@pytest.mark.parametrize(("exc", "unknown"), [
    (peewee.OperationalError(sqlite3.OperationalError("database is locked")), False),
    (peewee.OperationalError(sqlite3.OperationalError("database or disk is full")), False),
    (peewee.OperationalError(sqlite3.OperationalError("disk I/O error")), True),
    (peewee.OperationalError(psycopg2.OperationalError("server closed the connection unexpectedly")), True),
    (peewee.InterfaceError(psycopg2.InterfaceError("connection already closed")), True),
    (OSError(5, "Input/output error"), True),
])
def test_which_commit_failures_leave_the_outcome_unknown(exc, unknown):
    assert commit_outcome_unknown(exc) is unknown


def test_a_failing_job_loses_its_files_at_once_the_others_keep_theirs(spool, committer):
    results = _run(committer, (_queue, (spool, "Q1"), None), (_queue, (spool, "Q2", True), None),
                   (_queue, (spool, "Q3"), None))
    assert results[0] == "Q1" and results[2] == "Q3"
    assert isinstance(results[1], ValueError) and not outcome_unknown(results[1])
    assert _rows() == ["Q1", "Q3"] and _files(spool) == ["Q1.eml", "Q3.eml"]


def test_a_failed_batch_form_loses_its_files_before_the_jobs_run_again(spool, committer):
    """The batch form writes every job's file, then fails: rolled back, the files go; each
    job alone writes its own again (the same names), the bad one's goes with it."""
    calls: list[list[str]] = []

    def many(jobs: list[tuple]) -> list:
        calls.append([args[1] for args in jobs])
        return [_queue(*args) for args in jobs]

    results = _run(committer, (_queue, (spool, "Q1"), many), (_queue, (spool, "Q2", True), many),
                   (_queue, (spool, "Q3"), many))
    assert calls == [["Q1", "Q2", "Q3"]]
    assert results[0] == "Q1" and results[2] == "Q3" and isinstance(results[1], ValueError)
    assert _rows() == ["Q1", "Q3"] and _files(spool) == ["Q1.eml", "Q3.eml"]


def test_a_commit_the_database_refused_loses_the_batchs_files(spool, committer, monkeypatch):
    fault = CommitFault(monkeypatch, "refused", thread="group-commit", skip=1)  # not the blocker's batch
    results = _run(committer, (_queue, (spool, "Q1"), None), (_queue, (spool, "Q2"), None))
    assert fault.failed == 1
    assert all(isinstance(r, peewee.OperationalError) and not outcome_unknown(r) for r in results)
    assert _rows() == [] and _files(spool) == []


def test_a_commit_applied_but_answered_with_an_error_keeps_the_files_for_the_sweep(spool, committer, monkeypatch):
    """The COMMIT went through, the reply was lost: the callers hear an error of an unknown
    outcome; the rows exist, so their files stay — and the orphan sweep keeps them."""
    fault = CommitFault(monkeypatch, "applied", thread="group-commit", skip=1)  # not the blocker's batch
    results = _run(committer, (_queue, (spool, "Q1"), None), (_queue, (spool, "Q2"), None))
    assert fault.failed == 1
    assert all(isinstance(r, peewee.OperationalError) and outcome_unknown(r) for r in results)
    assert _rows() == ["Q1", "Q2"] and _files(spool) == ["Q1.eml", "Q2.eml"]
    assert spool.sweep_orphans(older_than=0) == 0
    assert _files(spool) == ["Q1.eml", "Q2.eml"]


def test_a_commit_of_unknown_outcome_that_was_not_applied_leaves_files_the_sweep_removes(
        spool, committer, monkeypatch):
    """The same answer when the COMMIT did not go through (the connection lost before it got
    there): the files stay until the orphan sweep, which finds no rows and removes them."""
    import gateway.groupcommit as gc

    real = database.obj.commit

    batches: list[int] = []

    def lost() -> None:
        if threading.current_thread().name != "group-commit" or not batches:
            batches.append(1)  # the blocker's batch commits
            return real()
        raise gc.mark_commit_failure(peewee.OperationalError(
            psycopg2.OperationalError("server closed the connection unexpectedly")))

    monkeypatch.setattr(database.obj, "commit", lost)
    results = _run(committer, (_queue, (spool, "Q1"), None),)
    assert outcome_unknown(results[0])
    monkeypatch.setattr(database.obj, "commit", real)
    assert _rows() == [] and _files(spool) == ["Q1.eml"]
    assert spool.sweep_orphans(older_than=0) == 1 and _files(spool) == []


def test_a_failed_wal_fsync_is_of_unknown_outcome_and_keeps_the_files(spool, committer, monkeypatch):
    import gateway.groupcommit as gc

    real = gc._fsync_file

    def failing(path):  # noqa: ANN001, ANN202
        if str(path).endswith("-wal"):
            raise OSError(5, "I/O error")
        return real(path)

    monkeypatch.setattr(gc, "_fsync_file", failing)
    [result] = _run(committer, (_queue, (spool, "Q1"), None))
    assert isinstance(result, OSError) and outcome_unknown(result)
    assert _rows() == ["Q1"] and _files(spool) == ["Q1.eml"]  # committed, perhaps not durable: kept
