"""Deciding, recording and delivering one shared message — exactly once.

``Distributor.record`` runs in one DB transaction: look up the record by its unique key
(mailbox, folder, UIDVALIDITY, UID) — if it exists, nothing is decided or sent again —
else route, insert the ``distribution`` row, and for each employee a ``distdelivery`` row
plus, for forwards, the spool file and queue row.  Commit.  Only then does the watcher
mark the shared copy (keyword, or move to Junk) and advance the checkpoint; a crash
anywhere before that repeats only those idempotent steps.  APPEND copies are appended
after the commit, idempotently (see gateway.distribute.deliver).

Blocking: call from a worker thread.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.config import Config
from gateway.db.models import Employee, utcnow
from gateway.directory import Directory
from gateway.distribute import deliver
from gateway.distribute.inquiry import Inquiry, parse
from gateway.distribute.router import Decision, GroupPicker, Router
from gateway.distribute.rules import RuleSet
from gateway.distribute.schema import (
    DISTRIBUTED,
    PENDING,
    UNDISTRIBUTED,
    DistDelivery,
    Distribution,
)
from gateway.groupcommit import write_transaction
from gateway.spool import Spool

log = logging.getLogger(__name__)


class DispatchError(ValueError):
    """A manual dispatch cannot be done (clear message for the manager)."""


@dataclass
class Outcome:
    record: Distribution | None  # None: skipped (the shared copy carries the keyword but has no record)
    new: bool
    queued: int = 0
    pending: list[DistDelivery] = field(default_factory=list)
    inquiry: Inquiry | None = None


def _record_contact(inquiry: Inquiry) -> None:
    """Tell the CRM that a customer wrote in (gateway.customers.record_contact, when it exists)."""
    from gateway import customers

    hook = getattr(customers, "record_contact", None)
    if hook is None or not inquiry.from_addr:
        return
    try:
        hook([inquiry.from_addr], utcnow())
    except Exception:
        log.exception("record_contact failed for an inbound message; distribution goes on")


class Distributor:
    def __init__(self, cfg: Config, directory: Directory, spool: Spool, *, rules: RuleSet | None = None,
                 appender: deliver.Appender | None = None, wake: Callable[[], None] | None = None):
        self.cfg = cfg
        self.dcfg = cfg.distribution
        self.directory = directory
        self.spool = spool
        self.router = Router(directory, rules, GroupPicker(self.dcfg.load_window_hours))
        self.appender = appender
        self.wake = wake
        self.append_for = {a.lower() for a in self.dcfg.append_for}

    def set_rules(self, rules: RuleSet) -> None:
        self.router.rules = rules

    # -- automatic distribution ----------------------------------------------
    def record(self, mailbox: str, folder: str, uidvalidity: int, uid: int, raw: bytes,
               flags: tuple = (), size: int | None = None) -> Outcome:
        """Decide and record one shared message (idempotent on its key).

        ``size``: the real size when ``raw`` holds only the header of an oversized message."""
        with write_transaction():
            existing = Distribution.get_or_none(
                (Distribution.mailbox == mailbox) & (Distribution.folder == folder)
                & (Distribution.uidvalidity == uidvalidity) & (Distribution.uid == uid))
            if existing is not None:
                return Outcome(existing, new=False, pending=self._pending(existing))
            if self.dcfg.keyword.encode() in {f if isinstance(f, bytes) else str(f).encode() for f in flags}:
                return Outcome(None, new=False)
            inquiry = parse(raw)
            total = inquiry.size if size is None else size
            if total > self.dcfg.max_message_size:
                decision = Decision(UNDISTRIBUTED, "none", f"too large ({total} bytes): left for a manager")
            else:
                decision = self.router.route(inquiry).decision
            rec = Distribution.create(
                mailbox=mailbox, folder=folder, uidvalidity=uidvalidity, uid=uid, token=secrets.token_hex(8),
                message_id=inquiry.message_id[:998], from_addr=inquiry.from_addr[:320],
                from_name=inquiry.from_name[:300], subject=inquiry.subject, size=total,
                preview=inquiry.preview, state=decision.state, step=decision.step, reason=decision.reason,
                actor="worker",
            )
            outcome = Outcome(rec, new=True, inquiry=inquiry)
            for eid in decision.employees:
                self._deliver(rec, eid, inquiry, outcome)
            if decision.step == "customer":
                _record_contact(inquiry)
        self._after_commit(outcome)
        return outcome

    def _pending(self, rec: Distribution) -> list[DistDelivery]:
        return list(DistDelivery.select().where((DistDelivery.distribution == rec) & (DistDelivery.state == PENDING)))

    def _method_for(self, employee_email: str) -> str:
        if self.dcfg.delivery == "append" or "*" in self.append_for or employee_email in self.append_for:
            return "append"
        return "forward"

    def _deliver(self, rec: Distribution, employee_id: int, inquiry: Inquiry, outcome: Outcome) -> None:
        info = self.directory.employee(employee_id)
        email = info.email if info else Employee.get_by_id(employee_id).email
        method = self._method_for(email)
        delivery = DistDelivery.create(distribution=rec, employee=employee_id, method=method,
                                       state=PENDING if method == "append" else "new")
        delivery.distribution = rec
        if method == "append":
            outcome.pending.append(delivery)
            return
        deliver.forward(self.spool, inquiry.raw, inquiry, rec.mailbox, self.dcfg.forward_sender or rec.mailbox,
                        delivery, email, self.cfg.smtp.hostname)
        outcome.queued += 1

    def _after_commit(self, outcome: Outcome) -> None:
        if outcome.queued and self.wake is not None:
            self.wake()

    def finish(self, outcome: Outcome, raw: bytes) -> None:
        """Append the outcome's pending copies (after the commit; idempotent)."""
        if not outcome.pending or outcome.record is None:
            return
        if self.appender is None:
            raise RuntimeError("APPEND delivery configured but no appender")
        inquiry = outcome.inquiry or parse(raw)
        for delivery in outcome.pending:
            email = Employee.get_by_id(delivery.employee_id).email
            deliver.finish_append(delivery, raw, inquiry, outcome.record.mailbox, email, self.appender,
                                  self.cfg.smtp.hostname, first_attempt=outcome.new)

    # -- manual dispatch (panel, CLI) ----------------------------------------
    def dispatch(self, record_id: int, employee_id: int, actor: str, raw: bytes, note: str = "") -> Outcome:
        """Send an undistributed message to an employee; ``raw`` is the shared copy's bytes."""
        info = self.directory.employee(employee_id)
        if info is None or not info.active:
            raise DispatchError("no such active employee")
        with write_transaction():
            rec = Distribution.get_or_none(Distribution.id == record_id)
            if rec is None:
                raise DispatchError(f"no distribution record {record_id}")
            if rec.state != UNDISTRIBUTED:
                raise DispatchError(f"message {record_id} is {rec.state}, not undistributed")
            inquiry = parse(raw)
            if inquiry.message_id != rec.message_id or inquiry.size != rec.size:
                raise DispatchError("the shared copy changed since it was recorded; refusing to send it")
            updated = Distribution.update(
                state=DISTRIBUTED, step="manual", actor=actor[:320], decided_at=utcnow(),
                reason=(f"dispatched by {actor}" + (f": {note}" if note else ""))[:2000] + f" -> {info.email}",
            ).where((Distribution.id == rec.id) & (Distribution.state == UNDISTRIBUTED)).execute()
            if updated != 1:
                raise DispatchError(f"message {record_id} was dispatched meanwhile")
            rec = Distribution.get_by_id(rec.id)
            outcome = Outcome(rec, new=True, inquiry=inquiry)
            self._deliver(rec, employee_id, inquiry, outcome)
        self._after_commit(outcome)
        self.finish(outcome, raw)
        return outcome
