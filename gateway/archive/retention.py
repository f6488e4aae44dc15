"""Retention (years) and legal hold (法律保全).

A record is due for purging once ``created_at`` (when it was first archived) is older
than ``[archive] retention_years`` (0 = keep forever) — unless a legal hold covers it:
scope ``record`` (one record id), ``employee`` (every record with a sighting of that
employee's address) or ``all`` (suspends every purge).  Holds and releases are chained
events and operation-log entries; a hold the chain leaves in force holds whatever the hold
table says (``active_holds``), and ``verify`` reports where the two disagree.

A purge keeps the chain verifiable: in one transaction (holding the chain lock) it
blanks each record's and its sightings' descriptive fields (keeping ``digest``, so
links still verify), renames ``sha256`` to ``purged:<id>``, appends a chained
``purge`` event listing the record ids (the tombstone) and an operation-log entry, and
commits.  Only then are the blob files deleted (a failed commit leaves every record with
its blob), in a second short transaction holding the chain lock that skips any blob a live
record names again (the same content archived anew meanwhile); a writer that found the file
before and waits for the lock writes it again (``Archive._chain``).  A crash between the
two leaves blobs of purged records behind: every purge run deletes those first.
Blocking: call from a worker thread.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field

from gateway import oplog
from gateway.archive import chain
from gateway.archive.schema import ArchiveHold, ArchiveRecord, ArchiveSighting
from gateway.archive.store import BlobStore
from gateway.areas import optional_module
from gateway.db.models import Employee, utcnow
from gateway.groupcommit import write_transaction

log = logging.getLogger("mailgate.archive")

SCOPES = ("record", "employee", "all")


class HoldError(ValueError):
    """A hold request names nothing that exists, or an unknown scope."""


@dataclass
class PurgeResult:
    purged: list[int] = field(default_factory=list)
    held: int = 0  # records past retention but kept by a hold
    dry_run: bool = False


def cutoff(years: int, now: dt.datetime | None = None) -> dt.datetime:
    now = now or utcnow()
    try:
        return now.replace(year=now.year - years)
    except ValueError:  # 29 February
        return now.replace(year=now.year - years, day=28)


# -- holds -------------------------------------------------------------------------


def place_hold(scope: str, target: str, reason: str, actor: str) -> ArchiveHold:
    scope = scope.strip().lower()
    target = target.strip()
    if scope not in SCOPES:
        raise HoldError(f"unknown hold scope {scope!r} (record, employee, all)")
    if not reason.strip():
        raise HoldError("a legal hold needs a reason")
    if scope == "record":
        if not target.isdigit() or not ArchiveRecord.select().where(ArchiveRecord.id == int(target)).exists():
            raise HoldError(f"no archive record {target!r}")
    elif scope == "employee":
        target = target.lower()
        known = Employee.select().where(Employee.email == target).exists() or ArchiveSighting.select().where(
            ArchiveSighting.employee_email == target).exists()
        if not known:
            raise HoldError(f"no employee or archived mail for {target!r}")
    else:
        target = "*"
    with write_transaction():
        hold = ArchiveHold.create(scope=scope, target=target, reason=reason[:2000], created_by=actor[:320])
        chain.append_event("hold", actor, f"{scope}:{target}", {"hold": hold.id, "reason": reason})
        oplog.record(actor, "archive.hold", f"{scope}:{target}", {"hold": hold.id, "reason": reason})
    return hold


def release_hold(hold_id: int, actor: str, reason: str = "") -> ArchiveHold:
    """Release a hold in force — by the table or by the chain (``active_holds``): the release
    is chained, and the table row set (made again if it was deleted)."""
    with write_transaction():
        hold = ArchiveHold.get_or_none(ArchiveHold.id == hold_id)
        chained = chained_holds().get(hold_id)
        if chained is None and (hold is None or hold.released_at is not None):
            raise HoldError(f"no active hold {hold_id}")
        if hold is None:
            ArchiveHold.insert(id=hold_id, scope=chained[0], target=chained[1], created_by="(from the chain)").execute()
            hold = ArchiveHold.get_by_id(hold_id)
        hold.released_at, hold.released_by = utcnow(), actor[:320]
        hold.save()
        target = f"{hold.scope}:{hold.target}"
        chain.append_event("release", actor, target, {"hold": hold.id, "reason": reason})
        oplog.record(actor, "archive.release", target, {"hold": hold.id, "reason": reason})
    return hold


def active_holds() -> list[ArchiveHold]:
    """The holds in force: those the hold table has as active and — whatever the table now
    says — those the chained hold/release events leave active.  Releasing a hold by editing
    the table (not through ``release_hold``, which chains the release) does not lift it;
    ``verify`` reports the difference (``hold_problems``)."""
    table = list(ArchiveHold.select().where(ArchiveHold.released_at.is_null()).order_by(ArchiveHold.id))
    have = {h.id for h in table}
    extra = [ArchiveHold(id=hid, scope=scope, target=target, created_by="(from the chain: the hold table was altered)")
             for hid, (scope, target) in chained_holds().items() if hid not in have]
    return sorted(table + extra, key=lambda h: h.id)


def chained_holds() -> dict[int, tuple[str, str]]:
    """Hold id → (scope, target) of every hold that the chain's events place and do not
    release, in chain order."""
    from gateway.archive.schema import ArchiveEvent

    active: dict[int, tuple[str, str]] = {}
    events = ArchiveEvent.select(ArchiveEvent.kind, ArchiveEvent.target, ArchiveEvent.details).where(
        ArchiveEvent.kind.in_(("hold", "release"))).order_by(ArchiveEvent.seq)
    for e in events:
        try:
            hid = int(json.loads(e.details)["hold"])
        except (ValueError, KeyError, TypeError):
            continue  # an altered event: verify reports it (its digest)
        if e.kind == "hold":
            scope, _, target = e.target.partition(":")
            active[hid] = (scope, target)
        else:
            active.pop(hid, None)
    return active


def hold_problems() -> list[str]:
    """Where the hold table and the chained hold/release events disagree (one line each)."""
    problems = []
    chained = chained_holds()
    table = {h.id: h for h in ArchiveHold.select()}
    for hid, (scope, target) in sorted(chained.items()):
        row = table.get(hid)
        if row is None:
            problems.append(f"archive: legal hold {hid} ({scope}:{target}) is in force by the chain "
                            "but missing from the hold table (deleted; purges still keep it)")
        elif row.released_at is not None:
            problems.append(f"archive: legal hold {hid} ({scope}:{target}) is released in the hold table "
                            "without a chained release (purges still keep it)")
    for hid, row in sorted(table.items()):
        if row.released_at is None and hid not in chained:
            problems.append(f"archive: legal hold {hid} ({row.scope}:{row.target}) is active in the hold table "
                            "but no chained event places it (or a chained release lifted it)")
    return problems


def is_held(record: ArchiveRecord) -> bool:
    holds = active_holds()
    if any(h.scope == "all" for h in holds):
        return True
    if any(h.scope == "record" and h.target == str(record.id) for h in holds):
        return True
    emails = [h.target for h in holds if h.scope == "employee"]
    return bool(emails) and ArchiveSighting.select().where(
        (ArchiveSighting.record == record) & (ArchiveSighting.employee_email.in_(emails))).exists()


# -- purge -------------------------------------------------------------------------


def _due(before: dt.datetime):
    return ArchiveRecord.select().where(ArchiveRecord.purged_at.is_null() & (ArchiveRecord.created_at < before))


def _unheld(query, holds: list[ArchiveHold]):
    if any(h.scope == "all" for h in holds):
        return None
    ids = [int(h.target) for h in holds if h.scope == "record" and h.target.isdigit()]
    if ids:
        query = query.where(ArchiveRecord.id.not_in(ids))
    emails = [h.target for h in holds if h.scope == "employee"]
    if emails:
        held = ArchiveSighting.select(ArchiveSighting.record).where(ArchiveSighting.employee_email.in_(emails))
        query = query.where(ArchiveRecord.id.not_in(held))
    return query


def purge(store: BlobStore | None, years: int, actor: str = "system", *, now: dt.datetime | None = None,
          dry_run: bool = False, batch: int = 500) -> PurgeResult:
    """Purge every record past retention and not on hold; returns what was done."""
    result = PurgeResult(dry_run=dry_run)
    if years <= 0:
        return result
    before = cutoff(years, now)
    if store is not None and not dry_run:
        _sweep(store)
    while True:
        with write_transaction():
            chain.lock()
            query = _unheld(_due(before), active_holds())
            if dry_run:
                result.purged = [] if query is None else [r.id for r in query.order_by(ArchiveRecord.id)]
                break
            candidates = [] if query is None else list(query.order_by(ArchiveRecord.id).limit(batch))
            if not candidates:
                break
            _tombstone(candidates, actor, years, before)
        if store is not None:  # after the commit (see the module docstring)
            delete_blobs(store, [r.blob_path for r in candidates])
        result.purged.extend(r.id for r in candidates)
        _forget([r.id for r in candidates])
        if len(candidates) < batch:
            break
    result.held = _due(before).count() - (len(result.purged) if dry_run else 0)
    if result.purged and not dry_run:
        log.info("archive retention: purged %d record(s) older than %d years; %d kept by legal hold",
                 len(result.purged), years, result.held)
    return result


def delete_blobs(store: BlobStore, names: list[str]) -> int:
    """Delete the blob files of purged records, except those a live record names (content
    archived again since).  Under the chain lock, so no writer commits a record naming one
    of them meanwhile.  Returns how many files were deleted."""
    deleted = 0
    for start in range(0, len(names), 500):
        chunk = sorted(set(names[start:start + 500]))
        with write_transaction():
            chain.lock()
            live = {name for (name,) in ArchiveRecord.select(ArchiveRecord.blob_path).where(
                ArchiveRecord.blob_path.in_(chunk) & ArchiveRecord.purged_at.is_null()).tuples()}
            deleted += sum(store.delete(name) for name in chunk if name not in live)
    return deleted


def _sweep(store: BlobStore, batch: int = 1000) -> None:
    """Blobs of purged records still on disk (a crash between a purge's commit and its
    deletions): delete them now."""
    last = 0
    while True:
        rows = list(ArchiveRecord.select(ArchiveRecord.id, ArchiveRecord.blob_path)
                    .where(ArchiveRecord.purged_at.is_null(False) & (ArchiveRecord.id > last))
                    .order_by(ArchiveRecord.id).limit(batch).tuples())
        if not rows:
            return
        last = rows[-1][0]
        left = [name for _, name in rows if store.path_of(name).exists()]
        if left:
            log.info("archive retention: deleting %d blob(s) left by an interrupted purge", delete_blobs(store, left))


def _tombstone(records: list[ArchiveRecord], actor: str, years: int, before: dt.datetime) -> None:
    ids = [r.id for r in records]
    at = utcnow()
    for r in records:
        ArchiveRecord.update(
            sha256=f"purged:{r.id}", subject="", mail_from="", recipients="[]", message_id="", reason="",
            trace="[]", queue_id="", original_sha256="", original=None, purged_at=at,
        ).where(ArchiveRecord.id == r.id).execute()
    ArchiveSighting.update(reason="", trace="[]", mail_from="", recipients="[]").where(
        ArchiveSighting.record.in_(ids)).execute()
    details = {"records": ids, "retention_years": years, "created_before": before.isoformat()}
    chain.append_event("purge", actor, f"{len(ids)} records", details)
    oplog.record(actor, "archive.purge", f"{len(ids)} records", details)


def _forget(ids: list[int]) -> None:
    index = optional_module("gateway.archive.index")
    forget = getattr(index, "forget_record", None) if index is not None else None
    if forget is None:
        return
    for rid in ids:
        try:
            with write_transaction():
                forget(rid)
        except Exception:
            log.exception("archive record %s: removing it from the full-text index failed", rid)
