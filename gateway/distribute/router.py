"""Routing: which employee(s) get a message from the shared mailbox, and why.

Each step is a small named unit ``(inquiry) -> Decision | None``; the first that
decides wins, in this order:

0. ``loop``      — our own forwarded copy came back (X-Mailgate-Distribution-Id): left for a manager;
   ``reject``    — the sender's address or domain is on the reject list (拒收): moved to Junk;
1. ``reply``     — In-Reply-To/References name a Message-ID the gateway sent (SentMessage): its writer;
2. ``customer``  — a known customer (Directory: exact contact, then company domain, never public
   mail domains): its owner(s);
   ``mapping``   — "always send this address/domain to this employee" (set from the panel);
3. ``rule``      — distribution rules (rules/distribution/*.yaml): an employee or a group;
4. ``none``      — undistributed (未分发): a manager dispatches it by hand.

Group picks (round-robin state, least-loaded counts) read and write the DB: call
``route`` inside the transaction that records the decision.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from peewee import fn

from gateway.db.models import SentMessage, utcnow
from gateway.directory import Directory, EmployeeInfo
from gateway.distribute.inquiry import Inquiry
from gateway.distribute.rules import Group, RuleSet
from gateway.distribute.schema import (
    DISTRIBUTED,
    REJECTED,
    UNDISTRIBUTED,
    DistDelivery,
    DistMapping,
    DistReject,
    DistRoundRobin,
)


@dataclass(frozen=True)
class Decision:
    state: str  # distributed | undistributed | rejected
    step: str
    reason: str
    employees: tuple[int, ...] = ()


@dataclass
class Route:
    decision: Decision
    trace: list[str] = field(default_factory=list)  # one line per step consulted


def domain_suffixes(domain: str) -> list[str]:
    """example.co.uk -> [example.co.uk, co.uk, uk]: a list entry for a domain covers its subdomains."""
    labels = domain.split(".")
    return [".".join(labels[i:]) for i in range(len(labels)) if labels[i:]]


def list_keys(address: str) -> list[str]:
    """Keys a reject/mapping entry may have for this sender: the address, then its domains."""
    address = address.lower()
    return [address, *domain_suffixes(address.rpartition("@")[2])] if "@" in address else []


class GroupPicker:
    """Picks one active member of a group; DB-backed, so call inside the recording transaction."""

    def __init__(self, load_window_hours: int = 24, now: Callable[[], dt.datetime] = utcnow):
        self.load_window_hours = load_window_hours
        self.now = now

    def pick(self, group: Group, members: list[EmployeeInfo]) -> tuple[EmployeeInfo, str]:
        if group.pick == "least-loaded":
            since = self.now() - dt.timedelta(hours=self.load_window_hours)
            counts = dict(
                DistDelivery.select(DistDelivery.employee, fn.COUNT(DistDelivery.id))
                .where(DistDelivery.employee.in_([m.id for m in members]) & (DistDelivery.created_at >= since))
                .group_by(DistDelivery.employee)
                .tuples()
            )
            chosen = min(members, key=lambda m: counts.get(m.id, 0))  # ties: the first listed
            return chosen, f"least-loaded ({counts.get(chosen.id, 0)} in {self.load_window_hours} h)"
        row, _ = DistRoundRobin.get_or_create(group=group.name)
        chosen = members[row.counter % len(members)]
        DistRoundRobin.update(counter=DistRoundRobin.counter + 1).where(DistRoundRobin.id == row.id).execute()
        return chosen, "round-robin"


class Router:
    def __init__(self, directory: Directory, rules: RuleSet | None = None, picker: GroupPicker | None = None):
        self.directory = directory
        self.rules = rules or RuleSet()
        self.picker = picker or GroupPicker()
        self.steps: list[tuple[str, Callable[[Inquiry], Decision | None]]] = [
            ("loop", self.loop),
            ("reject", self.reject),
            ("reply", self.reply),
            ("customer", self.customer),
            ("mapping", self.mapping),
            ("rule", self.rule),
        ]

    def route(self, q: Inquiry) -> Route:
        trace: list[str] = []
        for name, step in self.steps:
            decision = step(q)
            if decision is not None:
                trace.append(f"{name}: {decision.reason}")
                return Route(decision, trace)
            trace.append(f"{name}: no")
        return Route(Decision(UNDISTRIBUTED, "none", "no routing step matched: left for a manager"), trace)

    # -- helpers ---------------------------------------------------------------
    def _active(self, ids: Iterable[int]) -> list[EmployeeInfo]:
        out = []
        for eid in sorted(set(ids)):
            info = self.directory.employee(eid)
            if info is not None and info.active:
                out.append(info)
        return out

    @staticmethod
    def _to(state: str, step: str, reason: str, people: list[EmployeeInfo]) -> Decision:
        names = ", ".join(p.email for p in people)
        return Decision(state, step, f"{reason} -> {names}" if names else reason, tuple(p.id for p in people))

    # -- steps -----------------------------------------------------------------
    def loop(self, q: Inquiry) -> Decision | None:
        if q.looped:
            return Decision(UNDISTRIBUTED, "loop",
                            "already carries X-Mailgate-Distribution-Id (a forwarded copy came back)")
        return None

    def reject(self, q: Inquiry) -> Decision | None:
        keys = list_keys(q.from_addr)
        if not keys:
            return None
        hit = DistReject.select(DistReject.key).where(DistReject.key.in_(keys)).tuples()
        found = {k for (k,) in hit}
        for key in keys:  # the most specific entry names the reason
            if key in found:
                return Decision(REJECTED, "reject", f"{q.from_addr} is on the reject list ({key})")
        return None

    def reply(self, q: Inquiry) -> Decision | None:
        ids = q.thread_ids
        if not ids:
            return None
        rows = {
            mid: eid
            for mid, eid in SentMessage.select(SentMessage.message_id, SentMessage.employee)
            .where(SentMessage.message_id.in_(ids[:70]))
            .tuples()
            if eid is not None
        }
        for mid in ids:
            if mid in rows:
                people = self._active([rows[mid]])
                if people:
                    return self._to(DISTRIBUTED, "reply", f"reply to {mid}, sent by", people)
        return None

    def customer(self, q: Inquiry) -> Decision | None:
        if not q.from_addr or self.directory.is_internal(q.from_addr):
            return None
        match = self.directory.lookup(q.from_addr)
        if match is None:
            return None
        people = self._active(match.customer.owners)
        if not people:
            return None  # public pool or no active owner: later steps decide
        how = "contact address" if match.matched_by == "contact" else "company domain"
        return self._to(DISTRIBUTED, "customer", f"customer {match.customer.name!r} ({how}), owned by", people)

    def mapping(self, q: Inquiry) -> Decision | None:
        keys = list_keys(q.from_addr)
        if not keys:
            return None
        rows = {k: eid for k, eid in DistMapping.select(DistMapping.key, DistMapping.employee).where(
            DistMapping.key.in_(keys)).tuples()}
        for key in keys:
            if key in rows:
                people = self._active([rows[key]])
                if people:
                    return self._to(DISTRIBUTED, "mapping", f"always-send mapping {key}", people)
        return None

    def rule(self, q: Inquiry) -> Decision | None:
        for r in self.rules.rules:
            ok, why = r.matches(q)
            if not ok:
                continue
            if r.to:
                target = self.directory.employee_for_address(r.to)
                if target is None:
                    continue  # not an active employee (any more): the next rule may decide
                return self._to(DISTRIBUTED, "rule", f"rule {r.name} ({why})", [target])
            group = self.rules.groups[r.group]
            members = [m for m in (self.directory.employee_for_address(a) for a in group.members) if m is not None]
            if not members:
                continue
            chosen, how = self.picker.pick(group, members)
            return self._to(DISTRIBUTED, "rule", f"rule {r.name} ({why}), group {group.name} {how}", [chosen])
        return None
