"""The client going away at the end of DATA (gateway/smtp/handler.py): aiosmtpd cancels the
handler task while it waits for the group commit.  The commit job is queued already and runs
anyway, so the handler must not remove anything of the message before the job's outcome is
known: committed, the message is fully stored (queue row, spool file or archive blob, archive
record: `mailgate archive verify` clean) and counted; failed, nothing of it is left.

The commit is held back in the committer's thread (a threading.Event inside the batch form
``_commit_many``) while the handler task is cancelled, then released."""

from __future__ import annotations

import asyncio
import logging
import threading
from types import SimpleNamespace

import pytest
from aiosmtpd.smtp import Envelope

from gateway import metrics
from gateway.archive.schema import ArchiveRecord
from gateway.archive.verify import verify
from gateway.db.models import OutboundMessage
from gateway.policy import HOLD, Verdict
from gateway.spool import parse_archive_ref
from tests.unit.test_submission_errors import make_world

RAW = (b"From: alice@acme.test\r\nTo: buyer@example.com\r\nSubject: Quote Q-4711\r\n"
       b"\r\nPrices inside.\r\n")
QUEUE_ID = "0000000000AABBCCD"
WAIT = 10.0  # seconds an event may take before the test fails (never slept)


class Rule:
    """Accepts, holds or refuses every message; ``gate`` (if set) blocks the decision."""

    name = "test-rule"
    priority = 50
    mode = "enforce"

    def __init__(self) -> None:
        self.action = "accept"
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def evaluate(self, ctx, directory):  # noqa: ANN001, ANN201 - the policy's Rule protocol
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT)
        if self.action == "hold":
            return Verdict(action=HOLD, reason="check", approvers=["boss@acme.test"], rule=self.name)
        if self.action == "refuse":
            return Verdict.reject(self.name, "not to them", 550, "5.7.1")
        return None


class Held:
    """``_commit_many`` that waits for ``release`` in the committer's thread, then commits —
    or raises, when ``fail`` is set."""

    def __init__(self, real) -> None:  # noqa: ANN001
        self.real = real
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail = False

    def __call__(self, jobs: list) -> list:
        self.entered.set()
        assert self.release.wait(WAIT)
        if self.fail:
            raise OSError(5, "Input/output error")
        return self.real(jobs)


@pytest.fixture
def world(db, tmp_path, monkeypatch):
    built = make_world(tmp_path, monkeypatch, Rule(), queue_id=QUEUE_ID, password="pw")
    built.held = Held(built.handler._commit_many)
    monkeypatch.setattr(built.handler, "_commit_many", built.held)
    yield built
    built.held.release.set()
    built.committer.stop()


def envelope() -> Envelope:
    env = Envelope()
    env.mail_from = "alice@acme.test"
    env.rcpt_tos = ["buyer@example.com"]
    env.original_content = RAW
    return env


def settled_when_done(world, monkeypatch, name: str) -> asyncio.Event:
    """An event set once the handler's done-callback ``name`` has run (call from the loop)."""
    settled = asyncio.Event()
    real = getattr(world.handler, name)

    def wrapper(*args):  # noqa: ANN002, ANN202
        try:
            real(*args)
        finally:
            settled.set()

    monkeypatch.setattr(world.handler, name, wrapper)
    return settled


