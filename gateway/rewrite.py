"""Sender rewriting (统一对外地址): the company address goes out instead of the
employee's, in the envelope (MAIL FROM) and in the From header together, so
SPF, DKIM and DMARC all see one domain.

- From: display name from a template (``"{name} | ACME Trading"``) and the
  address template (``"sales@acme.test"`` or ``"{local}@acme.test"``).
- Sender: removed (it would name the employee's mailbox) or set to the employee.
- Reply-To: ``keep`` what the client sent, ``company`` (the rewritten From) or
  ``employee`` (replies go straight to the salesperson).
- The outgoing Message-ID is recorded with the employee (``SentMessage``), so a
  reply to the company address can be routed back (``employee_for_reply``).
"""

from __future__ import annotations

import logging
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.utils import formataddr

from gateway.mutate import Outgoing
from gateway.policy.context import Context
from gateway.rules.headerblock import HeaderBlock

log = logging.getLogger("mailgate.rewrite")

REPLY_TO_POLICIES = ("keep", "company", "employee")
SENDER_POLICIES = ("remove", "employee")
ADDRESS_FIELDS = ("local", "domain", "email", "company_domain")
NAME_FIELDS = ("name", "company", "email")


def check_template(template: str, allowed: Iterable[str]) -> None:
    """Raise ValueError unless every {field} in ``template`` is allowed."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValueError(f"template {template!r}: {exc}") from None
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(f"template {template!r}: unknown field {{{bad[0]}}}; use {', '.join(allowed)}")


def record_message_id(message_id: str, employee_id: int, company_address: str) -> None:
    """Remember which employee sent ``message_id`` (blocking DB write).  A NUL in it is stored
    as a space, as ``header_text`` reads it (PostgreSQL refuses NUL in text)."""
    from gateway.db.models import SentMessage

    SentMessage.insert(
        message_id=message_id.replace("\x00", " ")[:998], employee=employee_id, company_address=company_address
    ).on_conflict_ignore().execute()


def employee_for_reply(in_reply_to: str = "", references: str = "") -> int | None:
    """The employee who sent the message a reply refers to, or None.

    In-Reply-To first, then References newest first (RFC 5322 §3.6.4)."""
    from gateway.db.models import SentMessage

    ids = in_reply_to.split() + list(reversed(references.split()))
    for mid in ids:
        row = SentMessage.get_or_none(SentMessage.message_id == mid.strip())
        if row is not None and row.employee_id is not None:
            return row.employee_id
    return None


@dataclass
class RewriteSender:
    address: str
    display_name: str = "{name}"
    reply_to: str = "keep"
    sender: str = "remove"
    company: str = ""
    company_domain: str = ""
    recorder: Callable[[str, int, str], None] | None = field(default=record_message_id, repr=False)
    stage: str = "rewrite_sender"

    def __post_init__(self) -> None:
        check_template(self.address, ADDRESS_FIELDS)
        check_template(self.display_name, NAME_FIELDS)
        if self.reply_to not in REPLY_TO_POLICIES:
            raise ValueError(f"reply_to: one of {', '.join(REPLY_TO_POLICIES)} (got {self.reply_to!r})")
        if self.sender not in SENDER_POLICIES:
            raise ValueError(f"sender: one of {', '.join(SENDER_POLICIES)} (got {self.sender!r})")
        if "@" not in self.address:
            raise ValueError(f"address {self.address!r}: must contain @")

    def company_address(self, ctx: Context) -> str:
        local, _, domain = ctx.mail_from.rpartition("@")
        email_ = ctx.employee.email if ctx.employee else ctx.mail_from
        return self.address.format(local=local, domain=domain, email=email_, company_domain=self.company_domain).lower()

    def display(self, ctx: Context) -> str:
        emp = ctx.employee
        return self.display_name.format(
            name=emp.name if emp else "", company=self.company, email=emp.email if emp else ctx.mail_from
        ).strip()

    def apply(self, out: Outgoing, ctx: Context) -> None:
        emp = ctx.employee
        if emp is None:
            out.notes.append("rewrite_sender skipped: no employee")
            return
        address = self.company_address(ctx)
        name = self.display(ctx)
        hb = HeaderBlock(out.data)
        hb.set("From", formataddr((name, address), charset="utf-8"))
        if self.sender == "remove":
            hb.remove("Sender")
        else:
            hb.set("Sender", emp.email)
        if self.reply_to == "company":
            hb.set("Reply-To", formataddr((name, address), charset="utf-8"))
        elif self.reply_to == "employee":
            hb.set("Reply-To", formataddr((emp.name, emp.email), charset="utf-8"))
        out.data = hb.to_bytes()
        out.mail_from = address
        out.notes.append(f"sender rewritten to {address}")
        message_id = (hb.get("Message-ID") or "").strip()
        if message_id and self.recorder is not None:
            try:
                self.recorder(message_id, emp.id, address)
            except Exception:
                log.exception("could not record Message-ID %s for employee %s", message_id, emp.id)

    def describe(self) -> str:
        return (f"rewrite sender to {self.display_name!r} <{self.address}>, "
                f"Reply-To {self.reply_to}, Sender {self.sender}")
