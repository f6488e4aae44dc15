"""Blob files no record names: found by ``mailgate archive verify`` ("unreferenced"), removed
by ``mailgate archive gc --older-than AGE``.

A blob is written before the rows that name it are committed (gateway/archive/__init__.py),
so a batch whose transaction fails — a refused message, a COMMIT that failed, a crash in
between — leaves its new blob files behind: harmless (content-addressed: the same message
archived again finds and uses the file), but disk.  Also left: a writer's temporary file
(``<name>.<pid>.<thread>.tmp``) after a crash.

Named — never removed — are the blobs of every ``archiverecord`` row (purged ones too: their
files are retention's to delete, ``retention._sweep``), of every ``archivependingblob`` row,
and of the queued or held queue rows backed by a blob (``spool.archive_ref``).

Order, against writers that write the file first and commit the record after:
  1. the blob folders are listed and every file's age taken (one shard of the 256 folders at
     a time, so the names held in memory stay bounded on a large archive);
  2. the chain head's seq is noted, then every name the database holds is read;
  3. per chunk of old candidates, in a write transaction holding the chain lock — which every
     record's insert takes, so no record commits meanwhile — the records chained after that
     seq are read again, each file's age taken again (a file written anew since the listing
     is young again) and the still unnamed old files unlinked; a chained ``gc`` event (the
     names, their bytes, the limit) is appended in the same transaction.
A writer that committed before (3) is seen in (2) or (3).  One that commits after (3) checks,
under the chain lock, that a blob it found already on disk is still there and writes it
again if not (``Archive._chain``); a blob it wrote itself is younger than the limit, which
is why the limit may not be under ``MIN_AGE``.  A crash between the unlinks of a chunk and
its commit loses that chunk's event, never a named blob.
Blocking: run from the CLI or a worker thread.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from gateway.archive import chain
from gateway.archive.schema import ArchiveRecord
from gateway.archive.store import BlobStore
from gateway.groupcommit import write_transaction

log = logging.getLogger("mailgate.archive")

MIN_AGE = 3600.0  # seconds: a younger blob may belong to a transaction still under way
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """``90m``, ``12h``, ``7d``, ``2w``, ``3600s`` or bare seconds, in seconds; ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if m is None:
        raise ValueError(f"not an age: {text!r} (say 90m, 12h, 7d, 2w)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]
SHARD_RECORDS = 250_000  # records whose names one shard holds in memory, about
CHUNK = 500  # candidates per deleting transaction
_FOLDER = re.compile(r"[0-9a-f]{2}")


@dataclass(frozen=True)
class BlobFile:
    """A file in the blob folders: ``name`` as a record names it (``ab…``, legacy ``ab/cd/<sha256>``;
    a temporary file's own name), where it is, its size and modification time."""

    name: str
    path: str
    size: int
    mtime: float


@dataclass
class Collected:
    """What ``collect`` did: the files removed (or, ``dry_run``, that would be), and the
    unreferenced files it kept for being younger than the limit."""

    removed: list[BlobFile] = field(default_factory=list)
    young: int = 0
    dry_run: bool = False

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.removed)


def _shards() -> int:
    return min(16, 1 + ArchiveRecord.select().count() // SHARD_RECORDS)


def _shard_of(name: str, shards: int) -> int:
    return int(name[0], 16) % shards


def _files(store: BlobStore, shard: int, shards: int) -> Iterator[BlobFile]:
    """Step 1: the files of the folders of ``shard``, with their size and age."""
    try:
        with os.scandir(store.directory) as entries:
            folders = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False) and _FOLDER.fullmatch(e.name))
    except FileNotFoundError:
        return
    for folder in folders:
        if _shard_of(folder, shards) != shard:
            continue
        yield from _listed(store.directory / folder, folder)


def _listed(path: os.PathLike, prefix: str) -> Iterator[BlobFile]:
    try:
        with os.scandir(path) as entries:
            listed = list(entries)
    except FileNotFoundError:
        return
    for e in listed:
        try:
            if e.is_dir(follow_symlinks=False):
                if "/" not in prefix and _FOLDER.fullmatch(e.name):  # legacy ab/cd/<sha256>
                    yield from _listed(e.path, f"{prefix}/{e.name}")
                continue
            if not e.is_file(follow_symlinks=False):
                continue
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:  # removed meanwhile
            continue
        name = e.name if "/" not in prefix else f"{prefix}/{e.name}"
        yield BlobFile(name, e.path, st.st_size, st.st_mtime)


