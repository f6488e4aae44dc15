"""Bad input and broken surroundings on the archive's paths: a full disk while blobs, anchors
and pending blobs are written; the database failing during the sync and the background
indexer; malformed messages through import, sync and the indexer.  Each must give a clear
error, lose nothing already accepted, and leave nothing half-recorded."""

from __future__ import annotations

import errno
import logging
import os
from types import SimpleNamespace

import pytest
from peewee import OperationalError

from gateway.archive import anchors, extraction, importer, indexer, pending, sync, workers
from gateway.archive.importer import import_eml, import_mbox
from gateway.archive.schema import ArchiveRecord, ArchiveSighting, ArchiveSyncState
from gateway.archive.search import record_ids
from gateway.archive.search_schema import SearchDoc, SearchState
from gateway.archive.verify import CHECKPOINT_ACTION, checkpoint, verify
from gateway.db.models import AuditLog, Employee, database

from .conftest import message


@pytest.fixture(autouse=True)
def inline_extraction(monkeypatch):
    """Extraction in this process: the tests patch ``os.write``, which the pool's pipes use."""
    monkeypatch.setenv("MAILGATE_ARCHIVE_WORKERS", "0")


class Disk:
    """``os.write`` / ``os.fsync`` that fail with ENOSPC while ``full`` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = False
        real_write, real_fsync = os.write, os.fsync

        def write(fd, data):  # noqa: ANN001, ANN202
            if self.full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        def fsync(fd):  # noqa: ANN001, ANN202
            if self.full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "fsync", fsync)


def _blobs_of_every_record_readable(archive) -> None:
    for rec in ArchiveRecord.select():
        archive.read(rec)  # raises BlobError if a record names a blob that is not there


def _tmp_files(archive) -> list[str]:
    return [p.name for p in archive.directory.rglob("*.tmp")]


# -- 1. a full disk ------------------------------------------------------------------------------


@pytest.mark.parametrize(("failing", "durable", "code"), [
    ("write", True, errno.ENOSPC), ("write", False, errno.ENOSPC), ("fsync", True, errno.ENOSPC),
    ("open", True, errno.EROFS)])  # a read-only archive folder (root ignores chmod: patched)
def test_a_blob_write_that_fails_leaves_no_file_to_be_taken_for_the_blob(archive, monkeypatch, failing, durable,
                                                                         code):
    """What the SMTP handler relies on for its 452 / 451 (tests/integration/test_durability.py
    fills a real tmpfs where mounting is allowed): the error carries its errno, and neither the
    blob's name nor a temporary file is left — a later ``prepare`` must not find a torn file in place."""
    blob = archive.prepare(message(1))

    def refuse(*args):  # noqa: ANN002, ANN202
        raise OSError(code, os.strerror(code))

    with monkeypatch.context() as patched:
        patched.setattr(os, failing, refuse)
        with pytest.raises(OSError) as failed:
            archive.store.write(blob, sync_dir=False, durable=durable)
    assert failed.value.errno == code
    assert not archive.store.path_of(blob.name).exists() and _tmp_files(archive) == []
    assert archive.prepare(message(1)).data is not None  # written in full next time


def test_an_import_on_a_full_disk_reports_each_message_not_stored_and_a_rerun_archives_them(
        archive, tmp_path, monkeypatch):
    monkeypatch.setattr(importer, "BATCH", 2)
    folder = tmp_path / "mail"
    folder.mkdir()
    for n in range(5):
        (folder / f"m{n}.eml").write_bytes(message(n))
    disk = Disk(monkeypatch)
    real = archive.ingest_many

    def ingest_many(captures, *args, **kwargs):  # noqa: ANN001, ANN202 - the disk fills after the first batch
        try:
            return real(captures, *args, **kwargs)
        finally:
            disk.full = True

    monkeypatch.setattr(archive, "ingest_many", ingest_many)
    result = import_eml(archive, [folder])
    assert (result.seen, result.new_records) == (2, 2)
    assert len(result.errors) == 3  # every message of the later batches, by name, with the reason
    assert all("could not store it (No space left on device)" in e for e in result.errors)
    assert sorted(e.split(":")[0].rsplit("/", 1)[1] for e in result.errors) == ["m2.eml", "m3.eml", "m4.eml"]
    assert ArchiveRecord.select().count() == 2 and ArchiveSighting.select().count() == 2
    _blobs_of_every_record_readable(archive)
    assert _tmp_files(archive) == []

    disk.full = False
    monkeypatch.setattr(archive, "ingest_many", real)
    again = import_eml(archive, [folder])
    assert (again.new_records, again.new_sightings, again.errors) == (3, 3, [])
    assert ArchiveRecord.select().count() == 5 and verify(archive.store) == []


