"""Queue claims and schedule for the relay workers (gateway/relay.py).

Blocking: run in a worker thread.  ``claim_batch`` is a compare-and-set over a batch (safe
with several workers, processes and nodes on one database).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from peewee import SqliteDatabase

from gateway.db.models import OutboundMessage, database


def backoff(attempts: int, initial: int, maximum: int) -> int:
    """Seconds to wait after the ``attempts``-th failed attempt: initial, 2×, 4× … ≤ maximum."""
    if attempts < 1:
        return 0
    return min(initial * 2 ** min(attempts - 1, 32), maximum)


def claim_batch(
    owner: str, now: dt.datetime, claim_timeout: int, limit: int = 10, node: str | None = None
) -> list[OutboundMessage]:
    """Claim up to ``limit`` due rows for ``owner``; return the rows won.

    The batch is taken by one compare-and-set UPDATE whose WHERE repeats the
    "due and unclaimed" test per row, so of several workers racing for a row
    exactly one gets it (its owner and claim time mark the rows won).  A claim expires after
    ``claim_timeout`` seconds (the worker died) and the row is due again.  The three
    statements' texts are cached (peewee building them cost more CPU than running them).
    """
    m = OutboundMessage
    until = now + dt.timedelta(seconds=claim_timeout)
    db = database.obj
    due = [m.state.db_value("queued"), m.next_attempt_at.db_value(now), m.claimed_until.db_value(now)]
    due += [] if node is None else [node, ""]
    while True:
        candidates = [row_id for (row_id,) in
                      db.execute_sql(_sql("candidates", node is not None), [*due, limit]).fetchall()]
        if not candidates:
            return []
        # One UPDATE for the batch; its WHERE re-checks each row, so a row another
        # worker took in between is simply not ours.
        mark = [m.claimed_by.db_value(owner), m.claimed_until.db_value(until)]
        taken = db.execute_sql(_sql("claim", node is not None, len(candidates)),
                               [*mark, *candidates, *due]).rowcount
        if taken:
            return list(m.raw(_sql("won", False, len(candidates)), *candidates, *mark))
        # Lost every race (another worker took them all): look again.


_SQL: dict[tuple, str] = {}


def _sql(kind: str, by_node: bool, count: int = 0) -> str:
    """The claim statements for this backend, built once per shape."""
    db = database.obj
    key = (type(db), kind, by_node, count)
    sql = _SQL.get(key)
    if sql is not None:
        return sql
    q0, q1 = db.quote
    p = db.param

    def c(name: str) -> str:
        return f"{q0}{name}{q1}"

    table = c(OutboundMessage._meta.table_name)
    due = (f"{c('state')} = {p} AND {c('next_attempt_at')} <= {p}"
           f" AND ({c('claimed_until')} IS NULL OR {c('claimed_until')} < {p})")
    if by_node:
        due += f" AND {c('node')} IN ({p}, {p})"
    ids = ", ".join([p] * count)
    order = f"ORDER BY {c('next_attempt_at')}, {c('id')}"
    if kind == "next":
        sql = (f"SELECT {c('next_attempt_at')} FROM {table} WHERE {c('state')} = {p}"
               f" AND ({c('claimed_until')} IS NULL OR {c('claimed_until')} < {p})"
               f" ORDER BY {c('next_attempt_at')} LIMIT 1")
    elif kind == "candidates":
        sql = f"SELECT {c('id')} FROM {table} WHERE {due} {order} LIMIT {p}"
    elif kind == "claim":
        sql = (f"UPDATE {table} SET {c('claimed_by')} = {p}, {c('claimed_until')} = {p}"
               f" WHERE {c('id')} IN ({ids}) AND {due}")
    else:  # won
        columns = ", ".join(c(f.column_name) for f in OutboundMessage._meta.sorted_fields)
        sql = (f"SELECT {columns} FROM {table} WHERE {c('id')} IN ({ids}) AND {c('claimed_by')} = {p}"
               f" AND {c('claimed_until')} = {p} {order}")
    _SQL[key] = sql
    return sql


def next_due(now: dt.datetime) -> dt.datetime | None:
    """When the earliest queued, unclaimed row is due (None: no such row).  Asked after every
    run of a relay worker: the statement text is cached like the claims'."""
    m = OutboundMessage
    row = database.obj.execute_sql(
        _sql("next", False), [m.state.db_value("queued"), m.claimed_until.db_value(now)]).fetchone()
    return m.next_attempt_at.python_value(row[0]) if row is not None else None