def _named(shard: int, shards: int, since_seq: int | None = None) -> set[str]:
    """The blob names the database holds (step 2), of ``shard``; ``since_seq``: of the records
    chained after it only (step 3), with the pending blobs and the queue's again."""
    from gateway.archive.pending import ArchivePendingBlob
    from gateway.db.models import OutboundMessage
    from gateway.spool import ARCHIVE_PREFIX, parse_archive_ref

    names: set[str] = set()

    def add(name: str) -> None:
        if name and _shard_of(name, shards) == shard:
            names.add(name)

    r = ArchiveRecord
    if since_seq is not None:
        for (name,) in r.select(r.blob_path).where(r.seq > since_seq).tuples():
            add(name)
    else:
        last = 0
        while True:
            rows = list(r.select(r.id, r.blob_path).where(r.id > last).order_by(r.id).limit(5000).tuples())
            if not rows:
                break
            last = rows[-1][0]
            for _, name in rows:
                add(name)
    for (name,) in ArchivePendingBlob.select(ArchivePendingBlob.name).tuples():
        add(name)
    m = OutboundMessage
    for (path,) in m.select(m.spool_path).where(m.state.in_(["queued", "held"])
                                                & m.spool_path.startswith(ARCHIVE_PREFIX)).tuples():
        ref = parse_archive_ref(path)
        if ref is not None:
            add(ref[0])
    return names


def _unreferenced_in(store: BlobStore, shard: int, shards: int) -> tuple[list[BlobFile], int]:
    """Steps 1 and 2 for one shard: its unreferenced files, and the chain's seq read before
    the names were."""
    listed = list(_files(store, shard, shards))
    if not listed:
        return [], 0
    seq = chain.head()[0]
    named = _named(shard, shards)
    return [f for f in listed if f.name not in named], seq


def unreferenced(store: BlobStore) -> Iterator[BlobFile]:
    """Every blob file no record (nor pending blob, nor queued message) names — for ``verify``;
    whatever their age (a young one may still be named by a commit under way)."""
    shards = _shards()
    for shard in range(shards):
        yield from _unreferenced_in(store, shard, shards)[0]


def collect(store: BlobStore, older_than: float, actor: str, *, dry_run: bool = False) -> Collected:
    """Remove the unreferenced blob files older than ``older_than`` seconds (at least
    ``MIN_AGE``); each deleting transaction appends a chained ``gc`` event.  ``dry_run``:
    only say which."""
    if older_than < MIN_AGE:
        raise ValueError(f"the age limit must be at least {MIN_AGE:.0f} s: a younger blob may belong to a"
                         " transaction still under way")
    result = Collected(dry_run=dry_run)
    shards = _shards()
    for shard in range(shards):
        found, seq = _unreferenced_in(store, shard, shards)
        cutoff = time.time() - older_than
        old = [f for f in found if f.mtime < cutoff]
        result.young += len(found) - len(old)
        if dry_run:
            result.removed.extend(old)
            continue
        for start in range(0, len(old), CHUNK):
            result.removed.extend(_remove(old[start:start + CHUNK], shard, shards, seq, cutoff,
                                          actor, older_than))
    if result.removed and not dry_run:
        log.info("archive gc: removed %d unreferenced blob file(s), %d bytes, older than %d s; %d younger kept",
                 len(result.removed), result.bytes, older_than, result.young)
    return result


def _remove(chunk: list[BlobFile], shard: int, shards: int, seq: int, cutoff: float,
            actor: str, older_than: float) -> list[BlobFile]:
    """Step 3 for one chunk (see the module docstring)."""
    removed: list[BlobFile] = []
    with write_transaction():
        chain.lock()
        named = _named(shard, shards, since_seq=seq)
        for f in chunk:
            if f.name in named:
                continue
            try:
                if os.stat(f.path).st_mtime >= cutoff:  # written anew since the listing
                    continue
                os.unlink(f.path)
            except FileNotFoundError:
                continue
            removed.append(f)
        if removed:
            chain.append_event("gc", actor, f"{len(removed)} blobs", {
                "blobs": [f.name for f in removed], "bytes": sum(f.size for f in removed),
                "older_than_seconds": int(older_than)})
    return removed