async def cancel_while(world, entered: threading.Event) -> None:
    """Start DATA, cancel the handler once ``entered`` is set (as aiosmtpd does when the
    connection is lost), and see the cancellation go through (no reply is made up)."""
    task = asyncio.create_task(world.handler.handle_DATA(SimpleNamespace(is_tls=True), world.session, envelope()))
    assert await asyncio.to_thread(entered.wait, WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def count(verdict: str) -> float:
    return metrics.REGISTRY.get_sample_value("mailgate_smtp_messages_total", {"verdict": verdict}) or 0.0


def spool_files(world) -> list[str]:
    return sorted(p.name for p in world.spool.directory.glob("*"))


@pytest.mark.parametrize("case", ["accepted", "accepted-shared-spool", "held"])
def test_cancelled_during_the_commit_that_then_succeeds_keeps_the_whole_message(world, monkeypatch, caplog, case):
    if case == "held":
        world.rule.action = "hold"
    world.cfg.node.shared_spool = case == "accepted-shared-spool"
    has_spool_file = case != "accepted"  # accepted mail is queued from its archive blob
    verdict = "held" if case == "held" else "accepted"
    before = count(verdict)

    async def run() -> None:
        settled = settled_when_done(world, monkeypatch, "_commit_abandoned")
        await cancel_while(world, world.held.entered)
        # The job is still pending: the message's files must all be there.
        assert spool_files(world) == ([f"{QUEUE_ID}.eml"] if has_spool_file else [])
        assert OutboundMessage.select().count() == 0
        world.held.release.set()
        await asyncio.wait_for(settled.wait(), WAIT)

    with caplog.at_level(logging.INFO, logger="mailgate.smtp"):
        asyncio.run(run())
    [row] = OutboundMessage.select()
    assert row.queue_id == QUEUE_ID and row.state == ("held" if case == "held" else "queued")
    assert world.spool.read(row).endswith(b"Prices inside.\r\n")  # what the relay (or approval) reads
    if has_spool_file:
        assert spool_files(world) == [f"{QUEUE_ID}.eml"] and row.spool_path == f"{QUEUE_ID}.eml"
    else:
        assert spool_files(world) == [] and parse_archive_ref(row.spool_path) is not None
    [record] = ArchiveRecord.select()
    assert record.queue_id == QUEUE_ID and record.verdict == verdict
    assert world.archive.store.path_of(record.blob_path).is_file()
    assert verify(world.archive.store) == []  # chain, blobs: what `mailgate archive verify` checks
    # Counted and logged as a stored message; the relay woken for accepted mail.
    assert count(verdict) == before + 1
    assert world.queued == ([] if case == "held" else [1])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{QUEUE_ID}: client went away before the 250; the message is stored"]
    assert any(r.getMessage().startswith(f"{QUEUE_ID}: from=<alice@acme.test>") for r in caplog.records)


@pytest.mark.parametrize("case", ["accepted", "accepted-shared-spool", "held"])
def test_cancelled_during_the_commit_that_then_fails_leaves_nothing(world, monkeypatch, caplog, case):
    if case == "held":
        world.rule.action = "hold"
    world.cfg.node.shared_spool = case == "accepted-shared-spool"
    world.held.fail = True
    before = count("tempfail")

    async def run() -> None:
        settled = settled_when_done(world, monkeypatch, "_commit_abandoned")
        await cancel_while(world, world.held.entered)
        assert spool_files(world) == ([] if case == "accepted" else [f"{QUEUE_ID}.eml"])  # not yet removed
        world.held.release.set()
        await asyncio.wait_for(settled.wait(), WAIT)

    with caplog.at_level(logging.INFO, logger="mailgate.smtp"):
        asyncio.run(run())
    assert OutboundMessage.select().count() == 0 and ArchiveRecord.select().count() == 0
    assert spool_files(world) == []
    assert world.queued == []
    assert count("tempfail") == before + 1
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.startswith(f"{QUEUE_ID}: the client went away before the 250 and the store failed: OSError")
    assert "nothing stored" in line


def test_a_node_stopping_meanwhile_waits_for_the_job_not_for_the_gone_client(world, monkeypatch):
    """The committer's stop runs the jobs queued before it and ends; the cancelled handler's
    outcome still arrives on the event loop."""

    async def run() -> None:
        settled = settled_when_done(world, monkeypatch, "_commit_abandoned")
        await cancel_while(world, world.held.entered)
        stopping = asyncio.ensure_future(asyncio.to_thread(world.committer.stop))
        world.held.release.set()
        await asyncio.wait_for(stopping, WAIT)
        await asyncio.wait_for(settled.wait(), WAIT)

    asyncio.run(run())
    [row] = OutboundMessage.select()
    assert row.queue_id == QUEUE_ID and world.queued == [1]
    assert verify(world.archive.store) == []


def test_cancelled_during_the_decision_removes_the_spool_file_when_phase_one_ends(world, monkeypatch, caplog):
    """Cancelled while the worker thread decides and writes the files: the thread goes on;
    when it ends, its spool file goes (nothing was queued for commit)."""
    world.cfg.node.shared_spool = True
    world.rule.gate = threading.Event()

    async def run() -> None:
        settled = settled_when_done(world, monkeypatch, "_prepared_abandoned")
        await cancel_while(world, world.rule.entered)
        world.rule.gate.set()
        await asyncio.wait_for(settled.wait(), WAIT)

    with caplog.at_level(logging.INFO, logger="mailgate.smtp"):
        asyncio.run(run())
    assert spool_files(world) == []
    assert OutboundMessage.select().count() == 0 and ArchiveRecord.select().count() == 0
    assert not world.held.entered.is_set()  # nothing was submitted
    assert f"{QUEUE_ID}: the client went away before the verdict was made; nothing stored" in caplog.text


def test_a_refusal_cancelled_during_its_record_is_still_archived_and_counted(world, monkeypatch):
    world.rule.action = "refuse"
    before = count("refused")

    async def run() -> None:
        settled = settled_when_done(world, monkeypatch, "_refusal_abandoned")
        entered = threading.Event()
        release = threading.Event()
        real = world.handler._record_refusal

        def record(*args):  # noqa: ANN002, ANN202 - in the committer's thread
            entered.set()
            assert release.wait(WAIT)
            return real(*args)

        monkeypatch.setattr(world.handler, "_record_refusal", record)
        await cancel_while(world, entered)
        release.set()
        await asyncio.wait_for(settled.wait(), WAIT)

    asyncio.run(run())
    [record] = ArchiveRecord.select()
    assert record.verdict == "refused" and record.queue_id == QUEUE_ID
    assert OutboundMessage.select().count() == 0 and spool_files(world) == []
    assert count("refused") == before + 1
    assert verify(world.archive.store) == []
