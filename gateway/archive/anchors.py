"""Anchors kept outside the database: ``chain-anchors.log`` in the archive directory.

Everything ``verify`` checks otherwise lives in one database, so someone who can write it
can delete the newest chain entries, rewrite ``archivechainhead`` and delete the newest
``archive.checkpoint`` rows of the operation log — and the chain still verifies; likewise
they can delete the newest operation-log rows (the auditors' own trail, a purge's entry) and
the log's own chain still verifies.  An anchor is an (entry, hash) pair kept elsewhere, in
one of two kinds:

- ``SEQ:HASH`` — the archive chain's entry ``seq``;
- ``oplog:ID:HASH`` — the operation log's entry ``id`` (``oplog:0:<GENESIS>``: the empty log).

Each checkpoint (hourly in the node when anything changed, ``[archive] checkpoint_interval``;
after every successful ``mailgate archive verify``)
appends, in one write, one line ``SEQ:HASH UTC-TIME`` (the chain head) and one line
``oplog:ID:HASH UTC-TIME`` (the operation log's last entry *before* the checkpoint's own
entry, which is written afterwards and so is covered by the next checkpoint) to this file
(append, fsync; on creation the directory is fsynced too).  Files written before op-log
anchors existed hold only the first kind and stay valid.  ``mailgate archive verify
--anchor A`` checks anchors of either kind an auditor kept off-host.  For every anchor the
chain (or the log) must still hold that entry with exactly that hash: an entry past the end
means the tail was cut, another hash means it was rewritten.

Limit: the file sits beside the blobs; whoever can rewrite both the database and this
directory can still cut the tail after the last anchor held off-host (see the archive
README, "Anchors").
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway import oplog
from gateway.archive import chain
from gateway.archive.schema import ArchiveChainHead, ArchiveEvent, ArchiveRecord, ArchiveSighting
from gateway.db.models import AuditLog

FILE_NAME = "chain-anchors.log"
CHAIN = "chain"
OPLOG = "oplog"
_OPLOG_PREFIX = "oplog:"
_HASH = re.compile(r"[0-9a-f]{64}")
_CHUNK = 500  # seqs per IN (...) look-up


class AnchorError(ValueError):
    """A malformed anchor (``SEQ:HASH`` or ``oplog:ID:HASH``)."""


@dataclass(frozen=True)
class Anchor:
    seq: int  # the chain's seq, or the operation log's entry id (log == OPLOG)
    hash: str
    log: str = CHAIN

    def __str__(self) -> str:
        return f"{_OPLOG_PREFIX if self.log == OPLOG else ''}{self.seq}:{self.hash}"


def parse(text: str) -> Anchor:
    """``SEQ:HASH`` or ``oplog:ID:HASH`` (what ``verify`` and ``head`` print after ``anchor:``) → Anchor."""
    body, log = text.strip(), CHAIN
    if body.lower().startswith(_OPLOG_PREFIX):
        body, log = body[len(_OPLOG_PREFIX):], OPLOG
    seq_text, sep, h = body.partition(":")
    h = h.strip().lower()
    if not sep or not seq_text.strip().isdigit() or not _HASH.fullmatch(h):
        raise AnchorError("not an anchor (SEQ:HASH or oplog:ID:HASH, HASH 64 hex digits): "
                          f"{text.strip()[:100]!r}")
    return Anchor(int(seq_text), h, log)


def path_in(directory: Path) -> Path:
    return Path(directory) / FILE_NAME


def append(directory: Path, anchors: Anchor | Sequence[Anchor], at: dt.datetime | None = None) -> Path:
    """Append one line per anchor in ONE write, and fsync it (and the directory when the
    file is new)."""
    path = path_in(directory)
    when = (at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    items = [anchors] if isinstance(anchors, Anchor) else list(anchors)
    data = "".join(f"{a} {when}\n" for a in items).encode("ascii")
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        written = os.write(fd, data)  # one write of a few hundred bytes: the lines land whole, together
        if written != len(data):  # a short write: the file system is full
            _cut(fd, written)
            raise OSError(errno.ENOSPC, f"{path}: only {written} of {len(data)} bytes appended "
                                        f"({os.strerror(errno.ENOSPC)})")
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


def _cut(fd: int, written: int) -> None:
    """Take a short write's fragment (the end of the file) off again, so that no torn line
    stays behind for ``verify`` to report: unless another writer appended meanwhile."""
    try:
        end = os.fstat(fd).st_size
        if written > 0 and os.lseek(fd, 0, os.SEEK_CUR) == end:
            os.ftruncate(fd, end - written)
    except OSError:
        pass


def read(directory: Path) -> tuple[list[tuple[int, Anchor]], list[str]] | None:
    """(line number, anchor) of every line (either kind), and one problem per malformed
    line; None: no file."""
    path = path_in(directory)
    try:
        text = path.read_text("ascii", errors="replace")
    except FileNotFoundError:
        return None
    out: list[tuple[int, Anchor]] = []
    problems: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        try:
            if len(fields) != 2:
                raise AnchorError("expected ANCHOR TIME")
            dt.datetime.strptime(fields[1], "%Y-%m-%dT%H:%M:%SZ")
            out.append((n, parse(fields[0])))
        except ValueError:
            problems.append(f"archive anchors: {path} line {n} is malformed: {line[:120]!r}")
    return out, problems


def check(anchors: Iterable[tuple[str, Anchor]]) -> list[str]:
    """(where it came from, anchor) → one problem per anchor the chain (or, for op-log
    anchors, the operation log) no longer matches."""
    todo = list(anchors)
    problems = _check([t for t in todo if t[1].log == CHAIN], _hashes, _chain_end(), chain.GENESIS,
                      "archive anchor", "the chain")
    problems += _check([t for t in todo if t[1].log == OPLOG], _oplog_hashes, oplog.head()[0], oplog.GENESIS,
                       "operation-log anchor", "the operation log")
    return problems


def _check(anchors: list[tuple[str, Anchor]], lookup: Callable[[list[int]], dict[int, str]], end: int,
           genesis: str, label: str, what: str) -> list[str]:
    by_seq: dict[int, list[tuple[str, Anchor]]] = {}
    for source, a in anchors:
        by_seq.setdefault(a.seq, []).append((source, a))
    found = lookup(sorted(s for s in by_seq if s > 0))
    found[0] = genesis  # 0: the empty chain / log
    problems: list[str] = []
    for seq in sorted(by_seq):
        seen: set[str] = set()
        for source, a in by_seq[seq]:
            if a.hash in seen:  # the same pair from several lines: one report
                continue
            seen.add(a.hash)
            h = found.get(seq)
            if h == a.hash:
                continue
            if h is None and seq > end:
                why = (f"{what} ends at entry {end}: entries at the end were deleted (the tail was cut)"
                       + (" and the head rewritten" if a.log == CHAIN else ""))
            elif h is None:
                why = f"entry {seq} is missing (deleted)"
            else:
                why = f"entry {seq} has another hash now ({what} was rewritten)"
            problems.append(f"{label} {a.seq}:{a.hash[:16]}… ({source}) no longer matches: {why}")
    return problems


def verify(directory: Path | None, extra: Iterable[Anchor] = (), anchored: Iterable[Anchor] = (),
           checkpoints: int = 0) -> list[str]:
    """Check the anchors file in ``directory`` (None: only ``extra``) and the anchors in
    ``extra`` (given by an auditor).  ``anchored``: the anchors the operation log's
    checkpoints (``checkpoints`` of them) say they wrote to the file — it must exist once
    there is one, and must hold every one."""
    problems: list[str] = []
    todo: list[tuple[str, Anchor]] = [("given with --anchor", a) for a in extra]
    anchored = sorted(set(anchored), key=lambda a: (a.log, a.seq, a.hash))
    if directory is not None:
        got = read(directory)
        path = path_in(directory)
        if got is None:
            if anchored:
                problems.append(f"archive anchors: {path} is missing (anchors file missing) but the operation "
                                f"log has {checkpoints or len(anchored)} anchored checkpoint(s): the file was deleted")
        else:
            lines, problems = got
            todo += [(f"{FILE_NAME} line {n}", a) for n, a in lines]
            have = {a for _, a in lines}
            for a in anchored:
                if a not in have:
                    which = (f"checkpoint at entry {a.seq}" if a.log == CHAIN
                             else f"checkpoint's anchor of its own end (entry {a.seq})")
                    problems.append(f"archive anchors: the operation log's {which} is not in "
                                    f"{path} (lines were removed or the file was replaced)")
    return problems + check(todo)


def _hashes(seqs: list[int]) -> dict[int, str]:
    out: dict[int, str] = {}
    for i in range(0, len(seqs), _CHUNK):
        part = seqs[i:i + _CHUNK]
        for model in (ArchiveRecord, ArchiveSighting, ArchiveEvent):
            for r in model.select(model.seq, model.hash).where(model.seq.in_(part)):
                out[int(r.seq)] = r.hash
    return out


def _chain_end() -> int:
    head = ArchiveChainHead.get_or_none(ArchiveChainHead.id == 1)
    ends = [int(head.seq) if head else 0]
    for model in (ArchiveRecord, ArchiveSighting, ArchiveEvent):
        row = model.select(model.seq).where(model.seq.is_null(False)).order_by(model.seq.desc()).first()
        ends.append(int(row.seq) if row else 0)
    return max(ends)


def _oplog_hashes(ids: list[int]) -> dict[int, str]:
    out: dict[int, str] = {}
    for i in range(0, len(ids), _CHUNK):
        for r in AuditLog.select(AuditLog.id, AuditLog.hash).where(AuditLog.id.in_(ids[i:i + _CHUNK])):
            out[int(r.id)] = r.hash
    return out

