"""Blob files no record names (gateway/archive/gc.py): listed by verify as unreferenced,
removed by ``mailgate archive gc --older-than`` — never one a record (or a pending blob, or a
queued message) names, never one younger than the limit, never one whose record commits while
the collection runs — with a chained ``gc`` event."""

from __future__ import annotations

import json
import os
import re

import pytest

from gateway.archive import Archive, gc
from gateway.archive.schema import ArchiveEvent
from gateway.archive.verify import verify
from tests.unit.archive.conftest import message

HOUR = 3600.0


def left_behind(archive: Archive, raw: bytes, *, old: bool = True) -> str:
    """The blob of ``raw`` written as a failed batch leaves it: the file, no record."""
    blob = archive.store.put(raw)
    if old:
        os.utime(archive.store.path_of(blob.name), (0, 0))
    return blob.name


def files(archive: Archive) -> set[str]:
    return {p.name for p in archive.store.directory.glob("[0-9a-f][0-9a-f]/*")}


def gc_events() -> list[dict]:
    events = ArchiveEvent.select().where(ArchiveEvent.kind == "gc").order_by(ArchiveEvent.seq)
    return [json.loads(e.details) for e in events]


@pytest.fixture
def world(archive):
    """Two records (one old blob), and what is left behind: two old unreferenced blobs, a young
    one, a writer's old temporary file, an old one a pending row names, an old one a queued
    message names."""
    from gateway.archive.pending import ArchivePendingBlob
    from gateway.spool import Spool, archive_ref

    recs = [archive.record(message(i), direction="outbound", verdict="accepted") for i in range(2)]
    os.utime(archive.store.path_of(recs[0].blob_path), (0, 0))
    lost = [left_behind(archive, message(10 + i)) for i in range(2)]
    young = left_behind(archive, message(20), old=False)
    tmp = archive.store.path_of(lost[0]).with_name(f"{lost[0]}.4242.1.tmp")
    tmp.write_bytes(b"half")
    os.utime(tmp, (0, 0))
    pending = left_behind(archive, message(30))
    ArchivePendingBlob.create(node="n1", name=pending, data=b"x")
    queued = archive.store.put(message(40))
    os.utime(archive.store.path_of(queued.name), (0, 0))
    Spool(archive.directory.parent / "spool").insert("Q40", "a@acme.test", ["b@x.com"], 10,
                                                     spool_path=archive_ref(queued.name, queued.sha256))
    named = {recs[0].blob_path, recs[1].blob_path, pending, queued.name}
    return archive, recs, lost, young, tmp.name, named


def test_verify_lists_the_unreferenced_and_gc_removes_the_old_ones_only(world):
    archive, recs, lost, young, tmp, named = world
    assert {f.name for f in gc.unreferenced(archive.store)} == {*lost, young, tmp}
    before = files(archive)

    dry = gc.collect(archive.store, HOUR, "cli:test", dry_run=True)
    assert {f.name for f in dry.removed} == {*lost, tmp} and dry.young == 1
    assert files(archive) == before and gc_events() == []

    done = gc.collect(archive.store, HOUR, "cli:test")
    assert {f.name for f in done.removed} == {*lost, tmp} and done.young == 1
    assert done.bytes == sum(f.size for f in dry.removed) > 0
    assert files(archive) == named | {young}  # every named blob stays, however old; the young one too
    [event] = gc_events()
    assert sorted(event["blobs"]) == sorted({*lost, tmp}) and event["bytes"] == done.bytes
    assert event["older_than_seconds"] == 3600
    assert verify(archive.store) == []  # the chain takes the event; every record's blob is there
    for r in recs:
        assert archive.read(r) == message(recs.index(r))
    assert gc.collect(archive.store, HOUR, "cli:test").removed == [] and len(gc_events()) == 1


def test_the_age_limit_has_a_floor(world):
    archive = world[0]
    with pytest.raises(ValueError, match="at least 3600"):
        gc.collect(archive.store, HOUR - 1, "cli:test")
    assert len(list(gc.unreferenced(archive.store))) == 4


def test_more_shards_than_one_find_the_same(world, monkeypatch):
    archive, _, lost, young, tmp, named = world
    monkeypatch.setattr(gc, "SHARD_RECORDS", 1)  # 2 records: 3 shards
    assert gc._shards() == 3
    assert {f.name for f in gc.unreferenced(archive.store)} == {*lost, young, tmp}
    gc.collect(archive.store, HOUR, "cli:test")
    assert files(archive) == named | {young}


def test_a_legacy_blob_is_listed_by_its_name(archive):
    legacy = archive.store.directory / "ab" / "cd" / ("abcd" + "0" * 60)
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"plain")
    assert [f.name for f in gc.unreferenced(archive.store)] == [f"ab/cd/{legacy.name}"]


