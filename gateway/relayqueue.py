"""Queue claims and schedule for the relay workers (gateway/relay.py).

Blocking: run in a worker thread.  ``claim_batch`` is a compare-and-set over a batch (safe
with several workers, processes and nodes on one database).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from gateway.db.models import OutboundMessage


def backoff(attempts: int, initial: int, maximum: int) -> int:
    """Seconds to wait after the ``attempts``-th failed attempt: initial, 2×, 4× … ≤ maximum."""
    if attempts < 1:
        return 0
    return min(initial * 2 ** min(attempts - 1, 32), maximum)


def _claimable(now: dt.datetime, node: str | None = None) -> Any:
    m = OutboundMessage
    due = (
        (m.state == "queued")
        & (m.next_attempt_at <= now)
        & (m.claimed_until.is_null() | (m.claimed_until < now))
    )
    # A node relays only what its own spool holds, plus rows of a shared spool ("").
    return due if node is None else due & m.node.in_([node, ""])


def claim_batch(
    owner: str, now: dt.datetime, claim_timeout: int, limit: int = 10, node: str | None = None
) -> list[OutboundMessage]:
    """Claim up to ``limit`` due rows for ``owner``; return the rows won.

    The batch is taken by one compare-and-set UPDATE whose WHERE repeats the
    "due and unclaimed" test per row, so of several workers racing for a row
    exactly one gets it (its owner and claim time mark the rows won).  A claim expires after
    ``claim_timeout`` seconds (the worker died) and the row is due again.
    """
    m = OutboundMessage
    until = now + dt.timedelta(seconds=claim_timeout)
    while True:
        candidates = [
            row_id
            for (row_id,) in m.select(m.id)
            .where(_claimable(now, node))
            .order_by(m.next_attempt_at, m.id)
            .limit(limit)
            .tuples()
        ]
        if not candidates:
            return []
        # One UPDATE for the batch; its WHERE re-checks each row, so a row another
        # worker took in between is simply not ours.
        taken = (
            m.update(claimed_by=owner, claimed_until=until)
            .where(m.id.in_(candidates) & _claimable(now, node))
            .execute()
        )
        if taken:
            query = m.select().where(m.id.in_(candidates) & (m.claimed_by == owner) & (m.claimed_until == until))
            return list(query.order_by(m.next_attempt_at, m.id))
        # Lost every race (another worker took them all): look again.


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
