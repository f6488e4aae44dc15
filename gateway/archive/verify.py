"""`mailgate archive verify`: the whole chain, the head, the checkpoints and every blob.

Problems are returned as one line each (empty list: intact).  What is detected:
- a record, sighting or event altered (its digest or its link no longer matches);
- one deleted or reordered (a gap in seq, or a broken prev_hash link);
- the tail cut (the head names a later seq) or the head rewritten as well (a checkpoint
  in the operation log names a seq/hash the chain no longer has);
- a record blanked as if purged without a chained purge event;
- an operation-log entry altered, deleted or reordered (its own chain: the checkpoints, the
  purges and the auditors' trail are there);
- a legal hold released or deleted in the hold table without a chained release (or one
  active there that no chained event placed) — purges keep the chained holds regardless;
- a blob missing, altered (AES-GCM tag), undecryptable (key removed) or not the content
  its record names (SHA-256);
- the tail cut and the head AND the newest operation-log checkpoints rewritten too: the
  anchors kept outside the database (gateway/archive/anchors.py) — ``chain-anchors.log`` in
  the archive directory (one line per checkpoint) and any ``anchors`` an auditor kept
  off-host — must each still name an entry with that hash; a missing anchors file (once
  the operation log says one was written), a malformed line, or an anchored operation-log
  checkpoint absent from the file is reported too;
- the operation log's newest entries deleted (its own links cannot show a cut at the end):
  the same file holds an ``oplog:ID:HASH`` line per checkpoint (the log's last entry before
  the checkpoint's own), and an auditor may give such anchors too; each must still name an
  entry with that hash.
Honest limit: whoever can rewrite both the database and the archive directory can still
cut the tail after the last anchor held off-host (``mailgate archive verify`` prints
``anchor: SEQ:HASH`` and ``anchor: oplog:ID:HASH``; keep them, or copy chain-anchors.log,
somewhere they cannot write).
Blocking; reads in batches, so memory stays flat for millions of rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from gateway.archive import anchors as anchors_mod
from gateway.archive import chain, original
from gateway.archive.schema import ArchiveEvent, ArchiveRecord, ArchiveSighting
from gateway.archive.store import BlobError, BlobStore
from gateway.db.models import AuditLog

CHECKPOINT_ACTION = "archive.checkpoint"
_BATCH = 5000


def _rows(batch: int, top: int) -> Iterator[tuple[int, str, object]]:
    """(seq, kind, row) of all three tables in seq order, up to ``top`` and anything after
    it that is not explained by writers appending meanwhile (rows past the head snapshot
    are checked only if the head is behind them at the end)."""
    lo = 1
    while lo <= top:
        hi = lo + batch
        rows: list[tuple[int, str, object]] = []
        for model, kind in ((ArchiveRecord, chain.RECORD), (ArchiveSighting, chain.SIGHTING),
                            (ArchiveEvent, chain.EVENT)):
            rows.extend((int(r.seq), kind, r) for r in model.select().where(
                (model.seq >= lo) & (model.seq < hi) & (model.seq <= top)))
        rows.sort(key=lambda t: (t[0], t[1]))
        yield from rows
        lo = hi


def _max_seq(model) -> int:
    row = model.select(model.seq).where(model.seq.is_null(False)).order_by(model.seq.desc()).first()
    return int(row.seq) if row else 0


def verify_chain(batch: int = _BATCH) -> list[str]:
    problems: list[str] = []
    purged_ids = {r.id for r in ArchiveRecord.select(ArchiveRecord.id).where(ArchiveRecord.purged_at.is_null(False))}
    tombstoned: set[int] = set()
    checkpoints = _checkpoints()
    seen_hash: dict[int, str] = {0: chain.GENESIS}  # a checkpoint of the empty chain
    unchained = ArchiveRecord.select().where(ArchiveRecord.seq.is_null()).count()
    if unchained:
        problems.append(f"archive: {unchained} record(s) outside the chain (inserted behind the archive's back)")
    # The head first: writers may append while we read; what they add is checked next time.
    head_seq, head_hash = chain.head()
    top = max(head_seq, *(_max_seq(m) for m in (ArchiveRecord, ArchiveSighting, ArchiveEvent))) \
        if head_seq == 0 else head_seq
    prev, expected = chain.GENESIS, 1
    for seq, kind, row in _rows(batch, top):
        if seq < expected:
            problems.append(f"archive chain: seq {seq} appears twice")
            continue
        if seq > expected:
            problems.append(f"archive chain: entries {expected}..{seq - 1} are missing (deleted)")
        if row.prev_hash != prev:
            problems.append(f"archive chain: {kind} {row.id} (seq {seq}) does not follow the entry before it")
        if chain.link(row.prev_hash, seq, kind, row.digest) != row.hash:
            problems.append(f"archive chain: {kind} {row.id} (seq {seq}) was altered (hash)")
        elif _fields_changed(kind, row, purged_ids):
            problems.append(f"archive chain: {kind} {row.id} (seq {seq}) was altered (fields)")
        if kind == chain.EVENT and row.kind == "purge":
            tombstoned.update(_purged_in(row))
        if seq in checkpoints:
            seen_hash[seq] = row.hash
        prev, expected = row.hash, seq + 1
    last = expected - 1
    beyond = max(_max_seq(m) for m in (ArchiveRecord, ArchiveSighting, ArchiveEvent))
    if beyond > top and chain.head()[0] < beyond:
        problems.append(f"archive chain: entries after {top} exist but the head does not name them")
    if head_seq != last or head_hash != prev:
        problems.append(f"archive chain: the head names entry {head_seq} but the chain ends at {last} "
                        "(entries at the end were deleted, or the head was altered)")
    for seq, h in sorted(checkpoints.items()):
        if seen_hash.get(seq) != h:
            problems.append(f"archive chain: checkpoint at entry {seq} (operation log) no longer matches "
                            "(the chain was rewritten or cut)")
    for rid in sorted(purged_ids - tombstoned):
        problems.append(f"archive: record {rid} is blanked as purged but no purge event names it")
    return problems


def _fields_changed(kind: str, row, purged_ids: set[int]) -> bool:
    if kind == chain.RECORD:
        return row.id not in purged_ids and chain.record_digest(row) != row.digest
    if kind == chain.SIGHTING:
        return row.record_id not in purged_ids and chain.sighting_digest(row) != row.digest
    return chain.event_digest(row) != row.digest


def _purged_in(event: ArchiveEvent) -> list[int]:
    try:
        return [int(i) for i in json.loads(event.details).get("records", [])]
    except (ValueError, TypeError, AttributeError):
        return []


def _checkpoints() -> dict[int, str]:
    """seq → hash of the chain-head checkpoints in the operation log."""
    return {a.seq: a.hash for a, _ in _checkpoint_rows()}


def _anchored() -> tuple[list[anchors_mod.Anchor], int]:
    """The anchors the operation log's checkpoints say they wrote to ``chain-anchors.log``
    (the chain head, and since op-log anchors exist the log's end before the checkpoint),
    and how many such checkpoints there are."""
    out: list[anchors_mod.Anchor] = []
    n = 0
    for a, d in _checkpoint_rows():
        if not d.get("anchored"):
            continue
        n += 1
        out.append(a)
        end = d.get("oplog_end")
        if isinstance(end, dict):
            try:
                out.append(anchors_mod.Anchor(int(end["id"]), str(end["hash"]), anchors_mod.OPLOG))
            except (KeyError, TypeError, ValueError):
                continue
    return out, n


def _checkpoint_rows() -> Iterator[tuple[anchors_mod.Anchor, dict]]:
    for row in AuditLog.select(AuditLog.details).where(AuditLog.action == CHECKPOINT_ACTION):
        try:
            d = json.loads(row.details)
            yield anchors_mod.Anchor(int(d["seq"]), str(d["hash"])), d
        except (ValueError, KeyError, TypeError, AttributeError):
            continue


def verify_blobs(store: BlobStore, batch: int = 1000,
                 progress: Callable[[int, int], None] | None = None) -> list[str]:
    problems: list[str] = []
    q = ArchiveRecord.select(ArchiveRecord.id, ArchiveRecord.blob_path, ArchiveRecord.sha256,
                             ArchiveRecord.original_sha256, ArchiveRecord.original).where(
        ArchiveRecord.purged_at.is_null())
    total = q.count()
    done, last_id = 0, 0
    while True:
        rows = list(q.where(ArchiveRecord.id > last_id).order_by(ArchiveRecord.id).limit(batch))
        if not rows:
            break
        for r in rows:
            try:
                raw = store.read(r.blob_path, r.sha256)
            except (BlobError, OSError) as exc:
                raw = _held_pending(store, r)  # no loss: its file is written again at the node's start
                if raw is None:
                    problems.append(f"archive: record {r.id}: "
                                    f"{exc if isinstance(exc, BlobError) else f'blob unreadable: {exc}'}")
                    continue
            if r.original_sha256:  # the submitted bytes kept beside changed outbound mail
                try:
                    original.restore(store, r.original or b"", r.original_sha256, raw)
                except BlobError as exc:
                    problems.append(f"archive: record {r.id}: {exc}")
        done += len(rows)
        last_id = rows[-1].id
        if progress:
            progress(done, total)
    return problems


def _held_pending(store: BlobStore, record: ArchiveRecord) -> bytes | None:
    """The content of ``record``'s blob from the database, where its sealed bytes are held
    until its file is written (gateway/archive/pending.py: after a node stopped uncleanly
    before its blob sync, its next start writes the file from them) — then a missing or torn
    file is no loss; else None."""
    from gateway.archive.pending import ArchivePendingBlob

    m = ArchivePendingBlob
    for row in m.select(m.data).where(m.name == record.blob_path):
        try:
            raw = store.decode(bytes(row.data), record.blob_path)
        except BlobError:
            continue
        if hashlib.sha256(raw).hexdigest() == record.sha256:
            return raw
    return None


def verify(store: BlobStore | None, blobs: bool = True,
           progress: Callable[[int, int], None] | None = None,
           anchors: Iterable[anchors_mod.Anchor] = (), directory: Path | None = None) -> list[str]:
    """The chain, the holds, the operation log's own chain (where the checkpoints, purges and
    the auditors' trail are), the anchors (``chain-anchors.log`` in ``directory``, default the
    store's directory, i.e. the archive directory; plus ``anchors`` kept off-host) and the blobs."""
    from gateway import oplog
    from gateway.archive.retention import hold_problems

    problems = verify_chain() + hold_problems() + oplog.verify()
    problems += verify_anchors(directory if directory is not None else store.directory if store else None,
                               anchors)
    if blobs and store is not None:
        problems += verify_blobs(store, progress=progress)
    return problems


def verify_anchors(directory: Path | None, anchors: Iterable[anchors_mod.Anchor] = ()) -> list[str]:
    """Anchors kept outside the database (gateway/archive/anchors.py); ``directory`` None:
    only ``anchors``."""
    anchored, checkpoints = _anchored()
    return anchors_mod.verify(directory, anchors, anchored, checkpoints)


def checkpoint_needed() -> bool:
    """Whether anything was archived or logged since the last checkpoint: False when the
    operation log's newest entry is a checkpoint of the chain's current head (a node's
    periodic checkpoint then writes nothing, and an idle archive gathers no lines)."""
    last = AuditLog.select(AuditLog.action, AuditLog.details).order_by(AuditLog.id.desc()).first()
    if last is None or last.action != CHECKPOINT_ACTION:
        return True
    try:
        details = json.loads(last.details)
    except ValueError:
        return True
    seq, h = chain.head()
    return not (isinstance(details, dict) and details.get("seq") == seq and details.get("hash") == h)


def checkpoint(actor: str = "system", directory: Path | None = None) -> tuple[int, str]:
    """Record the chain head in the (separately chained) operation log and, with the
    archive ``directory``, first in its ``chain-anchors.log`` (fsynced): one line for the
    chain head, one for the operation log's end.  The log's anchor names its last entry
    BEFORE this checkpoint's own entry (that one's hash is not known until it is written;
    the next checkpoint covers it), so every anchored entry is already committed."""
    from gateway import oplog

    seq, h = chain.head()
    details: dict[str, object] = {"seq": seq, "hash": h}
    if directory is not None:
        end_id, end_hash = oplog.head()
        anchors_mod.append(directory, [anchors_mod.Anchor(seq, h),
                                       anchors_mod.Anchor(end_id, end_hash, anchors_mod.OPLOG)])
        details["anchored"] = True  # from now on verify requires the file
        details["oplog_end"] = {"id": end_id, "hash": end_hash}  # ... and this line in it
    oplog.record(actor, CHECKPOINT_ACTION, f"seq {seq}", details)
    return seq, h