def finish(row_id: int, owner: str, changes: dict[Any, Any]) -> int:
    """``UPDATE … SET changes WHERE id = row_id AND claimed_by = owner`` (the outcome of an
    attempt, only while the claim is still ours); returns the rows updated (0 or 1).  The
    statement text is cached per set of columns."""
    sql, fields = _finish_sql(changes)
    params = [f.db_value(changes[f]) for f in fields] + [row_id, owner]
    return database.obj.execute_sql(sql, params).rowcount


def finish_many(outcomes: list[tuple[int, str, dict[Any, Any]]]) -> list[bool]:
    """``finish`` for several ``(row_id, owner, changes)``; True for each row updated.  On
    SQLite, inside a write transaction (its write lock held: nobody can change a claim
    meanwhile), one look-up of the claims and one ``executemany`` per set of columns instead
    of a statement per row — each statement is a moment the writer gives up the GIL while
    holding the lock.  Elsewhere row by row."""
    db = database.obj
    if not isinstance(db, SqliteDatabase) or len(outcomes) < 2:
        return [finish(row_id, owner, changes) == 1 for row_id, owner, changes in outcomes]
    q0, q1 = db.quote
    ids = [row_id for row_id, _, _ in outcomes]
    claims = dict(db.execute_sql(
        f"SELECT {q0}id{q1}, {q0}claimed_by{q1} FROM {q0}{OutboundMessage._meta.table_name}{q1}"
        f" WHERE {q0}id{q1} IN ({', '.join([db.param] * len(ids))})", ids).fetchall())
    ours = [claims.get(row_id) == owner for row_id, owner, _ in outcomes]
    groups: dict[str, list[list]] = {}
    for (row_id, owner, changes), mine in zip(outcomes, ours, strict=True):
        if mine:
            sql, fields = _finish_sql(changes)
            groups.setdefault(sql, []).append([f.db_value(changes[f]) for f in fields] + [row_id, owner])
    for sql, params in groups.items():
        db.cursor().executemany(sql, params)
    return ours


def _finish_sql(changes: dict[Any, Any]) -> tuple[str, list]:
    db = database.obj
    fields = list(changes)
    key = (type(db), "finish", tuple(f.name for f in fields))
    sql = _SQL.get(key)
    if sql is None:
        q0, q1 = db.quote
        p = db.param
        sets = ", ".join(f"{q0}{f.column_name}{q1} = {p}" for f in fields)
        sql = _SQL[key] = (f"UPDATE {q0}{OutboundMessage._meta.table_name}{q1} SET {sets}"
                           f" WHERE {q0}id{q1} = {p} AND {q0}claimed_by{q1} = {p}")
    return sql, fields


def release_node_claims(node: str) -> int:
    """At start-up: free the claims an earlier process of this node left behind
    (it was killed).  Safe because node names are unique and this runs before
    the node's own workers start."""
    m = OutboundMessage
    prefix = f"{node}/"
    return (
        m.update(claimed_by=None, claimed_until=None)
        .where((m.state == "queued") & m.claimed_by.startswith(prefix))
        .execute()
    )


def release(row_ids: Iterable[int], owner: str) -> int:
    """Give back claims not worked on (e.g. when stopping)."""
    m = OutboundMessage
    ids = list(row_ids)
    if not ids:
        return 0
    return (
        m.update(claimed_by=None, claimed_until=None)
        .where(m.id.in_(ids) & (m.claimed_by == owner) & (m.state == "queued"))
        .execute()
    )