def test_a_record_committed_after_the_listing_keeps_its_blob(archive, monkeypatch):
    """The message a failed batch left is sent again (the client's retry) and its record commits
    after gc listed the folders: the names are read after the listing, the blob stays."""
    name = left_behind(archive, message(1))
    real = gc._files
    retried = []

    def files_then_commit(*a):  # noqa: ANN002, ANN202
        listed = list(real(*a))
        if not retried:
            retried.append(archive.record(message(1), direction="outbound", verdict="accepted"))
        return iter(listed)

    monkeypatch.setattr(gc, "_files", files_then_commit)
    assert gc.collect(archive.store, HOUR, "cli:test").removed == []
    assert retried[0].blob_path == name and archive.read(retried[0]) == message(1)


def test_a_record_committed_after_the_names_were_read_keeps_its_blob(archive, monkeypatch):
    """Between reading the names and taking the chain lock: the records chained since are read
    again under the lock."""
    name = left_behind(archive, message(2))
    other = left_behind(archive, message(3))
    real = gc._named
    retried = []

    def named_then_commit(shard, shards, since_seq=None):  # noqa: ANN001, ANN202
        names = real(shard, shards, since_seq)
        if since_seq is None and not retried:
            retried.append(archive.record(message(2), direction="outbound", verdict="accepted"))
        return names

    monkeypatch.setattr(gc, "_named", named_then_commit)
    assert [f.name for f in gc.collect(archive.store, HOUR, "cli:test").removed] == [other]
    assert archive.store.path_of(name).exists() and archive.read(retried[0]) == message(2)


def test_a_file_written_anew_after_the_listing_is_young_again_and_stays(archive, monkeypatch):
    name = left_behind(archive, message(4))
    real = gc._files

    def files_then_touch(*a):  # noqa: ANN002, ANN202
        listed = list(real(*a))
        os.utime(archive.store.path_of(name))  # now
        return iter(listed)

    monkeypatch.setattr(gc, "_files", files_then_touch)
    assert gc.collect(archive.store, HOUR, "cli:test").removed == []
    assert archive.store.path_of(name).exists()


def test_a_writer_that_found_the_blob_before_gc_removed_it_writes_it_again(archive):
    """The other half of the race: the blob was on disk when the writer prepared (so it did
    not write it), gc removes it before the writer's commit; the writer, under the chain lock,
    finds it gone and writes it again — the record never names a missing blob."""
    name = left_behind(archive, message(5))
    prepared = archive.prepare(message(5))
    assert prepared.data is None  # found on disk: nothing to write
    assert [f.name for f in gc.collect(archive.store, HOUR, "cli:test").removed] == [name]
    rec = archive.record(message(5), direction="outbound", verdict="accepted", prepared=prepared)
    assert archive.read(rec) == message(5) and verify(archive.store) == []


@pytest.mark.parametrize(("text", "seconds"), [("90m", 5400), ("12h", 43200), ("7d", 604800), ("2w", 1209600),
                                               ("3600", 3600), ("3600s", 3600)])
def test_ages(text, seconds):
    assert gc.parse_age(text) == seconds


def test_verify_notes_them_and_gc_removes_them_from_the_command_line(cli_config, capsys):
    from gateway.cli import main
    from gateway.config import load
    from gateway.db import connect
    from gateway.db.models import AuditLog, database

    cfg = load(cli_config)
    connect(cfg.database.url)
    archive = Archive.from_config(cfg)
    rec = archive.record(message(1), direction="outbound", verdict="accepted")
    lost = left_behind(archive, message(2))
    database.close()
    capsys.readouterr()
    argv = ["-c", str(cli_config), "archive"]
    assert main([*argv, "verify", "--quiet"]) == 0  # a note, not a problem
    out = capsys.readouterr().out
    assert re.search(r"^unreferenced: 1 blob file\(s\), \d+ bytes, named by no record .*archive gc", out, re.M), out
    assert re.search(rf"^unreferenced: {lost} \(\d+ bytes, written 1970-01-01 00:00 UTC\)$", out, re.M), out
    assert "archive verify: OK" in out
    assert main([*argv, "verify", "--quiet", "--no-blobs"]) == 0
    assert "unreferenced" not in capsys.readouterr().out  # the files are not looked at then

    assert main([*argv, "gc", "--older-than", "30m"]) == 2
    assert "at least 1h" in capsys.readouterr().err
    assert main([*argv, "gc", "--older-than", "soon"]) == 2
    assert main([*argv, "gc", "--older-than", "7d", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove: {lost} (" in out and "archive gc: would remove 1 unreferenced" in out
    assert archive.store.path_of(lost).exists()
    assert main([*argv, "gc", "--older-than", "7d", "--actor", "cli:ops"]) == 0
    assert re.search(r"^archive gc: removed 1 unreferenced blob file\(s\) \(\d+ bytes\) older than 7d; 0 younger",
                     capsys.readouterr().out, re.M)
    assert not archive.store.path_of(lost).exists() and archive.store.path_of(rec.blob_path).exists()
    connect(cfg.database.url)
    [entry] = AuditLog.select().where(AuditLog.action == "archive.gc")
    assert entry.actor == "cli:ops" and json.loads(entry.details)["removed"] == 1
    assert [e["blobs"] for e in gc_events()] == [[lost]]
    database.close()
    assert main([*argv, "verify", "--quiet"]) == 0
    assert "unreferenced" not in capsys.readouterr().out
