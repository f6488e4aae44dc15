"""What a manager does by hand (panel and CLI): dispatch, mappings, the reject list, history.

Every change is written to the operation log (gateway.oplog) with the actor.
Blocking: call from a worker thread.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peewee import fn

from gateway import oplog
from gateway.config import PUBLIC_MAIL_DOMAINS, Config
from gateway.db.models import Employee, utcnow
from gateway.directory import Directory
from gateway.distribute.engine import DispatchError, Distributor, Outcome
from gateway.distribute.schema import (
    STATES,
    UNDISTRIBUTED,
    DistDelivery,
    DistMapping,
    DistReject,
    Distribution,
)
from gateway.groupcommit import write_transaction

log = logging.getLogger(__name__)

# Set by the service when it runs inside a node: wakes the relay after a manual dispatch.
WAKE: Callable[[], None] | None = None


class ManageError(ValueError):
    """Bad input from a manager: the message is shown as is."""


def normalize_key(value: str) -> str:
    """An address (local@domain) or a domain, lower-case; ManageError when it is neither."""
    key = value.strip().strip("<>").lower()
    if key.startswith("@"):
        key = key[1:]
    local, at, domain = key.rpartition("@")
    if at and not local:
        raise ManageError(f"{value!r} is not an address or domain")
    labels = domain.split(".")
    if (len(key) > 320 or len(labels) < 2 or any(not lb or len(lb) > 63 for lb in labels)
            or any(c.isspace() or c in "<>()[],;:\\\"*" for c in key)):
        raise ManageError(f"{value!r} is not an address or domain")
    return key


def employee_by_email(email: str) -> Employee:
    emp = Employee.get_or_none((Employee.email == email.strip().lower()) & (Employee.active == True))  # noqa: E712
    if emp is None:
        raise ManageError(f"no active employee {email!r}")
    return emp


# -- reject list and mappings ------------------------------------------------------
def add_reject(value: str, actor: str, note: str = "") -> DistReject:
    key = normalize_key(value)
    with write_transaction():
        row, created = DistReject.get_or_create(key=key, defaults={"note": note[:1000], "created_by": actor})
        if created:
            oplog.record(actor, "distribution.reject.add", key, {"note": note[:1000]})
    return row


def remove_reject(value: str, actor: str) -> bool:
    key = normalize_key(value)
    with write_transaction():
        removed = DistReject.delete().where(DistReject.key == key).execute()
        if removed:
            oplog.record(actor, "distribution.reject.remove", key)
    return bool(removed)


def set_mapping(value: str, employee_email: str, actor: str) -> DistMapping:
    """'Always send this address/domain to this employee' (replaces an earlier mapping of the key)."""
    key = normalize_key(value)
    emp = employee_by_email(employee_email)
    if "@" not in key and key in PUBLIC_MAIL_DOMAINS:
        raise ManageError(f"{key} is a public mail domain: map the exact address instead")
    with write_transaction():
        DistMapping.delete().where(DistMapping.key == key).execute()
        row = DistMapping.create(key=key, employee=emp, created_by=actor)
        oplog.record(actor, "distribution.mapping.set", key, {"employee": emp.email})
    return row


def remove_mapping(value: str, actor: str) -> bool:
    key = normalize_key(value)
    with write_transaction():
        removed = DistMapping.delete().where(DistMapping.key == key).execute()
        if removed:
            oplog.record(actor, "distribution.mapping.remove", key)
    return bool(removed)


# -- the shared copy --------------------------------------------------------------
def fetch_shared(cfg: Config, rec: Distribution, connect: Callable[[str], Any] | None = None) -> bytes:
    """The shared copy's bytes (read-only); DispatchError when it is gone or the folder was recreated."""
    from gateway.distribute.imapconn import connector

    client = (connect or connector(cfg))(rec.mailbox)
    try:
        info = client.select_folder(rec.folder, readonly=True)
        if int(info[b"UIDVALIDITY"]) != rec.uidvalidity:
            raise DispatchError("the shared folder was recreated (UIDVALIDITY changed); the message is gone")
        data = client.fetch([rec.uid], ["BODY.PEEK[]"]).get(rec.uid, {}).get(b"BODY[]")
        if data is None:
            raise DispatchError("the message is no longer in the shared mailbox")
        return data
    finally:
        try:
            client.logout()
        except Exception:
            pass


