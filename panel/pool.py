"""The public pool (公海): the automatic return rules and their daily sweep.

Claim (认领), assign (分配) and return by hand (退回) are ``gateway.customers.claim`` /
``release``; this module holds the rules for returning customers automatically
(the NetEase manual's 自动退公海), configured in ``[panel]``:

- ``pool_days_without_contact`` N: an owned customer with no mail contact for N days goes
  back.  The clock is the later of the last contact and the assignment (a customer just
  transferred or claimed gets N days with its new owner); never contacted and never
  assigned: its creation.
- ``pool_days_after_assignment`` M: M days after a customer was assigned, claimed or
  transferred, if no mail contact happened since, it goes back.
- customers in a stage of ``pool_exempt_stages`` (e.g. won) never go back automatically.

Nothing happens unless ``pool_auto_return``.  Mail contact is ``Customer.last_contact_at``,
which the gateway sets on accepted outbound mail.  ``sweep(rules, now)`` applies the rules
(idempotent; safe from several nodes: each return is guarded by ``pool == "owned"``).
Inside `mailgate run` the panel service starts ``run_daily``; by hand: `mailgate panel pool-sweep`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from gateway import oplog
from gateway.customers import STAGES, owner_ids, release
from gateway.db.models import Customer, utcnow
from gateway.groupcommit import write_transaction
from gateway.periodic import periodically

log = logging.getLogger(__name__)
MAX_DAYS = 3650
DAY = 24 * 3600.0


@dataclass(frozen=True)
class PoolRules:
    enabled: bool = False
    days_without_contact: int = 0
    days_after_assignment: int = 0
    exempt_stages: tuple[str, ...] = ("won",)

    @classmethod
    def from_config(cls, panel_cfg: Any) -> PoolRules:
        """From the ``[panel]`` section (panel.settings.PanelConfig)."""
        return cls(bool(panel_cfg.pool_auto_return), int(panel_cfg.pool_days_without_contact),
                   int(panel_cfg.pool_days_after_assignment), tuple(panel_cfg.pool_exempt_stages))

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.days_without_contact or self.days_after_assignment)


def check_rules(panel_cfg: Any) -> list[str]:
    """Config problems of the ``[panel] pool_*`` keys (called by panel.settings.validate)."""
    problems = []
    for name in ("pool_days_without_contact", "pool_days_after_assignment"):
        value = getattr(panel_cfg, name)
        if not 0 <= value <= MAX_DAYS:
            problems.append(f"[panel] {name}: 0-{MAX_DAYS} days (0 turns the rule off), got {value}")
    bad = [s for s in panel_cfg.pool_exempt_stages if s not in STAGES]
    if bad:
        problems.append(f"[panel] pool_exempt_stages: unknown stage(s) {', '.join(bad)} "
                        f"(known: {', '.join(STAGES)})")
    if panel_cfg.pool_auto_return and not (panel_cfg.pool_days_without_contact
                                           or panel_cfg.pool_days_after_assignment):
        problems.append("[panel] pool_auto_return: set pool_days_without_contact or pool_days_after_assignment")
    return problems


def due(rules: PoolRules, now: dt.datetime) -> list[tuple[int, str]]:
    """(customer id, reason) of every customer the rules return at ``now``."""
    if not rules.active:
        return []
    base = Customer.pool == "owned"
    if rules.exempt_stages:
        base &= Customer.stage.not_in(list(rules.exempt_stages))
    found: dict[int, str] = {}
    if rules.days_without_contact:
        cutoff = now - dt.timedelta(days=rules.days_without_contact)
        cond = (base
                & (Customer.last_contact_at.is_null() | (Customer.last_contact_at < cutoff))
                & (Customer.assigned_at.is_null() | (Customer.assigned_at < cutoff))
                & (Customer.last_contact_at.is_null(False) | Customer.assigned_at.is_null(False)
                   | (Customer.created_at < cutoff)))
        reason = f"auto: no mail contact for {rules.days_without_contact} days"
        for (cid,) in Customer.select(Customer.id).where(cond).tuples():
            found[cid] = reason
    if rules.days_after_assignment:
        cutoff = now - dt.timedelta(days=rules.days_after_assignment)
        cond = (base & (Customer.assigned_at < cutoff)
                & (Customer.last_contact_at.is_null() | (Customer.last_contact_at < Customer.assigned_at)))
        reason = f"auto: no mail contact within {rules.days_after_assignment} days of assignment"
        for (cid,) in Customer.select(Customer.id).where(cond).tuples():
            found.setdefault(cid, reason)
    return sorted(found.items())


def sweep(rules: PoolRules, now: dt.datetime | None = None) -> int:
    """Return due customers to the pool; returns how many.  Each one is logged (actor "system")."""
    from panel.customer_schema import PoolSweep

    now = now or utcnow()
    returned = 0
    for cid, reason in due(rules, now):
        with write_transaction():
            customer = Customer.get_or_none((Customer.id == cid) & (Customer.pool == "owned"))
            if customer is None:
                continue
            before = sorted(owner_ids(customer))
            release(customer, reason)
            oplog.record("system", "pool.auto_return", f"customer:{cid}", {"reason": reason, "owners": before})
            returned += 1
    with write_transaction():
        if PoolSweep.update(last_sweep_at=now, last_sweep_returned=returned).where(PoolSweep.id == 1).execute() == 0:
            PoolSweep.create(id=1, last_sweep_at=now, last_sweep_returned=returned)
    if returned:
        log.info("public pool: %d customers returned automatically", returned)
    return returned


def last_sweep() -> tuple[dt.datetime | None, int]:
    from panel.customer_schema import PoolSweep

    row = PoolSweep.get_or_none(PoolSweep.id == 1)
    return (row.last_sweep_at, row.last_sweep_returned) if row else (None, 0)


async def run_daily(rules: PoolRules, stopping: asyncio.Event, first_delay: float = 60.0) -> None:
    """Inside `mailgate run`: sweep shortly after start-up, then once a day, until ``stopping``."""
    await periodically(stopping, lambda: sweep(rules), DAY, first=first_delay, failure="public pool sweep failed")
