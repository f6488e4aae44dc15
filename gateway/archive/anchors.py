"""Chain anchors kept outside the database: ``chain-anchors.log`` in the archive directory.

Everything ``verify`` checks otherwise lives in one database, so someone who can write it
can delete the newest chain entries, rewrite ``archivechainhead`` and delete the newest
``archive.checkpoint`` rows of the operation log — and the chain still verifies.  An anchor
is a (seq, hash) pair kept elsewhere: each checkpoint (daily in the node, after every
successful ``mailgate archive verify``) appends one line ``SEQ:HASH UTC-TIME`` to this file
(append, fsync; on creation the directory is fsynced too), and ``mailgate archive verify
--anchor SEQ:HASH`` checks pairs an auditor kept off-host.  For every anchor the chain must
still hold entry ``seq`` with exactly that hash: a seq past the chain's end means the tail
was cut, another hash means the chain was rewritten.

Limit: the file sits beside the blobs; whoever can rewrite both the database and this
directory can still cut the tail after the last anchor held off-host (see the archive
README, "Anchors").
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gateway.archive import chain
from gateway.archive.schema import ArchiveChainHead, ArchiveEvent, ArchiveRecord, ArchiveSighting

FILE_NAME = "chain-anchors.log"
_HASH = re.compile(r"[0-9a-f]{64}")
_CHUNK = 500  # seqs per IN (...) look-up


class AnchorError(ValueError):
    """A malformed anchor (``SEQ:HASH``)."""


@dataclass(frozen=True)
class Anchor:
    seq: int
    hash: str

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"


def parse(text: str) -> Anchor:
    """``SEQ:HASH`` (what ``verify`` and ``head`` print after ``anchor:``) → Anchor."""
    seq_text, sep, h = text.strip().partition(":")
    h = h.strip().lower()
    if not sep or not seq_text.strip().isdigit() or not _HASH.fullmatch(h):
        raise AnchorError(f"not an anchor (SEQ:HASH, HASH 64 hex digits): {text.strip()[:100]!r}")
    return Anchor(int(seq_text), h)


def path_in(directory: Path) -> Path:
    return Path(directory) / FILE_NAME


def append(directory: Path, anchor: Anchor, at: dt.datetime | None = None) -> Path:
    """Append one line and fsync it (and the directory when the file is new)."""
    path = path_in(directory)
    when = (at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    line = f"{anchor} {when}\n".encode("ascii")
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, line)  # one write of < 100 bytes: the line lands whole
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


def read(directory: Path) -> tuple[list[tuple[int, Anchor]], list[str]] | None:
    """(line number, anchor) of every line, and one problem per malformed line; None: no file."""
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
                raise AnchorError("expected SEQ:HASH TIME")
            dt.datetime.strptime(fields[1], "%Y-%m-%dT%H:%M:%SZ")
            out.append((n, parse(fields[0])))
        except ValueError:
            problems.append(f"archive anchors: {path} line {n} is malformed: {line[:120]!r}")
    return out, problems


def check(anchors: Iterable[tuple[str, Anchor]]) -> list[str]:
    """(where it came from, anchor) → one problem per anchor the chain no longer matches."""
    by_seq: dict[int, list[tuple[str, Anchor]]] = {}
    for source, a in anchors:
        by_seq.setdefault(a.seq, []).append((source, a))
    found = _hashes(sorted(s for s in by_seq if s > 0))
    found[0] = chain.GENESIS  # seq 0: the empty chain
    end = _chain_end()
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
                why = (f"the chain ends at entry {end}: entries at the end were deleted (the tail was cut) "
                       "and the head rewritten")
            elif h is None:
                why = f"entry {seq} is missing (deleted)"
            else:
                why = f"entry {seq} has another hash now (the chain was rewritten)"
            problems.append(f"archive anchor {seq}:{a.hash[:16]}… ({source}) no longer matches: {why}")
    return problems


def verify(directory: Path | None, extra: Iterable[Anchor] = (), anchored: dict[int, str] | None = None) -> list[str]:
    """Check the anchors file in ``directory`` (None: only ``extra``) and the anchors in
    ``extra`` (given by an auditor).  ``anchored``: seq → hash of the operation-log
    checkpoints that say they were written to the file — it must exist once there is one,
    and must hold every one."""
    problems: list[str] = []
    todo: list[tuple[str, Anchor]] = [("given with --anchor", a) for a in extra]
    anchored = anchored or {}
    if directory is not None:
        got = read(directory)
        path = path_in(directory)
        if got is None:
            if anchored:
                problems.append(f"archive anchors: {path} is missing (anchors file missing) but the operation "
                                f"log has {len(anchored)} anchored checkpoint(s): the file was deleted")
        else:
            lines, problems = got
            todo += [(f"{FILE_NAME} line {n}", a) for n, a in lines]
            have = {(a.seq, a.hash) for _, a in lines}
            for seq, h in sorted(anchored.items()):
                if (seq, h) not in have:
                    problems.append(f"archive anchors: the operation log's checkpoint at entry {seq} is not in "
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