def test_an_mbox_import_on_a_full_disk_reports_its_entries(archive, tmp_path, monkeypatch):
    import mailbox

    box = mailbox.mbox(tmp_path / "in.mbox")
    for n in range(3):
        box.add(message(n))
    box.close()
    Disk(monkeypatch).full = True
    result = import_mbox(archive, tmp_path / "in.mbox")
    assert result.seen == 0 and [e.rsplit("#", 1)[1].split(":")[0] for e in result.errors] == ["1", "2", "3"]
    assert ArchiveRecord.select().count() == 0
    monkeypatch.undo()
    assert import_mbox(archive, tmp_path / "in.mbox").new_records == 3


def test_the_import_cli_on_a_full_disk_lists_the_messages_and_exits_1(cli_config, tmp_path, monkeypatch, capsys):
    from gateway.cli import main

    folder = tmp_path / "mail"
    folder.mkdir()
    for n in range(2):
        (folder / f"m{n}.eml").write_bytes(message(n))
    Disk(monkeypatch).full = True
    assert main(["-c", str(cli_config), "archive", "import", str(folder)]) == 1
    out, err = capsys.readouterr()
    assert "imported 0 message(s): 0 new record(s), 0 new sighting(s), 2 skipped" in out
    assert err.count("skipped: ") == 2 and "No space left on device" in err


class FakeImap:
    """What ``fetch_mailbox`` and ``_sync_mailbox`` ask of an IMAPClient: one folder."""

    def __init__(self, messages: dict[int, bytes], uidvalidity: int = 7) -> None:
        self.messages, self.uidvalidity = messages, uidvalidity

    def select_folder(self, name, readonly=False):  # noqa: ANN001, ANN201
        return {b"UIDVALIDITY": self.uidvalidity, b"EXISTS": len(self.messages)}

    def search(self, criteria):  # noqa: ANN001, ANN201
        return sorted(self.messages)

    def list_folders(self):  # noqa: ANN201
        return [((), b"/", "INBOX")]

    def fetch(self, uids, what):  # noqa: ANN001, ANN201
        if what == ["RFC822.SIZE"]:
            return {u: {b"RFC822.SIZE": len(self.messages[u])} for u in uids if u in self.messages}
        return {u: {b"BODY[]": self.messages[u]} for u in uids if u in self.messages}


@pytest.fixture
def alice(db):
    return Employee.create(email="alice@acme.test", name="Alice")


def _sync(archive, client, employee, max_size: int = 1 << 20) -> int:
    cfg = SimpleNamespace(archive=SimpleNamespace(max_message_size=max_size))
    return sync._sync_mailbox(archive, cfg, client, employee, "INBOX")


def _state() -> tuple[int, int, str]:
    s = ArchiveSyncState.get()
    return s.uidvalidity, s.last_uid, s.last_error


def test_a_sync_on_a_full_disk_stops_after_its_last_stored_chunk_and_resumes_there(archive, alice, monkeypatch):
    monkeypatch.setattr(sync, "FETCH_CHUNK", 2)
    client = FakeImap({uid: message(uid) for uid in range(1, 6)})
    disk = Disk(monkeypatch)
    real = archive.ingest_many

    def ingest_many(captures, *args, **kwargs):  # noqa: ANN001, ANN202
        try:
            return real(captures, *args, **kwargs)
        finally:
            disk.full = True

    monkeypatch.setattr(archive, "ingest_many", ingest_many)
    with pytest.raises(OSError) as failed:
        _sync(archive, client, alice)
    assert failed.value.errno == errno.ENOSPC
    assert _state()[:2] == (7, 2)  # the watermark: the chunk that was stored, not the one that was not
    assert ArchiveRecord.select().count() == 2
    _blobs_of_every_record_readable(archive)

    disk.full = False
    monkeypatch.setattr(archive, "ingest_many", real)
    assert _sync(archive, client, alice) == 3
    assert _state()[:2] == (7, 5) and ArchiveSighting.select().count() == 5
    assert sorted(s.ref for s in ArchiveSighting.select()) == [f"7:{u}" for u in range(1, 6)]
    assert verify(archive.store) == []


