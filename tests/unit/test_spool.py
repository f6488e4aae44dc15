import errno
import json
import os

import pytest

from gateway.db.models import OutboundMessage
from gateway.spool import Spool, SpoolError, queue_stats


def test_enqueue_writes_file_and_row(db, tmp_path):
    spool = Spool(tmp_path / "spool")
    row = spool.enqueue("a@acme.test", ["b@x.com"], b"Subject: x\r\n\r\nhi\r\n", message_id="<m@x>")
    assert (tmp_path / "spool" / row.spool_path).read_bytes() == b"Subject: x\r\n\r\nhi\r\n"
    stored = OutboundMessage.get(OutboundMessage.queue_id == row.queue_id)
    assert json.loads(stored.recipients) == ["b@x.com"] and stored.state == "queued"
    assert queue_stats()[0] == 1
    assert not list((tmp_path / "spool").glob("*.tmp"))


def test_disk_full_raises_and_leaves_nothing(db, tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool")

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(SpoolError, match="No space"):
        spool.enqueue("a@acme.test", ["b@x.com"], b"x\r\n")
    monkeypatch.undo()
    assert list((tmp_path / "spool").iterdir()) == []
    assert OutboundMessage.select().count() == 0


def test_db_failure_removes_file(db, tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.enqueue("a@acme.test", ["b@x.com"], b"x\r\n", queue_id="SAMEID")
    with pytest.raises(SpoolError, match="queue record failed"):
        spool.enqueue("a@acme.test", ["b@x.com"], b"y\r\n", queue_id="SAMEID")  # unique key violated
    assert OutboundMessage.select().count() == 1
    assert not (tmp_path / "spool" / "SAMEID.eml").exists()  # the failed write is cleaned up


def test_sweep_orphans(db, tmp_path):
    spool = Spool(tmp_path / "spool")
    kept = spool.enqueue("a@acme.test", ["b@x.com"], b"x\r\n")
    orphan = tmp_path / "spool" / "ORPHAN.eml"
    orphan.write_bytes(b"lost")
    os.utime(orphan, (0, 0))
    assert spool.sweep_orphans(older_than=60) == 1
    assert not orphan.exists() and (tmp_path / "spool" / kept.spool_path).exists()
