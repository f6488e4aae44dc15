"""The node's stop: its tasks waited for together, within one grace period; the producers
(the relay workers above all) before the group committer they record through; a relay
outcome later than the committer's stop given up, not committed by threads started anew."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from gateway.config import Config
from gateway.db.models import OutboundMessage, database
from gateway.groupcommit import CommitterStopped, GroupCommitter
from gateway.relay import RelayWorker
from gateway.service import Node, _finish_tasks
from gateway.smarthost import Reply

MESSAGE = b"From: alice@acme.test\r\nTo: buyer@customer.example\r\nSubject: s\r\n\r\nbody\r\n"


def test_tasks_end_together_and_stuck_ones_are_cancelled_at_once_by_name(caplog) -> None:
    async def scenario() -> tuple[list[str], list[bool], list[asyncio.Task]]:
        stopping = asyncio.Event()
        ended: list[str] = []
        other_already_cancelled: list[bool] = []
        tasks: list[asyncio.Task] = []

        async def ends_after_stop(name: str) -> None:
            await stopping.wait()
            for _ in range(3):  # some work to finish after the stop, as a real task has
                await asyncio.sleep(0)
            ended.append(name)

        async def stuck(other: int) -> None:
            try:
                await asyncio.Event().wait()  # ignores the stop
            except asyncio.CancelledError:
                # Waited for together, both stuck tasks are cancelled in one go; one after the
                # other, the second would still be waiting out a grace period of its own.
                other_already_cancelled.append(tasks[other].cancelling() > 0 or tasks[other].done())
                raise

        async def fails() -> None:
            await stopping.wait()
            raise RuntimeError("boom while stopping")

        loop = asyncio.get_running_loop()
        tasks += [loop.create_task(ends_after_stop(f"t{i}"), name=f"t{i}") for i in range(3)]
        tasks += [loop.create_task(stuck(4), name="stuck-a"), loop.create_task(stuck(3), name="stuck-b"),
                  loop.create_task(fails(), name="fails")]
        stopping.set()
        await _finish_tasks(tasks, grace=0.5)
        return ended, other_already_cancelled, tasks

    with caplog.at_level(logging.WARNING, logger="mailgate"):
        ended, other_already_cancelled, tasks = asyncio.run(scenario())
    assert sorted(ended) == ["t0", "t1", "t2"]
    assert tasks[3].cancelled() and tasks[4].cancelled()
    assert other_already_cancelled == [True, True]
    messages = [r.getMessage() for r in caplog.records]
    assert any("task stuck-a did not end within 0.5 s" in m for m in messages), messages
    assert any("task fails failed while stopping" in m for m in messages), messages


def commit_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("group-commit")}


@pytest.fixture
def node(db, tmp_path):
    cfg = Config()
    cfg.node.data_dir = tmp_path / "var"
    cfg.company.domains = ["acme.test"]
    cfg.relay.poll_interval = 3600  # the worker looks again only when woken (or stopping)
    node = Node(cfg)
    node.archive.configure(cfg)  # as Node.start does: the relayed copy is archived
    return node


def delivering(worker: RelayWorker) -> tuple[threading.Event, threading.Event]:
    """The upstream for ``worker``: signals (the first event) that a delivery is under way,
    answers 250 once the test sets the second."""
    sending, answer = threading.Event(), threading.Event()

    def send(credentials, mail_from, recipients, data):  # noqa: ANN001, ANN202 - SmarthostConnection.send
        sending.set()
        assert answer.wait(30)
        return {rcpt: Reply(250, "2.0.0 queued as X1") for rcpt in recipients}

    worker.connection.send = send
    return sending, answer


def test_the_relay_records_its_last_outcome_before_the_group_commit_stops(node, caplog):
    """A relay worker is delivering when the node stops; the upstream's 250 comes after the stop
    began.  The outcome is committed through the node's group committer before that stops, and
    no group-commit thread is left running afterwards."""
    queued = node.spool.enqueue("alice@acme.test", ["buyer@customer.example"], MESSAGE, queue_id="QSTOP1")
    worker = RelayWorker(node.cfg, node.spool, "n1-relay0", None, committer=node.committer)
    sending, answer = delivering(worker)
    state_at_commit_stop: list[str] = []
    real_stop = node.committer.stop

    def committer_stop() -> None:
        state_at_commit_stop.append(OutboundMessage.get_by_id(queued.id).state)
        database.close()  # this (executor) thread's connection
        real_stop()

    node.committer.stop = committer_stop
    before = commit_threads()

    async def scenario() -> None:
        node.workers = [worker]
        node.tasks.append(asyncio.create_task(worker.run(node.stopping), name=worker.name))
        assert await asyncio.to_thread(sending.wait, 30)  # delivering when the stop comes
        stop = asyncio.create_task(node.stop())
        await node.stopping.wait()  # the stop has begun ...
        answer.set()  # ... when the upstream answers: the outcome is recorded after that
        await stop

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    assert state_at_commit_stop == ["sent"]  # committed while the committer still ran
    database.connect(reuse_if_open=True)
    done = OutboundMessage.get_by_id(queued.id)
    assert (done.state, done.claimed_by) == ("sent", None)
    assert not node.spool.path_for("QSTOP1").exists()
    assert commit_threads() <= before  # the committer's threads ended, none started again
    with pytest.raises(CommitterStopped):
        node.committer.post(lambda: None, on_done=lambda result, error: None)
    assert commit_threads() <= before
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    messages = [r.getMessage() for r in caplog.records]
    [committer_line] = [i for i, m in enumerate(messages) if m.startswith("group commit: 1 jobs in 1 batches")]
    assert messages.index(f"relay worker {worker.owner} stopped") < committer_line
    assert committer_line < messages.index(f"mailgate stopped: node={node.cfg.node.name}")


def test_an_outcome_after_the_group_commit_stopped_is_given_up_and_keeps_its_claim(node, caplog):
    """A worker still delivering after the committer stopped (its task outlived the node's grace):
    its outcome is not committed — no thread started for it — but given up at once, the
    claim kept, so the message goes out again once the claim expires (at least once); the
    worker's close does not wait for it."""
    committer = GroupCommitter()
    committer.stop()
    queued = node.spool.enqueue("alice@acme.test", ["buyer@customer.example"], MESSAGE, queue_id="QLATE1")
    worker = RelayWorker(node.cfg, node.spool, "n1-relay0", None, committer=committer)
    sending, answer = delivering(worker)
    answer.set()
    before = commit_threads()

    async def scenario() -> None:
        try:
            assert await worker.run_once() == 1
        finally:
            await worker.aclose()

    with caplog.at_level(logging.INFO, logger="gateway.relay"):
        asyncio.run(scenario())
    assert sending.is_set() and commit_threads() <= before
    waiting = OutboundMessage.get_by_id(queued.id)
    assert (waiting.state, waiting.attempts, waiting.claimed_by) == ("queued", 0, worker.owner)
    assert node.spool.path_for("QLATE1").exists()
    [error] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.startswith("QLATE1: could not record the relay outcome after 1 tries")
    assert "CommitterStopped; the group commit has stopped" in error and "may be delivered again" in error
    assert len(worker.unrecorded) == 0 and worker.drain(0.0)  # no slot still held
