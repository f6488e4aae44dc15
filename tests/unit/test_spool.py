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


def _archive(tmp_path):
    from gateway.archive import Archive

    return Archive(tmp_path / "archive", tmp_path / "certs" / "archive.keys")


def test_a_row_backed_by_an_archive_blob_reads_back_byte_identical(db, tmp_path):
    """Accepted mail is queued as its archive blob (one durable write): the relay reads the
    very bytes back through the archive, and finishing the row never deletes the blob."""
    from gateway.spool import archive_ref, parse_archive_ref

    archive = _archive(tmp_path)
    data = b"Subject: x\r\nDKIM-Signature: v=1; a=ed25519-sha256\r\n\r\nbody \xe4\r\n"
    blob = archive.store.put(data)
    spool = Spool(tmp_path / "spool", archive=archive)
    row = spool.insert("Q1", "a@acme.test", ["b@x.com"], len(data), spool_path=archive_ref(blob.name, blob.sha256))
    stored = OutboundMessage.get(OutboundMessage.queue_id == "Q1")
    assert parse_archive_ref(stored.spool_path) == (blob.name, blob.sha256)
    assert spool.read(stored) == data
    assert list((tmp_path / "spool").iterdir()) == []  # no second copy
    spool.remove(row)
    assert archive.store.path_of(blob.name).exists()  # the archive's copy stays
    spool.sweep_orphans(older_than=0)
    assert spool.read(stored) == data


def test_an_altered_or_missing_archive_blob_reads_as_missing(db, tmp_path):
    """The relay treats an unreadable blob like a missing spool file (kept, retried, never sent altered)."""
    from gateway.spool import archive_ref

    archive = _archive(tmp_path)
    blob = archive.store.put(b"Subject: y\r\n\r\nhi\r\n")
    spool = Spool(tmp_path / "spool", archive=archive)
    row = spool.insert("Q2", "a@acme.test", ["b@x.com"], 20, spool_path=archive_ref(blob.name, blob.sha256))
    path = archive.store.path_of(blob.name)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(FileNotFoundError, match="does not decrypt"):
        spool.read(row)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        spool.read(row)
    with pytest.raises(FileNotFoundError, match="no archive"):
        Spool(tmp_path / "spool").read(row)