def test_sync_account_notes_a_storage_failure_on_the_mailbox_and_goes_on(archive, alice, monkeypatch, caplog):
    client = FakeImap({1: message(1)})
    cfg = SimpleNamespace(archive=SimpleNamespace(sync_mailboxes=["INBOX"], max_message_size=1 << 20))
    monkeypatch.setattr(sync, "login_for", lambda archive, cfg, account: ("u", "p"))
    upstream = SimpleNamespace(login=lambda user, password: client)
    monkeypatch.setattr(sync, "_close", lambda c: None)
    disk = Disk(monkeypatch)
    disk.full = True
    with caplog.at_level(logging.WARNING, "mailgate.archive"):
        assert sync.sync_account(archive, cfg, upstream, alice) == 0
    disk.full = False
    assert "No space left on device" in _state()[2]
    assert "alice@acme.test/INBOX stopped" in caplog.text
    assert sync.sync_account(archive, cfg, upstream, alice) == 1 and _state()[1:] == (1, "")


def test_a_failed_anchor_append_leaves_no_anchored_checkpoint(archive, monkeypatch):
    archive.record(message(1), direction="outbound", verdict="accepted")
    Disk(monkeypatch).full = True
    with pytest.raises(OSError, match="No space"):
        checkpoint("test", archive.directory)
    monkeypatch.undo()
    assert AuditLog.select().where(AuditLog.action == CHECKPOINT_ACTION).count() == 0
    assert verify(archive.store) == []  # no checkpoint claims a line the file lacks
    checkpoint("test", archive.directory)
    assert verify(archive.store) == []


