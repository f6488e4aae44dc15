"""The archive hash chain over records, sightings and events.

Every chained row has ``seq`` (global, 1, 2, 3 … without gaps across the three tables),
``digest`` = SHA-256 of its own fields (canonical JSON, fixed order) and
``hash = SHA-256(json([prev_hash, seq, kind, digest]))`` with ``prev_hash`` the hash of
seq - 1 (GENESIS for seq 1).  Altering a field changes the digest; deleting or reordering
a row leaves a gap or a broken link; ``ArchiveChainHead`` names the last seq, so a cut
tail is seen too (and checkpoints in the operation log catch a rewritten head).

A purge does not delete rows: it blanks a record's and its sightings' fields and deletes
the blob, keeping ``digest`` — the chain still verifies, and a chained ``purge`` event
names every purged record, so blanking without such an event is reported.

Writers are serialized by the first statement of ``_advance``: an UPDATE of the single
head row.  On PostgreSQL the row lock is held to commit; on SQLite the UPDATE takes the
database write lock.  Call inside a transaction (the group-commit transaction counts):
seq allocation and the row insert then commit or roll back together.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from gateway.archive.schema import ArchiveChainHead, ArchiveEvent, ArchiveRecord, ArchiveSighting
from gateway.db.inserts import insert_row, prefetch_ids
from gateway.db.models import database, utcnow
from gateway.groupcommit import write_transaction

GENESIS = "0" * 64

RECORD, SIGHTING, EVENT = "record", "sighting", "event"


def _ts(value: dt.datetime | None) -> str:
    return value.isoformat(timespec="microseconds") if value is not None else ""


# json.dumps with any non-default argument builds a new JSONEncoder per call; the same
# encoder, once (encode() keeps no state between calls).
_CANON_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode


def _canon(values: list[Any]) -> str:
    return hashlib.sha256(_CANON_JSON(values).encode("utf-8")).hexdigest()


def record_digest(r: ArchiveRecord) -> str:
    """The fields a record's hash covers (not key_id/stored_size/blob_path: a re-encryption
    may change those; the blob's content is checked against ``sha256`` instead).  The hash of
    the submitted original is covered when there is one (records before migration 154, and
    mail the gateway did not change, keep their digests)."""
    fields = [RECORD, _ts(r.created_at), r.sha256, int(r.size), r.direction, r.verdict, r.mail_from,
              r.recipients, r.subject, r.message_id, r.reason, r.trace, r.queue_id]
    if r.original_sha256:
        fields.append(r.original_sha256)
    return _canon(fields)


def sighting_digest(s: ArchiveSighting) -> str:
    return _canon([SIGHTING, int(s.record_id), _ts(s.seen_at), s.place, s.direction, s.verdict, s.reason,
                   s.trace, s.queue_id, s.employee_email, s.mail_from, s.recipients, s.ref])


def event_digest(e: ArchiveEvent) -> str:
    return _canon([EVENT, _ts(e.at), e.kind, e.actor, e.target, e.details])


def link(prev_hash: str, seq: int, kind: str, digest: str) -> str:
    return _canon([prev_hash, int(seq), kind, digest])


_batch = threading.local()

_PENDING = "pending"  # a lazy batch whose head has not been read yet


@contextmanager
def batch(lazy: bool = False) -> Iterator[None]:
    """Inside the caller's transaction: lock the head once, chain every append in memory,
    write the head once at the end (a batch ingest saves three statements per row).  If the
    block raises, the head is not written — the caller's transaction must then roll back.

    ``lazy``: lock and read the head only when the first append (or ``lock()``) needs it, and
    write it only if something was appended — for a group commit whose batch may hold no
    archive work at all.  Inside a batch, wrap each unit that may roll back on its own (a
    savepoint) in ``savepoint()`` so the in-memory head follows the rollback."""
    if getattr(_batch, "state", None) is not None:  # nested: the outer batch writes the head
        yield
        return
    state = _batch.state = [_PENDING] if lazy else _load_head()
    try:
        yield
    finally:
        _batch.state = None
    if state[0] is not _PENDING and state[2]:
        database.execute_sql(_head_sql("write"), [state[0], state[1]])


_HEAD_SQL: dict[tuple[type, str], str] = {}


def _head_sql(kind: str) -> str:
    """The head row's batch statements, their texts built once per backend (peewee
    building them cost more CPU than running them; a group commit runs them per batch)."""
    db = database.obj
    sql = _HEAD_SQL.get((type(db), kind))
    if sql is None:
        q = db.quote
        table = f"{q[0]}{ArchiveChainHead._meta.table_name}{q[1]}"
        seq, hash_, id_ = (f"{q[0]}{name}{q[1]}" for name in ("seq", "hash", "id"))
        sql = _HEAD_SQL[(type(db), kind)] = {
            "lock": f"UPDATE {table} SET {seq} = {seq} WHERE {id_} = 1",
            # Lock and read in one statement (SQLite ≥ 3.35 and PostgreSQL know RETURNING).
            "lock+read": f"UPDATE {table} SET {seq} = {seq} WHERE {id_} = 1 RETURNING {seq}, {hash_}",
            "write": f"UPDATE {table} SET {seq} = {db.param}, {hash_} = {db.param} WHERE {id_} = 1",
        }[kind]
    return sql


def _load_head() -> list:
    """Lock the head row and read it: [seq, hash, changed]."""
    rows = database.execute_sql(_head_sql("lock+read")).fetchall()  # all: the statement ends
    row = rows[0] if rows else None
    if row is None:
        raise ArchiveChainHead.DoesNotExist("archive chain head row missing (migration 100 not applied?)")
    return [int(row[0]), row[1], False]


def _state() -> list | None:
    """The current batch's head state (loaded now if the batch is lazy), or None outside a batch.
    Once the lock is held, the ids of the batch's rows are drawn (``prefetch_ids``)."""
    state = getattr(_batch, "state", None)
    if state is not None and state[0] is _PENDING:
        state[:] = _load_head()
        prefetch_ids()
    return state


