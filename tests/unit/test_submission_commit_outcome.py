"""The files of a submission whose group commit fails (gateway/smtp/handler.py,
gateway/groupcommit.py): the spool file (held mail, a shared spool), a held message's
original as submitted (``<id>.orig.eml``, ``ApprovalService.record_hold``) and the approval
notices it queued go at once when the commit is known to have stored nothing, and all stay
when the COMMIT's outcome is unknown — then the orphan sweep keeps those whose rows exist
(a COMMIT that reported failure but was applied: the client got 451, the message is stored)."""

from __future__ import annotations

import logging

import pytest

from gateway.approval import ApprovalService
from gateway.db.models import Employee, OutboundMessage
from gateway.policy import HOLD, Verdict
from tests.harness.commitfault import CommitFault
from tests.unit.test_submission_errors import QUEUE_ID, RAW, STORE_TEMPFAIL, make_world, send


class Rule:
    """Holds every message (``hold``) or accepts it."""

    name = "test-rule"
    priority = 50
    mode = "enforce"

    def __init__(self, hold: bool) -> None:
        self.hold = hold

    def evaluate(self, ctx, directory):  # noqa: ANN001, ANN201 - the policy's Rule protocol
        if self.hold:
            return Verdict(action=HOLD, reason="check", approvers=["boss@acme.test"], rule=self.name)
        return None


def _world(db, tmp_path, monkeypatch, case: str):  # noqa: ANN001, ANN202
    world = make_world(tmp_path, monkeypatch, Rule(hold=case == "held"))
    Employee.create(email="boss@acme.test", name="Boss")
    world.handler.directory.load()
    world.cfg.node.shared_spool = case == "shared-spool"
    world.handler.approvals = ApprovalService(world.cfg, world.handler.directory, world.spool)
    return world


@pytest.fixture(params=["held", "shared-spool"])
def world(db, tmp_path, monkeypatch, request):
    built = _world(db, tmp_path, monkeypatch, request.param)
    built.case = request.param
    yield built
    built.committer.stop()


def _files(world) -> list[str]:  # noqa: ANN001
    return sorted(p.name for p in world.spool.directory.iterdir())


def _expected_files(world) -> set[str]:  # noqa: ANN001
    """The message's spool file, and for a held one its original and the notices' files."""
    names = {f"{QUEUE_ID}.eml"}
    if world.case == "held":
        names.add(f"{QUEUE_ID}.orig.eml")
        names.update(f"{m.queue_id}.eml" for m in OutboundMessage.select() if m.queue_id != QUEUE_ID)
    return names


def test_a_stored_message_has_its_files(world):
    """The baseline: what the failure cases below must remove or keep."""
    assert send(world).startswith("250 ")
    files = set(_files(world))
    assert files == _expected_files(world)
    if world.case == "held":  # the request to the approver and the notice to the sender
        assert OutboundMessage.select().count() == 3 and len(files) == 4


def test_a_commit_the_database_refused_leaves_no_file(world, monkeypatch, caplog):
    fault = CommitFault(monkeypatch, "refused", thread="group-commit")
    with caplog.at_level(logging.INFO, logger="mailgate"):
        assert send(world) == STORE_TEMPFAIL
    assert fault.failed == 1
    assert OutboundMessage.select().count() == 0
    assert _files(world) == []  # the spool file, the original and the notices: all gone at once
    assert "kept" not in caplog.text


def test_a_commit_applied_but_reported_failed_keeps_every_file_and_the_sweep_keeps_them(world, monkeypatch, caplog):
    """The client hears 451 (it may send again: a duplicate, the accepted at-least-once cost),
    but the rows exist: nothing of the message may go, and the orphan sweep keeps it all."""
    fault = CommitFault(monkeypatch, "applied", thread="group-commit")
    with caplog.at_level(logging.INFO, logger="mailgate"):
        assert send(world) == STORE_TEMPFAIL
    assert fault.failed == 1
    [row] = OutboundMessage.select().where(OutboundMessage.queue_id == QUEUE_ID)
    assert row.state == ("held" if world.case == "held" else "queued")
    files = _files(world)
    assert set(files) == _expected_files(world) and f"{QUEUE_ID}.eml" in files
    assert f"{QUEUE_ID}: the commit's outcome is unknown; its files are kept" in caplog.text
    assert world.spool.sweep_orphans(older_than=0) == 0  # the orphan sweep: the rows exist
    assert _files(world) == files
    assert world.spool.read(row) == world.spool.path_for(QUEUE_ID).read_bytes()
    assert world.spool.read(row).endswith(RAW.split(b"\r\n\r\n", 1)[1])
