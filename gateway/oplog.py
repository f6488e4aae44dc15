"""The operation log (操作日志): who did what, when — append-only and hash-chained.

Every panel change, every approval decision and every auditor search, view and
download is one ``AuditLog`` row.  Each row's hash covers its own fields and the
previous row's hash, so editing or deleting a row breaks the chain and ``verify``
names the first row where it breaks; a cut at the end (the newest rows deleted) is seen
only against an anchor kept elsewhere (``head`` → ``chain-anchors.log``, see
gateway/archive/anchors.py).  Writers are serialized (SQLite: an IMMEDIATE
transaction; PostgreSQL: a transaction-scoped advisory lock) so the chain never forks.
Blocking: call from a worker thread.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterator
from typing import Any

from gateway.db import is_postgres
from gateway.db.models import AuditLog, database, utcnow

GENESIS = "0" * 64
_PG_LOCK_KEY = 0x6D61696C  # "mail": the advisory lock that serializes chain writers


def _digest(prev_hash: str, at: dt.datetime, actor: str, action: str, target: str, details: str) -> str:
    payload = json.dumps([prev_hash, at.isoformat(timespec="microseconds"), actor, action, target, details],
                         ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _details_text(details: Any) -> str:
    if details is None:
        return ""
    if isinstance(details, str):
        return details
    return json.dumps(details, ensure_ascii=False, sort_keys=True, default=str)


def record(actor: str, action: str, target: str = "", details: Any = None) -> AuditLog:
    """Append one entry.  ``details`` is text or anything JSON can carry (never secrets)."""
    text = _details_text(details)
    at = utcnow()
    db = database.obj
    if is_postgres():
        with db.atomic():
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_PG_LOCK_KEY,))
            return _append(at, actor, action, target, text)
    if db.in_transaction():  # inside a caller's transaction (e.g. an approval decision)
        return _append(at, actor, action, target, text)
    with db.atomic(lock_type="IMMEDIATE"):
        return _append(at, actor, action, target, text)


def _append(at: dt.datetime, actor: str, action: str, target: str, details: str) -> AuditLog:
    last = AuditLog.select(AuditLog.hash).order_by(AuditLog.id.desc()).first()
    prev = last.hash if last else GENESIS
    return AuditLog.create(at=at, actor=actor[:320], action=action[:100], target=target[:500],
                           details=details, prev_hash=prev,
                           hash=_digest(prev, at, actor[:320], action[:100], target[:500], details))


def head() -> tuple[int, str]:
    """(id, hash) of the last committed entry; (0, GENESIS) when the log is empty.  The
    archive's checkpoints write it to ``chain-anchors.log`` (gateway/archive/anchors.py) so a
    cut at the log's end is seen: the chain's own links cannot show a missing tail."""
    last = AuditLog.select(AuditLog.id, AuditLog.hash).order_by(AuditLog.id.desc()).first()
    return (int(last.id), last.hash) if last else (0, GENESIS)


def verify(batch: int = 5000) -> list[str]:
    """Walk the chain; return one line per problem (empty: intact)."""
    problems: list[str] = []
    prev = GENESIS
    for row in _rows(batch):
        if row.prev_hash != prev:
            problems.append(f"operation log: entry {row.id} does not follow the one before it "
                            "(an entry was deleted or reordered)")
        expected = _digest(row.prev_hash, row.at, row.actor, row.action, row.target, row.details)
        if row.hash != expected:
            problems.append(f"operation log: entry {row.id} was altered")
        prev = row.hash
    return problems


def _rows(batch: int) -> Iterator[AuditLog]:
    last_id = 0
    while True:
        rows = list(AuditLog.select().where(AuditLog.id > last_id).order_by(AuditLog.id).limit(batch))
        if not rows:
            return
        yield from rows
        last_id = rows[-1].id


def search(*, actor: str = "", action: str = "", target: str = "", since: dt.datetime | None = None,
           until: dt.datetime | None = None, limit: int = 50, offset: int = 0) -> tuple[list[AuditLog], int]:
    """Newest first, filtered; returns (page, total)."""
    q = AuditLog.select()
    if actor:
        q = q.where(AuditLog.actor.contains(actor))
    if action:
        q = q.where(AuditLog.action.startswith(action))
    if target:
        q = q.where(AuditLog.target.contains(target))
    if since:
        q = q.where(AuditLog.at >= since)
    if until:
        q = q.where(AuditLog.at < until)
    total = q.count()
    return list(q.order_by(AuditLog.id.desc()).limit(limit).offset(offset)), total
