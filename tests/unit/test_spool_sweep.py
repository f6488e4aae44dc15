"""The spool's orphan sweep (``Spool.sweep_orphans``): what it removes and keeps, its order
against the writers (listing, then rows, then unlinks), and the node running it every hour."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path

import pytest

from gateway import metrics
from gateway.config import Config
from gateway.db.models import OutboundMessage
from gateway.spool import Spool

SECRET = b"Subject: Salary of Mr Zhang\r\n\r\n42000\r\n"


def aged(path: Path, data: bytes = SECRET) -> Path:
    """``path`` written with an mtime far in the past (older than any age limit)."""
    path.write_bytes(data)
    os.utime(path, (0, 0))
    return path


def removed_count() -> float:
    return metrics.REGISTRY.get_sample_value("mailgate_spool_orphans_removed_total") or 0.0


def names(spool: Spool) -> set[str]:
    return {p.name for p in spool.directory.iterdir()}


def test_the_sweep_removes_old_files_without_a_waiting_row_and_keeps_the_rest(db, tmp_path, caplog):
    spool = Spool(tmp_path / "spool")
    queued = spool.enqueue("a@acme.test", ["b@x.com"], SECRET, queue_id="QUEUED")
    held = spool.enqueue("a@acme.test", ["b@x.com"], SECRET, queue_id="HELD", state="held")
    sent = spool.enqueue("a@acme.test", ["b@x.com"], SECRET, queue_id="SENT")
    OutboundMessage.update(state="sent").where(OutboundMessage.id == sent.id).execute()
    for row in (queued, held, sent):
        os.utime(spool.path_for(row.queue_id), (0, 0))
    aged(spool.directory / "HELD.orig.eml")  # a held message's original: its row waits
    aged(spool.directory / "QUEUED.eml.tmp")  # belongs to a waiting row: kept
    aged(spool.directory / "LOST.eml")  # a crash before the commit
    aged(spool.directory / "LOST2.orig.eml")
    aged(spool.directory / "LOST3.eml.tmp")
    (spool.directory / "YOUNG.eml").write_bytes(SECRET)  # no row yet: may be mid-commit
    before = removed_count()
    with caplog.at_level(logging.DEBUG, logger="mailgate"):
        assert spool.sweep_orphans() == 4  # SENT.eml (its unlink was cut off) and the three lost
    assert names(spool) == {"QUEUED.eml", "HELD.eml", "HELD.orig.eml", "QUEUED.eml.tmp", "YOUNG.eml"}
    assert removed_count() == before + 4
    lines = [r for r in caplog.records if r.getMessage().startswith("spool sweep")]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert lines[0].getMessage() == ("spool sweep: 9 files listed, 8 older than 3600 s, 4 removed"
                                     " (no queue row waiting)")
    assert "Zhang" not in caplog.text and "LOST" not in caplog.text  # counts only

    with caplog.at_level(logging.DEBUG, logger="mailgate"):
        caplog.clear()
        assert spool.sweep_orphans() == 0  # nothing left to remove: not worth an INFO line
    assert [r.levelno for r in caplog.records if r.getMessage().startswith("spool sweep")] == [logging.DEBUG]
    assert removed_count() == before + 4


class ListingThen:
    """``os.scandir`` for gateway.spool that calls ``then`` once the listing is taken (before
    the entries are handed out), standing in for a writer that runs at that moment."""

    def __init__(self, then) -> None:  # noqa: ANN001
        self.then = then
        self.real = os.scandir

    def __call__(self, path):  # noqa: ANN001, ANN204
        with self.real(path) as it:
            entries = list(it)
        self.then()
        return _Listing(entries)


class _Listing(list):
    def __enter__(self):  # noqa: ANN204
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def test_a_row_committed_after_the_listing_keeps_its_file(db, tmp_path, monkeypatch):
    """The rows are read after the directory is listed: a row committed between the two — for a
    file written long before, as after a COMMIT of unknown outcome — keeps its file.  (Read the
    rows first, and this file would be listed without its row.)"""
    spool = Spool(tmp_path / "spool")
    aged(spool.path_for("LATE"))
    monkeypatch.setattr("gateway.spool.os.scandir",
                        ListingThen(lambda: spool.insert("LATE", "a@acme.test", ["b@x.com"], len(SECRET))))
    assert spool.sweep_orphans() == 0
    assert spool.path_for("LATE").read_bytes() == SECRET


def test_a_file_removed_after_the_listing_is_no_error(db, tmp_path, monkeypatch):
    """A relay worker removes a finished message's file while the sweep runs: nothing fails,
    and only what the sweep itself unlinked is counted."""
    spool = Spool(tmp_path / "spool")
    gone = aged(spool.path_for("GONE"))
    aged(spool.path_for("LOST"))
    monkeypatch.setattr("gateway.spool.os.scandir", ListingThen(gone.unlink))
    assert spool.sweep_orphans() == 1
    assert names(spool) == set()


@pytest.fixture
def node(db, tmp_path):
    from gateway.service import Node

    cfg = Config()
    cfg.node.data_dir = tmp_path / "var"
    cfg.company.domains = ["acme.test"]
    return Node(cfg)


def test_the_node_sweeps_the_spool_while_it_runs(node, monkeypatch, caplog):
    """Not only at start: the running node sweeps again every ``SWEEP_INTERVAL`` (shortened
    here), so files kept after a COMMIT of unknown outcome do not pile up until a restart."""
    monkeypatch.setattr("gateway.service.SWEEP_INTERVAL", 0.01)
    spool = node.spool
    row = spool.enqueue("a@acme.test", ["b@x.com"], SECRET, queue_id="WAITING")
    os.utime(spool.path_for(row.queue_id), (0, 0))
    runs: list[int] = []
    swept = threading.Event()
    real = spool.sweep_orphans

    def sweep() -> int:
        n = real()
        runs.append(n)
        if len(runs) == 2:
            swept.set()
        return n

    monkeypatch.setattr(spool, "sweep_orphans", sweep)

    async def scenario() -> None:
        node._start_spool_sweep()
        assert await asyncio.to_thread(swept.wait, 30)
        aged(spool.path_for("KEPT-UNKNOWN"))  # a later COMMIT of unknown outcome, not applied
        runs.clear()
        swept.clear()
        assert await asyncio.to_thread(swept.wait, 30)
        node.stopping.set()
        await asyncio.gather(*node.tasks)

    with caplog.at_level(logging.INFO, logger="mailgate"):
        asyncio.run(scenario())
    assert 1 in runs  # swept by a later run, the node still running
    assert names(spool) == {"WAITING.eml"}
    assert "spool sweep: " in caplog.text