def _unmark(cfg: Config, rec: Distribution, connect: Callable[[str], Any] | None) -> None:
    from gateway.distribute.imapconn import connector

    try:
        client = (connect or connector(cfg))(rec.mailbox)
        try:
            info = client.select_folder(rec.folder)
            if int(info[b"UIDVALIDITY"]) == rec.uidvalidity:
                client.remove_flags([rec.uid], [cfg.distribution.undistributed_keyword], silent=True)
        finally:
            client.logout()
    except Exception as exc:  # cosmetic: the record is what counts
        log.warning("could not clear %s on UID %s: %s", cfg.distribution.undistributed_keyword, rec.uid, exc)


def distributor_for(cfg: Config, directory: Directory | None = None,
                    connect: Callable[[str], Any] | None = None) -> Distributor:
    from gateway.distribute.deliver import Appender
    from gateway.distribute.imapconn import connector
    from gateway.spool import Spool

    if directory is None:
        directory = Directory(cfg.company.domains, cfg.public_mail_domains)
        directory.load()
    spool = Spool(cfg.spool_dir, node="" if cfg.node.shared_spool else cfg.node.name)
    appender = Appender(connect or connector(cfg), cfg.distribution.append_folder)
    return Distributor(cfg, directory, spool, appender=appender, wake=WAKE)


def dispatch(cfg: Config, record_id: int, employee_email: str, actor: str, note: str = "", *,
             directory: Directory | None = None, connect: Callable[[str], Any] | None = None) -> Outcome:
    """Send an undistributed message to an employee, by hand."""
    emp = employee_by_email(employee_email)
    rec = Distribution.get_or_none(Distribution.id == record_id)
    if rec is None:
        raise DispatchError(f"no distribution record {record_id}")
    if rec.state != UNDISTRIBUTED:
        raise DispatchError(f"message {record_id} is {rec.state}, not undistributed")
    raw = fetch_shared(cfg, rec, connect)
    distributor = distributor_for(cfg, directory, connect)
    try:
        outcome = distributor.dispatch(record_id, emp.id, actor, raw, note)
    finally:
        if distributor.appender is not None:
            distributor.appender.close()
    oplog.record(actor, "distribution.dispatch", f"distribution:{record_id}",
                 {"employee": emp.email, "from": rec.from_addr, "subject": rec.subject[:200], "note": note[:500]})
    _unmark(cfg, rec, connect)
    return outcome


def create_customer_from(cfg: Config, record_id: int, name: str, owner_email: str, actor: str,
                         use_domain: bool = True) -> Any:
    """A customer from an undistributed message's sender (contact, and company domain unless public)."""
    from gateway import customers

    rec = Distribution.get_or_none(Distribution.id == record_id)
    if rec is None or not rec.from_addr:
        raise ManageError("no such message, or it has no sender address")
    owner = employee_by_email(owner_email)
    name = name.strip() or rec.from_name or rec.from_addr
    domain = rec.from_addr.rpartition("@")[2]
    domains = [domain] if use_domain and domain not in cfg.public_mail_domains else []
    try:
        customer = customers.create_customer(name[:300], contacts=[(rec.from_addr, rec.from_name)], domains=domains,
                                             owners=[owner], public_domains=cfg.public_mail_domains,
                                             source="distribution")
    except Exception as exc:  # unique contact/domain: someone has it already
        raise ManageError(f"could not create the customer: {exc}") from exc
    oplog.record(actor, "distribution.customer.create", f"customer:{customer.id}",
                 {"name": name[:300], "contact": rec.from_addr, "domains": domains, "owner": owner.email,
                  "distribution": record_id})
    return customer