def test_a_short_anchor_append_is_an_error_and_leaves_no_torn_line(archive, monkeypatch):
    archive.record(message(1), direction="outbound", verdict="accepted")
    checkpoint("test", archive.directory)
    path = anchors.path_in(archive.directory)
    before = path.read_bytes()
    real = os.write

    def short(fd, data):  # noqa: ANN001, ANN202 - what a nearly full file system does
        return real(fd, data[:len(data) // 3])

    monkeypatch.setattr(os, "write", short)
    with pytest.raises(OSError, match="appended"):
        checkpoint("test", archive.directory)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert AuditLog.select().where(AuditLog.action == CHECKPOINT_ACTION).count() == 1
    assert verify(archive.store) == []


def _write_later(archive, n: int):
    """What the SMTP path does inside a node: the file without an fsync, the row in the transaction."""
    blob = archive.store.prepare(message(n, "sealed"))
    archive.store.write(blob, durable=False)
    rec = archive.record(message(n, "sealed"), direction="outbound", verdict="accepted", prepared=blob)
    with database.atomic():
        pending.row("n1", blob.name, blob.data).save(force_insert=True)
    return rec


def test_verify_reports_no_loss_for_a_blob_still_held_in_the_database(archive):
    """After an unclean stop, before the node's start writes them again, files of pending
    blobs may be missing or torn: their bytes are in the database, nothing is lost."""
    recs = [_write_later(archive, n) for n in range(3)]
    archive.store.path_of(recs[0].blob_path).unlink()
    archive.store.path_of(recs[1].blob_path).write_bytes(b"torn")
    assert verify(archive.store) == []
    pending.ArchivePendingBlob.delete().where(pending.ArchivePendingBlob.name == recs[0].blob_path).execute()
    problems = verify(archive.store)
    assert len(problems) == 1 and f"record {recs[0].id}: blob {recs[0].blob_path} is missing" in problems[0]


def test_a_pending_row_of_other_content_does_not_hide_a_loss(archive):
    recs = [_write_later(archive, n) for n in range(2)]
    archive.store.path_of(recs[0].blob_path).unlink()
    row = pending.ArchivePendingBlob.get(pending.ArchivePendingBlob.name == recs[0].blob_path)
    row.data = archive.store.seal(b"other bytes")[1]
    row.save()
    assert [p.split(":")[1].strip() for p in verify(archive.store)] == [f"record {recs[0].id}"]


def test_a_recovery_that_cannot_write_keeps_every_row_and_says_so(archive, monkeypatch):
    recs = [_write_later(archive, n) for n in range(3)]
    for rec in recs:
        archive.store.path_of(rec.blob_path).unlink()
    disk = Disk(monkeypatch)
    disk.full = True
    with pytest.raises(OSError, match="3 blob file.* held in the database .* stay in the database") as failed:
        pending.recover(archive.store, "n1")
    assert failed.value.errno == errno.ENOSPC
    disk.full = False
    assert pending.ArchivePendingBlob.select().count() == 3
    assert pending.recover(archive.store, "n1") == 3
    assert verify(archive.store) == [] and pending.ArchivePendingBlob.select().count() == 0


# -- 2. the database failing ---------------------------------------------------------------------


def test_a_sync_whose_transaction_fails_resumes_without_a_lost_or_doubled_message(archive, alice, monkeypatch):
    """SQLite busy past its timeout ("database is locked") or PostgreSQL gone in the middle of
    a pass: the chunk's rows roll back, the watermark stays at the last committed chunk."""
    monkeypatch.setattr(sync, "FETCH_CHUNK", 2)
    client = FakeImap({uid: message(uid) for uid in range(1, 6)})
    real = archive.chain_batch
    calls = []

    def chain_batch(captures, blobs):  # noqa: ANN001, ANN202
        calls.append(1)
        if len(calls) == 2:
            raise OperationalError("database is locked")
        return real(captures, blobs)

    monkeypatch.setattr(archive, "chain_batch", chain_batch)
    with pytest.raises(OperationalError):
        _sync(archive, client, alice)
    assert _state()[:2] == (7, 2) and ArchiveRecord.select().count() == 2
    assert _sync(archive, client, alice) == 3
    assert ArchiveSighting.select().count() == 5 and ArchiveRecord.select().count() == 5
    assert verify(archive.store) == []


def test_an_indexer_pass_that_fails_midway_resumes_without_indexing_twice(archive, monkeypatch):
    node = type(archive)(archive.directory, archive.store.key_file, defer_index=True)
    recs = [node.record(message(n, f"curlew{n}"), direction="outbound", verdict="accepted") for n in range(40)]
    index_batch = indexer.index_batch
    real = indexer.insert_documents
    calls = []

    def insert(entries, written=None, failed=None):  # noqa: ANN001, ANN202 - the second write transaction fails
        calls.append(1)
        if len(calls) == 2:
            raise OperationalError("database is locked")
        return real(entries, written, failed)

    monkeypatch.setattr(indexer, "insert_documents", insert)
    monkeypatch.setattr(indexer, "INDEX_CHUNK", 16)
    indexer._LAST_TOP.pop(node, None)  # records arriving: short transactions of 16
    with pytest.raises(OperationalError):
        index_batch(node, limit=100)
    assert SearchDoc.select().count() == 16  # the first transaction's documents stay
    assert SearchState.get_or_none(SearchState.name == "records") is None  # no watermark moved
    monkeypatch.setattr(indexer, "insert_documents", real)
    index_batch(node, limit=100)
    docs = [d.record_id for d in SearchDoc.select()]
    assert sorted(docs) == [r.id for r in recs]  # each once
    assert SearchState.get(SearchState.name == "records").value == recs[-1].id
    assert record_ids("curlew39") == [recs[-1].id]


def test_a_failed_background_pass_drops_its_threads_connection(archive, monkeypatch):
    """A pass that failed (PostgreSQL restarted under it) must not keep the thread's broken
    connection: the next pass there connects afresh (tests/integration/test_archive_db_outage.py
    restarts a real server)."""
    import asyncio

    from gateway.archive import service

    def failing() -> None:
        database.execute_sql("SELECT 1")  # this thread's connection is open
        raise OperationalError("server closed the connection unexpectedly")

    closed = []

    def run() -> None:
        try:
            service._pass(failing)
        except OperationalError:
            closed.append(database.is_closed())

    import threading

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert closed == [True]
    assert asyncio.run(service._in_thread(lambda: database.execute_sql("SELECT 2").fetchone()[0])) == 2


def test_a_failed_daily_purge_is_tried_again_in_an_hour_not_a_day(archive, monkeypatch, caplog):
    import asyncio

    from gateway.archive import service

    cfg = SimpleNamespace(archive=SimpleNamespace(purge_enabled=True, retention_years=7))
    calls: list[str] = []
    waits: list[float] = []

    def purge(store, years, actor):  # noqa: ANN001, ANN202
        calls.append("purge")
        if len(calls) == 1:
            raise OSError(errno.EIO, "purge failed")

    async def wait(stopping, seconds):  # noqa: ANN001, ANN202
        waits.append(seconds)
        return len(waits) > 4

    import gateway.archive.retention

    monkeypatch.setattr(gateway.archive.retention, "purge", purge)
    monkeypatch.setattr(service, "_wait", wait)
    with caplog.at_level(logging.ERROR, "mailgate.archive"):
        asyncio.run(service._daily(archive, cfg, asyncio.Event()))
    assert calls == ["purge", "purge"]
    assert waits == [60.0, service.DAILY_RETRY - 60.0, 60.0, service.DAILY - 60.0, 60.0]  # then daily again
    assert "daily retention purge failed (tried again in an hour)" in caplog.text


def test_a_failed_checkpoint_is_tried_again_at_the_next_interval(archive, monkeypatch, caplog):
    """The checkpoint loop (hourly) goes on after a failure (e.g. chain-anchors.log cannot be
    appended on a full disk); the failed one is still needed, so the next pass writes it."""
    import asyncio

    from gateway.archive import service, verify

    cfg = SimpleNamespace(archive=SimpleNamespace(checkpoint_interval=3600.0))
    calls: list[str] = []
    waits: list[float] = []

    def checkpoint(actor, directory):  # noqa: ANN001, ANN202
        calls.append("checkpoint")
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")

    async def wait(stopping, seconds):  # noqa: ANN001, ANN202
        waits.append(seconds)
        return len(waits) > 2

    monkeypatch.setattr(verify, "checkpoint", checkpoint)
    monkeypatch.setattr(verify, "checkpoint_needed", lambda: True)
    monkeypatch.setattr(service, "_wait", wait)
    with caplog.at_level(logging.ERROR, "mailgate.archive"):
        asyncio.run(service._checkpoints(archive, cfg, asyncio.Event()))
    assert calls == ["checkpoint", "checkpoint"] and waits == [60.0, 3600.0, 3600.0]
    assert "archive checkpoint failed" in caplog.text


# -- 3. malformed messages -----------------------------------------------------------------------

MALFORMED = {
    "no-headers": b"just a line of text without any header godwitnohead\r\n",
    "8bit-garbage": b"Subject: \xff\xfe\x80 garbage\r\nFrom: \xc3(bad@x.test\r\n\r\ngodwit8bit \xff\xfe\x00\x80\r\n",
    "nul-bytes": b"Subject: nul\x00here\r\n\r\ngodwitnul\x00\x00 body\r\n",
    "broken-boundary": (b"Subject: parts\r\nContent-Type: multipart/mixed; boundary=\"zz\"\r\n\r\n"
                        b"--zz\r\nContent-Type: text/plain\r\n\r\ngodwitpart one\r\n--z\r\nno end godwitpart"),
    "empty-boundary": b"Subject: e\r\nContent-Type: multipart/mixed; boundary=\"\"\r\n\r\n--\r\ngodwitempty\r\n",
    "rfc2047-broken": b"Subject: =?utf-8?q?godwit=ZZ=E4?= =?utf-8?b?!!!?= =?x?q?y?=\r\n\r\nbody\r\n",
    "unknown-charset": (b"Subject: =?x-martian?q?godwitmars?=\r\nContent-Type: text/plain; charset=x-martian\r\n\r\n"
                        b"godwitcharset \xe4\xf6\r\n"),
    "bad-base64": (b"Subject: b64\r\nContent-Transfer-Encoding: base64\r\n\r\n!!not base64!! godwitb64\r\n"),
    "header-only": b"Subject: godwitheaderonly\r\n",
    "lone-cr": b"Subject: cr\rFrom: a@x\r\n\r\ngodwitcr\r body\r\n",
}
SEARCHABLE = {"no-headers": "godwitnohead", "8bit-garbage": "godwit8bit", "nul-bytes": "godwitnul",
              "broken-boundary": "godwitpart", "empty-boundary": "godwitempty", "unknown-charset": "godwitcharset",
              "header-only": "godwitheaderonly"}


def _check_malformed(archive, by_name: dict[str, ArchiveRecord]) -> None:
    for name, raw in MALFORMED.items():
        rec = by_name[name]
        assert archive.read(rec) == raw, name  # byte-exact: the blob is the raw bytes
    for name, word in SEARCHABLE.items():
        assert by_name[name].id in record_ids(word), name  # as far as it can be decoded
    assert verify(archive.store) == []


@pytest.mark.parametrize("workers_env", ["0", "1"])
def test_malformed_messages_in_one_import_batch_are_each_archived_and_indexed(
        archive, tmp_path, monkeypatch, workers_env):
    monkeypatch.setenv("MAILGATE_ARCHIVE_WORKERS", workers_env)  # "1": through a worker process
    workers.shutdown()
    folder = tmp_path / "mail"
    folder.mkdir()
    for name, raw in MALFORMED.items():
        (folder / f"{name}.eml").write_bytes(raw)
    (folder / "zero.eml").write_bytes(b"")
    (folder / "big.eml").write_bytes(b"Subject: big\r\n\r\n" + b"x" * 5000)
    try:
        result = import_eml(archive, [folder], max_size=4000)
    finally:
        workers.shutdown()
    assert sorted(e.split(": ", 1)[1] for e in result.errors) == [  # big.eml, zero.eml, no-headers.eml
        "5016 bytes is over max_message_size", "not an e-mail message", "not an e-mail message"]
    assert result.seen == len(MALFORMED) - 1  # "no-headers" is refused as not mail (a clear reason) ...
    by_name = {s.ref.rsplit("/", 1)[1][:-4]: s.record for s in ArchiveSighting.select()}
    assert "no-headers" not in by_name
    by_name["no-headers"] = archive.record(MALFORMED["no-headers"], direction="inbound", verdict="seen")
    _check_malformed(archive, by_name)  # ... but archived as is where it was seen (SMTP, IMAP)


def test_malformed_messages_through_the_sync_and_the_background_indexer(archive, alice, monkeypatch):
    node = type(archive)(archive.directory, archive.store.key_file, defer_index=True)
    names = list(MALFORMED)
    client = FakeImap({uid: MALFORMED[name] for uid, name in enumerate(names, 1)})
    assert _sync(node, client, alice) == len(names)
    while indexer.index_pending(node):
        pass
    by_uid = {int(s.ref.split(":")[1]): s.record for s in ArchiveSighting.select()}
    _check_malformed(archive, {name: by_uid[uid] for uid, name in enumerate(names, 1)})


def test_a_message_over_the_limit_is_left_out_of_the_sync_with_a_reason_and_the_rest_archived(
        archive, alice, caplog):
    client = FakeImap({1: message(1), 2: b"Subject: big\r\n\r\n" + b"x" * 5000, 3: message(3)})
    with caplog.at_level(logging.WARNING, "mailgate.archive"):
        assert _sync(archive, client, alice, max_size=4000) == 2
    assert "UID 2 is 5016 bytes (> max_message_size); not archived" in caplog.text
    assert _state()[1] == 3


def test_an_extraction_that_raises_costs_only_its_own_text(archive, monkeypatch, caplog):
    real = extraction.extract

    def extract(raw, headers=True):  # noqa: ANN001, ANN202 - a bug met by hostile input
        if b"poison" in raw:
            raise RecursionError("maximum recursion depth exceeded")
        return real(raw, headers)

    monkeypatch.setattr(extraction, "extract", extract)
    caps = [importer.Capture(raw=message(n, "poison" if n == 1 else f"plover{n}"), place="import:eml", ref=str(n))
            for n in range(3)]
    with caplog.at_level(logging.ERROR, "mailgate.archive"):
        out = archive.ingest_many(caps)
    assert [o.new_record for o in out] == [True, True, True]
    assert "text extraction failed" in caplog.text
    assert out[1].record.subject == "Offer 1"  # the record's fields parsed on their own
    assert record_ids("plover2") == [out[2].record.id] and record_ids("plover0") == [out[0].record.id]
    node = type(archive)(archive.directory, archive.store.key_file, defer_index=True)
    rec = node.record(message(9, "poison"), direction="outbound", verdict="accepted")
    later = node.record(message(10, "plover10"), direction="outbound", verdict="accepted")
    indexer.index_pending(node)
    assert record_ids("plover10") == [later.id] and SearchDoc.get_or_none(SearchDoc.record_id == rec.id)


def test_a_chunk_whose_answer_fails_is_extracted_inline(monkeypatch):
    from concurrent.futures import Future

    class Pool:
        def submit(self, fn, *args):  # noqa: ANN001, ANN202
            fut: Future = Future()
            fut.set_exception(ValueError("could not unpickle the answer"))
            return fut

    monkeypatch.setattr(workers, "_pool", lambda: Pool())
    raws = [message(n, f"sandpiper{n}") for n in range(workers.MIN_BATCH)]
    got = workers.extract_async(raws).result()
    assert [ex.subject for ex, _ in got] == [f"Offer {n}" for n in range(workers.MIN_BATCH)]


# -- 4. a corrupt blob ---------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "altered", "truncated", "empty"])
def test_the_indexer_skips_a_damaged_blob_indexes_the_rest_and_verify_names_it(archive, damage):
    node = type(archive)(archive.directory, archive.store.key_file, defer_index=True)
    recs = [node.record(message(n, f"turnstone{n}"), direction="outbound", verdict="accepted") for n in range(3)]
    path = archive.store.path_of(recs[1].blob_path)
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes({"altered": data[:-3] + bytes(b ^ 0xFF for b in data[-3:]),
                          "truncated": data[:20], "empty": b""}[damage])
    node = type(archive)(archive.directory, archive.store.key_file, defer_index=True)  # nothing in memory
    assert indexer.index_pending(node) == 2
    assert sorted(d.record_id for d in SearchDoc.select()) == [recs[0].id, recs[2].id]
    problems = verify(archive.store)
    assert len(problems) == 1 and problems[0].startswith(f"archive: record {recs[1].id}: blob ")


def test_the_export_cli_leaves_out_a_damaged_blob_says_which_and_exits_1(cli_config, capsys):
    from gateway.archive import Archive
    from gateway.archive.export import read_mbox
    from gateway.cli import main
    from gateway.config import load
    from gateway.db import connect

    cfg = load(cli_config)
    db = connect(cfg.database.url)
    archive = Archive.from_config(cfg)
    recs = [archive.record(message(n, f"knot{n} dunlin"), direction="outbound", verdict="accepted")
            for n in range(3)]
    archive.store.path_of(recs[1].blob_path).write_bytes(b"MGA1garbage")
    db.close()
    out = cli_config.parent / "x.mbox"
    capsys.readouterr()
    assert main(["-c", str(cli_config), "archive", "export", "dunlin", "-o", str(out)]) == 1
    captured = capsys.readouterr()
    assert f"record {recs[1].id}: not readable: blob" in captured.err
    assert "2 message(s)" in captured.out and "1 skipped" in captured.out
    assert sorted(read_mbox(out.read_bytes())) == sorted(message(n, f"knot{n} dunlin").replace(b"\r\n", b"\n")
                                                         for n in (0, 2))
