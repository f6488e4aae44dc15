"""Short notices the gateway writes to people (approvers, senders, notify
actions), queued like any other message through the durable spool."""

from __future__ import annotations

from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid
from typing import Any

from gateway.directory import Directory
from gateway.policy.context import Context
from gateway.rules.parties import resolve_parties


def notice_sender(cfg: Any) -> str:
    return cfg.approval.notice_from or f"postmaster@{cfg.company.domains[0]}"


def build_notice(sender: str, to: str, subject: str, text: str, company: str = "Mailgate") -> bytes:
    msg = EmailMessage()
    msg["From"] = f"{company} <{sender}>" if company else sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2])
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to this
    msg.set_content(text)
    return msg.as_bytes(policy=SMTP)


class SpoolNotifier:
    """Queues notices; DKIM-signed when a signer is given.  Blocking (spool writes)."""

    def __init__(self, cfg: Any, spool: Any, directory: Directory, signer: Any = None, on_queued: Any = None):
        self.cfg = cfg
        self.spool = spool
        self.directory = directory
        self.signer = signer
        self.on_queued = on_queued

    def send(self, to: str, subject: str, text: str) -> None:
        sender = notice_sender(self.cfg)
        data = build_notice(sender, to, subject, text, self.cfg.company.name)
        if self.signer is not None:
            data = self.signer.sign(data, sender.rpartition("@")[2])
        self.spool.enqueue(sender, [to], data, state="queued")
        if self.on_queued is not None:
            self.on_queued()

    def __call__(self, parties: list[str], subject: str, text: str, ctx: Context) -> None:
        """The rule ``notify`` action's hook (gateway.rules.actions.NOTIFIER)."""
        resolved, _ = resolve_parties(parties, ctx.employee, self.directory)
        for who in resolved:
            self.send(who if isinstance(who, str) else who.email, subject, text)
