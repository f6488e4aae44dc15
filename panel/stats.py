"""Dashboard numbers: what a manager checks in the morning.

Everything is computed from the gateway's own tables, aggregated in SQL:

- sent per person per day: outbound archive records with verdict ``accepted``
  plus approvals ``approved`` that day (a held message is archived as ``held``
  and counted when it is released);
- received per person per day: inbound archive records (written by the archive
  area for the employee's mailbox);
- blocked sends: outbound archive records with verdict ``refused``;
- held: outbound archive records with verdict ``held``;
- pending approvals: ``approval`` rows still ``pending``;
- customers with no contact for N days: owned customers whose
  ``last_contact_at`` is older than N days (or who were never written to and
  were created more than N days ago).

Scope: every function takes ``employee_ids`` — the employees whose numbers the
viewer may see (``panel.scope.visible_employee_ids``); ``None`` means everyone.
Days are calendar days at ``utc_offset_minutes`` from UTC (the company's clock;
timestamps are stored in UTC).  Blocking: call from a worker thread.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from peewee import JOIN, SQL, fn

from gateway.db import is_postgres
from gateway.db.models import Approval, ArchiveRecord, Customer, Employee, Ownership, utcnow

MAX_DAYS = 92
MAX_LIST = 200


@dataclass
class Counts:
    sent: int = 0
    received: int = 0
    blocked: int = 0
    held: int = 0

    def add(self, other: Counts) -> None:
        self.sent += other.sent
        self.received += other.received
        self.blocked += other.blocked
        self.held += other.held


@dataclass
class PersonStats:
    employee_id: int | None
    name: str
    email: str
    total: Counts = field(default_factory=Counts)
    by_day: dict[dt.date, Counts] = field(default_factory=dict)


@dataclass
class StaleCustomer:
    id: int
    name: str
    owners: list[str]
    last_contact_at: dt.datetime | None
    days_since: int | None  # None: never contacted


@dataclass
class BlockedSend:
    at: dt.datetime
    employee_id: int | None
    mail_from: str
    recipients: str
    subject: str
    reason: str


@dataclass
class Summary:
    days: list[dt.date]
    people: list[PersonStats]
    by_day: dict[dt.date, Counts]
    total: Counts
    pending_approvals: int
    stale_customers: list[StaleCustomer]
    stale_days: int
    recent_blocked: list[BlockedSend]


def local_utc_offset_minutes() -> int:
    """The server's current offset from UTC (the company's clock by default)."""
    return int(time.localtime().tm_gmtoff // 60)


def _day_expr(column: object, offset_minutes: int) -> object:
    minutes = int(offset_minutes)
    if is_postgres():
        return fn.date(column + SQL(f"interval '{minutes} minutes'"))
    return fn.date(column, f"{minutes:+d} minutes")


def _as_date(value: object) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(str(value)[:10])


def _window(days: int, now: dt.datetime, offset_minutes: int) -> tuple[list[dt.date], dt.datetime]:
    """The last ``days`` local calendar days (oldest first) and the UTC instant the first one starts."""
    days = max(1, min(int(days), MAX_DAYS))
    local_today = (now + dt.timedelta(minutes=offset_minutes)).date()
    first = local_today - dt.timedelta(days=days - 1)
    start_utc = dt.datetime.combine(first, dt.time()) - dt.timedelta(minutes=offset_minutes)
    return [first + dt.timedelta(days=i) for i in range(days)], start_utc


def _scoped(query, column, employee_ids: Iterable[int] | None):  # noqa: ANN001, ANN202 - peewee query
    if employee_ids is None:
        return query
    ids = sorted(set(employee_ids))
    return query.where(column.in_(ids)) if ids else query.where(SQL("1 = 0"))


def mail_counts(employee_ids: Iterable[int] | None, since: dt.datetime, utc_offset_minutes: int = 0
                ) -> dict[tuple[int | None, dt.date], Counts]:
    """(employee id, local day) -> counts, from ``since`` (UTC) on."""
    ids = None if employee_ids is None else set(employee_ids)
    out: dict[tuple[int | None, dt.date], Counts] = {}

    def bump(emp: int | None, day: object, attr: str, n: int) -> None:
        c = out.setdefault((emp, _as_date(day)), Counts())
        setattr(c, attr, getattr(c, attr) + int(n))

    day = _day_expr(ArchiveRecord.created_at, utc_offset_minutes)
    q = (ArchiveRecord.select(ArchiveRecord.employee, ArchiveRecord.direction, ArchiveRecord.verdict,
                              day.alias("day"), fn.COUNT(ArchiveRecord.id).alias("n"))
         .where(ArchiveRecord.created_at >= since)
         .group_by(ArchiveRecord.employee, ArchiveRecord.direction, ArchiveRecord.verdict, day))
    for row in _scoped(q, ArchiveRecord.employee, ids).namedtuples():
        if row.direction == "inbound":
            bump(row.employee, row.day, "received", row.n)
        elif row.verdict == "accepted":
            bump(row.employee, row.day, "sent", row.n)
        elif row.verdict == "refused":
            bump(row.employee, row.day, "blocked", row.n)
        elif row.verdict == "held":
            bump(row.employee, row.day, "held", row.n)

    day = _day_expr(Approval.decided_at, utc_offset_minutes)
    q = (Approval.select(Approval.employee, day.alias("day"), fn.COUNT(Approval.id).alias("n"))
         .where(Approval.state == "approved", Approval.decided_at >= since)
         .group_by(Approval.employee, day))
    for row in _scoped(q, Approval.employee, ids).namedtuples():
        bump(row.employee, row.day, "sent", row.n)
    return out


def pending_approvals(employee_ids: Iterable[int] | None) -> int:
    q = Approval.select().where(Approval.state == "pending")
    return _scoped(q, Approval.employee, employee_ids).count()


def recent_blocked(employee_ids: Iterable[int] | None, since: dt.datetime, limit: int = 20) -> list[BlockedSend]:
    q = (ArchiveRecord.select(ArchiveRecord.created_at, ArchiveRecord.employee, ArchiveRecord.mail_from,
                              ArchiveRecord.recipients, ArchiveRecord.subject, ArchiveRecord.reason)
         .where(ArchiveRecord.direction == "outbound", ArchiveRecord.verdict == "refused",
                ArchiveRecord.created_at >= since)
         .order_by(ArchiveRecord.created_at.desc()).limit(max(0, min(limit, MAX_LIST))))
    return [BlockedSend(r.created_at, r.employee, r.mail_from, _recipients_text(r.recipients), r.subject[:300],
                        r.reason[:500])
            for r in _scoped(q, ArchiveRecord.employee, employee_ids).namedtuples()]


def _recipients_text(stored: str) -> str:
    """The archive keeps recipients as a JSON list; show them comma-separated."""
    try:
        value = json.loads(stored or "[]")
    except ValueError:
        return (stored or "")[:500]
    return ", ".join(str(v) for v in value)[:500] if isinstance(value, list) else str(value)[:500]


def stale_customers(employee_ids: Iterable[int] | None, days: int, now: dt.datetime | None = None,
                    limit: int = 50) -> list[StaleCustomer]:
    """Owned customers (of the given employees) with no contact for ``days`` days, oldest first."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(days=max(0, int(days)))
    owned = Ownership.select(Ownership.customer)
    if employee_ids is not None:
        ids = sorted(set(employee_ids))
        owned = owned.where(Ownership.employee.in_(ids)) if ids else owned.where(SQL("1 = 0"))
    q = (Customer.select(Customer.id, Customer.name, Customer.last_contact_at)
         .where(Customer.id.in_(owned), Customer.pool == "owned",
                (Customer.last_contact_at < cutoff)
                | (Customer.last_contact_at.is_null() & (Customer.created_at < cutoff)))
         .order_by(Customer.last_contact_at.asc(nulls="first"), Customer.id)
         .limit(max(0, min(limit, MAX_LIST))))
    rows = list(q)
    owners: dict[int, list[str]] = {}
    if rows:
        oq = (Ownership.select(Ownership.customer, Employee.name).join(Employee, JOIN.INNER)
              .where(Ownership.customer.in_([r.id for r in rows])).order_by(Employee.name).namedtuples())
        for o in oq:
            owners.setdefault(o.customer, []).append(o.name)
    return [StaleCustomer(r.id, r.name, owners.get(r.id, []), r.last_contact_at,
                          (now - r.last_contact_at).days if r.last_contact_at else None) for r in rows]