@contextmanager
def savepoint() -> Iterator[None]:
    """Inside ``batch()``: if the block raises (its savepoint rolled back), the in-memory head
    goes back to where it was, so the next append links to the last row that stays."""
    state = getattr(_batch, "state", None)
    saved = list(state) if state is not None else None
    try:
        yield
    except BaseException:
        if state is not None and saved is not None:
            state[:] = saved
        raise


def _advance(kind: str, digest: str) -> tuple[int, str, str]:
    """Lock the head, allocate the next seq; returns (seq, prev_hash, hash)."""
    state = _state()
    if state is not None:
        seq, prev = state[0] + 1, state[1]
        state[0], state[1], state[2] = seq, link(prev, seq, kind, digest), True
        return seq, prev, state[1]
    head = ArchiveChainHead
    if head.update(seq=head.seq + 1).where(head.id == 1).execute() != 1:
        raise RuntimeError("archive chain head row missing (migration 100 not applied?)")
    row = head.select(head.seq, head.hash).where(head.id == 1).get()
    seq, prev = int(row.seq), row.hash
    new = link(prev, seq, kind, digest)
    head.update(hash=new).where(head.id == 1).execute()
    return seq, prev, new


def lock() -> None:
    """Take the chain writer lock now (a no-op UPDATE of the head row), e.g. before a
    look-up whose answer decides what to append."""
    if getattr(_batch, "state", None) is not None:  # batch(): locked already, or now (lazy)
        _state()
        prefetch_ids()  # a batch() entered before the caller's buffered_inserts(): drawn here
        return
    _lock_row()


def _lock_row() -> None:
    database.execute_sql(_head_sql("lock"))


def append_record(r: ArchiveRecord, digest: str | None = None) -> ArchiveRecord:
    """Chain and insert (or save) a record.  Caller holds a transaction.  ``digest``: the
    record's ``record_digest``, computed ahead (outside the transaction) by the caller."""
    if r.created_at is None:
        r.created_at = utcnow()
    r.created_at = r.created_at.replace(tzinfo=None)
    r.digest = digest or record_digest(r)
    r.seq, r.prev_hash, r.hash = _advance(RECORD, r.digest)
    if r.id is None:
        return insert_row(r)
    r.save()
    return r


def append_sighting(s: ArchiveSighting) -> ArchiveSighting:
    if s.seen_at is None:
        s.seen_at = utcnow()
    s.digest = sighting_digest(s)
    s.seq, s.prev_hash, s.hash = _advance(SIGHTING, s.digest)
    return insert_row(s)


def append_event(kind: str, actor: str = "", target: str = "", details: Any = None) -> ArchiveEvent:
    """Chain one event; opens its own transaction when the caller has none."""
    text = details if isinstance(details, str) else json.dumps(details or {}, ensure_ascii=False,
                                                               sort_keys=True, default=str)
    with write_transaction():
        e = ArchiveEvent(at=utcnow(), kind=kind[:20], actor=actor[:320], target=target[:500], details=text)
        e.digest = event_digest(e)
        e.seq, e.prev_hash, e.hash = _advance(EVENT, e.digest)
        e.save(force_insert=True)
        return e


def head() -> tuple[int, str]:
    state = getattr(_batch, "state", None)
    if state is not None and state[0] is not _PENDING:  # inside batch(): the head in memory
        return int(state[0]), state[1]
    row = ArchiveChainHead.get_or_none(ArchiveChainHead.id == 1)
    return (int(row.seq), row.hash) if row else (0, GENESIS)
