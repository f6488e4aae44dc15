"""Deferred blob durability (gateway/archive/pending.py): rows hold the sealed bytes until a
file-system sync, and a start-up after a crash writes the files again from them."""

from __future__ import annotations

from gateway.archive import pending
from gateway.archive.pending import ArchivePendingBlob, BlobSyncer, recover, sync_once
from gateway.db.models import database
from tests.unit.archive.conftest import message


def _write_later(archive, n: int, node: str = "n1"):
    """What the SMTP path does: the file without an fsync, the row in the transaction."""
    blob = archive.store.prepare(message(n, "sealed"))
    archive.store.write(blob, durable=False)
    with database.atomic():
        pending.row(node, blob.name, blob.data).save(force_insert=True)
    return blob


def test_a_sync_drops_the_rows_of_its_node_only(archive, monkeypatch):
    synced = []
    monkeypatch.setattr(pending, "syncfs", lambda d: synced.append(d))
    mine = [_write_later(archive, i) for i in range(3)]
    _write_later(archive, 9, node="other")
    assert sync_once(archive.store, "n1") == 3
    assert synced == [archive.store.directory]  # the file system first, then the rows
    assert [r.node for r in ArchivePendingBlob.select()] == ["other"]
    assert sync_once(archive.store, "n1") == 0 and len(synced) == 1  # nothing to do: no sync
    assert all(archive.store.path_of(b.name).exists() for b in mine)


def test_syncfs_runs_for_real(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    pending.syncfs(tmp_path)  # no error: syncfs(2) on Linux, sync(2) elsewhere


def test_recovery_writes_torn_and_missing_files_again(archive):
    blobs = [_write_later(archive, i) for i in range(3)]
    archive.store.path_of(blobs[0].name).unlink()
    archive.store.path_of(blobs[1].name).write_bytes(b"")
    archive.store.path_of(blobs[2].name).write_bytes(b"torn")
    assert recover(archive.store, "n1") == 3
    for i, blob in enumerate(blobs):
        assert archive.store.read(blob.name, blob.sha256) == message(i, "sealed")
    assert ArchivePendingBlob.select().count() == 0
    assert recover(archive.store, "n1") == 0


def test_a_stopping_syncer_leaves_no_row(archive, monkeypatch):
    monkeypatch.setattr(pending, "syncfs", lambda d: None)
    syncer = BlobSyncer(archive.store, "n1", interval=3600)
    syncer.start()
    _write_later(archive, 1)
    syncer.stop()
    assert ArchivePendingBlob.select().count() == 0


def test_a_failed_sync_keeps_the_rows(archive, monkeypatch):
    def broken(directory):  # noqa: ANN001, ANN202
        raise OSError(5, "I/O error")

    monkeypatch.setattr(pending, "syncfs", broken)
    _write_later(archive, 1)
    BlobSyncer(archive.store, "n1")._round()  # logged, not raised
    assert ArchivePendingBlob.select().count() == 1


def test_a_row_that_commits_during_the_sync_with_a_smaller_id_waits_for_the_next_round(archive, monkeypatch):
    """PostgreSQL draws ids before the commit: another writer's row (an acceptor process)
    may commit after this round's look-up with an id below the newest one seen; its file may
    have been written after the sync began, so its row must stay until the next round."""
    first = _write_later(archive, 1)
    late = archive.store.prepare(message(2, "sealed"))

    def sync_while_a_late_row_commits(directory):  # noqa: ANN001, ANN202
        archive.store.write(late, durable=False)
        with database.atomic():
            ArchivePendingBlob.insert(id=0, node="n1", name=late.name, data=late.data).execute()

    monkeypatch.setattr(pending, "syncfs", sync_while_a_late_row_commits)
    top = ArchivePendingBlob.get(ArchivePendingBlob.name == first.name).id
    assert top > 0
    assert sync_once(archive.store, "n1") == 1
    assert [(r.id, r.name) for r in ArchivePendingBlob.select()] == [(0, late.name)]