def summary(employee_ids: Iterable[int] | None, *, days: int = 14, stale_days: int = 30,
            now: dt.datetime | None = None, utc_offset_minutes: int | None = None) -> Summary:
    """Everything the dashboard shows, for the employees in scope."""
    now = now or utcnow()
    offset = local_utc_offset_minutes() if utc_offset_minutes is None else utc_offset_minutes
    ids = None if employee_ids is None else set(employee_ids)
    window, since = _window(days, now, offset)
    counts = mail_counts(ids, since, offset)
    people_q = Employee.select(Employee.id, Employee.name, Employee.email).where(Employee.active == True)  # noqa: E712
    people_q = _scoped(people_q, Employee.id, ids)
    people = {e.id: PersonStats(e.id, e.name, e.email) for e in people_q.order_by(Employee.name)}
    by_day = {d: Counts() for d in window}
    total = Counts()
    for (emp, day), c in counts.items():
        if day not in by_day:
            continue
        person = people.get(emp)
        if person is None:
            if emp is None and ids is None:  # mail with no employee (trusted network, notices)
                person = people.setdefault(None, PersonStats(None, "—", ""))
            else:
                continue
        person.by_day.setdefault(day, Counts()).add(c)
        person.total.add(c)
        by_day[day].add(c)
        total.add(c)
    ordered = sorted(people.values(), key=lambda p: (-(p.total.sent + p.total.received), p.name))
    return Summary(days=window, people=ordered, by_day=by_day, total=total,
                   pending_approvals=pending_approvals(ids), stale_customers=stale_customers(ids, stale_days, now),
                   stale_days=stale_days, recent_blocked=recent_blocked(ids, since))
