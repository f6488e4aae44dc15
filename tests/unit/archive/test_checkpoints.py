"""The node's periodic chain checkpoint (gateway.archive.service._checkpoints): written when
anything was archived or logged since the last one, never for an idle archive."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from gateway import oplog
from gateway.archive import anchors, service, verify
from gateway.archive.settings import ArchiveConfig, validate

from .conftest import message


def test_checkpoint_needed_follows_the_chain_and_the_log(archive) -> None:
    assert verify.checkpoint_needed()  # nothing checkpointed yet
    verify.checkpoint("test", archive.directory)
    assert not verify.checkpoint_needed()  # the newest entry is the checkpoint of the current head
    archive.record(message(1), direction="outbound", verdict="accepted", queue_id="Q1")
    assert verify.checkpoint_needed()  # the chain moved
    verify.checkpoint("test", archive.directory)
    assert not verify.checkpoint_needed()
    oplog.record("auditor@acme.test", "archive.search", "", {"q": "invoice"})
    assert verify.checkpoint_needed()  # the log moved: the auditor's trail needs its anchor too


def test_node_checkpoints_only_what_changed(archive, monkeypatch) -> None:
    """The loop checkpoints once for new mail, then stays quiet while nothing changes; the
    anchors file gets the head and the log's end of that one checkpoint."""
    archive.record(message(2), direction="outbound", verdict="accepted", queue_id="Q2")
    calls: list[int] = []
    asked = threading.Event()
    real_needed = verify.checkpoint_needed

    def counting_needed() -> bool:
        answer = real_needed()
        calls.append(int(answer))
        if len(calls) >= 4:
            asked.set()
        return answer

    monkeypatch.setattr(verify, "checkpoint_needed", counting_needed)
    cfg = SimpleNamespace(archive=SimpleNamespace(checkpoint_interval=0.001))

    async def run() -> None:
        stopping = asyncio.Event()
        task = asyncio.create_task(service._checkpoints(archive, cfg, stopping))
        await asyncio.to_thread(asked.wait, 30)
        stopping.set()
        await asyncio.wait_for(task, 10)

    asyncio.run(run())
    assert asked.is_set()
    assert calls[:4] == [1, 0, 0, 0]  # one checkpoint, then nothing to anchor
    lines, problems = anchors.read(archive.directory)
    assert problems == []
    assert [a.log for _, a in lines] == [anchors.CHAIN, anchors.OPLOG]
    assert verify.verify(archive.store, directory=archive.directory) == []


def test_checkpoint_interval_is_validated() -> None:
    assert any("checkpoint_interval" in p for p in validate(ArchiveConfig(checkpoint_interval=5)))
    assert not any("checkpoint_interval" in p for p in validate(ArchiveConfig()))