def reject_message(cfg: Config, record_id: int, value: str, actor: str, note: str = "", *,
                   connect: Callable[[str], Any] | None = None) -> DistReject:
    """Put ``value`` (the sender's address or domain) on the reject list and retire an undistributed
    message of that sender: its record becomes ``rejected`` and the shared copy goes to Junk."""
    from gateway.distribute.router import list_keys
    from gateway.distribute.schema import REJECTED

    rec = Distribution.get_or_none(Distribution.id == record_id)
    if rec is None:
        raise ManageError(f"no distribution record {record_id}")
    key = normalize_key(value)
    if key not in list_keys(rec.from_addr):
        raise ManageError(f"{key} does not cover the sender {rec.from_addr}")
    row = add_reject(key, actor, note)
    if rec.state != UNDISTRIBUTED:
        return row
    with write_transaction():
        updated = Distribution.update(
            state=REJECTED, step="reject", actor=actor[:320], decided_at=utcnow(),
            reason=f"{rec.from_addr} put on the reject list ({key}) by {actor}"[:2000],
        ).where((Distribution.id == rec.id) & (Distribution.state == UNDISTRIBUTED)).execute()
        if updated:
            oplog.record(actor, "distribution.reject.message", f"distribution:{rec.id}",
                         {"key": key, "from": rec.from_addr, "subject": rec.subject[:200]})
    if updated:
        _to_junk(cfg, rec, connect)
    return row


def _to_junk(cfg: Config, rec: Distribution, connect: Callable[[str], Any] | None) -> None:
    from gateway.distribute.imapconn import connector
    from gateway.distribute.watcher import _move

    try:
        client = (connect or connector(cfg))(rec.mailbox)
        try:
            info = client.select_folder(rec.folder)
            if int(info[b"UIDVALIDITY"]) == rec.uidvalidity and client.search(["UID", str(rec.uid)]):
                client.remove_flags([rec.uid], [cfg.distribution.undistributed_keyword], silent=True)
                _move(client, [rec.uid], cfg.distribution.junk_folder)
        finally:
            client.logout()
    except Exception as exc:  # the record is what counts; the copy stays marked as handled
        log.warning("could not move UID %s of %s to %s: %s", rec.uid, rec.mailbox, cfg.distribution.junk_folder, exc)


# -- lists --------------------------------------------------------------------------
@dataclass
class HistoryFilter:
    state: str = ""
    step: str = ""
    employee: str = ""  # email
    sender: str = ""  # substring of the sender address
    mailbox: str = ""
    since: dt.datetime | None = None
    until: dt.datetime | None = None


def history(flt: HistoryFilter, limit: int = 50, offset: int = 0) -> tuple[list[Distribution], int]:
    """Distribution records, newest first, filtered; (page, total)."""
    q = history_query(flt)
    total = q.count()
    return list(q.order_by(Distribution.id.desc()).limit(limit).offset(offset)), total


def history_query(flt: HistoryFilter) -> Any:
    """The filtered (unordered) query of distribution records; ManageError on an unknown state."""
    q = Distribution.select()
    if flt.state:
        if flt.state not in STATES:
            raise ManageError(f"unknown state {flt.state!r}")
        q = q.where(Distribution.state == flt.state)
    if flt.step:
        q = q.where(Distribution.step == flt.step)
    if flt.sender:
        q = q.where(Distribution.from_addr.contains(flt.sender.lower()))
    if flt.mailbox:
        q = q.where(Distribution.mailbox == flt.mailbox.lower())
    if flt.since:
        q = q.where(Distribution.decided_at >= flt.since)
    if flt.until:
        q = q.where(Distribution.decided_at < flt.until)
    if flt.employee:
        sub = (DistDelivery.select(DistDelivery.distribution).join(Employee)
               .where(Employee.email == flt.employee.strip().lower()))
        q = q.where(Distribution.id.in_(sub))
    return q


def recipients_of(records: list[Distribution]) -> dict[int, list[str]]:
    """record id -> employee addresses its copies went to."""
    if not records:
        return {}
    out: dict[int, list[str]] = {}
    rows = (DistDelivery.select(DistDelivery.distribution, Employee.email).join(Employee)
            .where(DistDelivery.distribution.in_([r.id for r in records])).tuples())
    for rid, email in rows:
        out.setdefault(rid, []).append(email)
    return out


def counts() -> dict[str, int]:
    q = Distribution.select(Distribution.state, fn.COUNT(Distribution.id)).group_by(Distribution.state)
    return dict(q.tuples())
