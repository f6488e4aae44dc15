"""A submission's group COMMIT on the real PostgreSQL fixture that reports failure although
the server applied it (the connection lost before the reply: the client got 451, the row
exists): its spool file must stay — the handler and the group commit keep every file of a
commit whose outcome is unknown — and the orphan sweep keeps it, so the message is relayed,
not lost.  A COMMIT the server refused (an SQLSTATE on a live connection: rolled back) leaves
no file behind."""

from __future__ import annotations

import asyncio

import pytest

from gateway.approval import ApprovalService
from gateway.db import connect, is_postgres
from gateway.db.models import Employee, OutboundMessage, database
from gateway.relay import RelayWorker
from tests.harness.commitfault import CommitFault
from tests.integration.test_relay import Clock, received, via_sink
from tests.unit.test_submission_commit_outcome import Rule
from tests.unit.test_submission_errors import QUEUE_ID, STORE_TEMPFAIL, make_world, send

pytestmark = pytest.mark.integration


@pytest.fixture
def world(postgres, tmp_path, monkeypatch, request):
    name = "t_commit_outcome_" + request.node.name[-20:].lower().replace("-", "_").replace("[", "_").rstrip("]")
    postgres.drop_database(name)
    connect(postgres.create_database(name))
    assert is_postgres()
    hold = "held" in request.node.name
    built = make_world(tmp_path, monkeypatch, Rule(hold=hold))
    built.cfg.node.shared_spool = not hold  # accepted mail then keeps a spool file
    if hold:
        Employee.create(email="boss@acme.test", name="Boss")
        built.handler.directory.load()
        built.handler.approvals = ApprovalService(built.cfg, built.handler.directory, built.spool)
    yield built
    built.committer.stop()
    database.close()


@pytest.fixture(autouse=True)
def clean_sink(sink):
    sink.clear()
    yield


def _files(world) -> list[str]:  # noqa: ANN001
    return sorted(p.name for p in world.spool.directory.iterdir())


def test_a_commit_applied_but_reported_failed_keeps_the_file_and_the_message_is_relayed(world, monkeypatch, sink):
    fault = CommitFault(monkeypatch, "applied", thread="group-commit")
    assert send(world) == STORE_TEMPFAIL  # the client was told to send again
    assert fault.failed == 1
    [row] = OutboundMessage.select()
    assert (row.queue_id, row.state) == (QUEUE_ID, "queued")  # … but the server had stored it
    assert _files(world) == [f"{QUEUE_ID}.eml"]  # so its file stays

    assert world.spool.sweep_orphans(older_than=0) == 0  # the orphan sweep, past its age limit
    assert _files(world) == [f"{QUEUE_ID}.eml"]
    worker = RelayWorker(via_sink(sink), world.spool, "w1", None, now=Clock())
    try:
        assert asyncio.run(worker.run_once()) == 1
    finally:
        asyncio.run(worker.aclose())
    [got] = received(sink)
    assert list(got.rcpt_tos) == ["buyer@example.com", "other@example.org"]
    assert got.data.endswith(b"\r\n\r\nPrices inside.\r\n")  # the message as stored
    assert OutboundMessage.get_by_id(row.id).state == "sent" and _files(world) == []


def test_a_held_message_whose_commit_was_applied_keeps_its_original_and_notices(world, monkeypatch):
    fault = CommitFault(monkeypatch, "applied", thread="group-commit")
    assert send(world) == STORE_TEMPFAIL
    assert fault.failed == 1
    rows = {m.queue_id: m for m in OutboundMessage.select()}
    assert rows[QUEUE_ID].state == "held" and len(rows) == 3  # the message, the approver's request, the notice
    expected = sorted([f"{QUEUE_ID}.orig.eml", *(f"{q}.eml" for q in rows)])
    assert _files(world) == expected
    assert world.spool.sweep_orphans(older_than=0) == 0 and _files(world) == expected


def test_a_commit_the_server_refused_leaves_no_file(world, monkeypatch):
    fault = CommitFault(monkeypatch, "refused", thread="group-commit")
    assert send(world) == STORE_TEMPFAIL
    assert fault.failed == 1
    assert OutboundMessage.select().count() == 0 and _files(world) == []
