"""Delivering one employee's copy: forward through the relay queue, or IMAP APPEND.

The copy is the original message byte for byte, with header lines prepended:
``Resent-From`` (the shared address), ``Resent-To`` (the employee), ``Resent-Date``,
``Resent-Message-ID``, ``X-Mailgate-Distribution-Id`` (record-employee, the idempotency
mark and the loop guard) and, when the original has none, ``Reply-To`` naming the
original sender, so a reply goes to the customer and not to the shared address.
The original From stays the first author, so the client's list shows the customer.

Forward: the spool file is written and fsynced, and the queue row inserted inside the
caller's transaction (the one that records the decision), so a decision and its
forward are committed together or not at all.

APPEND: the delivery row is committed first (state ``pending``); the append searches
the target mailbox for the X-Mailgate-Distribution-Id before appending, so a crash
between APPEND and marking the row ``appended`` never makes a second copy.
Blocking: call from a worker thread.
"""

from __future__ import annotations

import email.utils
import logging
import re
import secrets
from collections.abc import Callable
from typing import Any

from gateway.db.models import utcnow
from gateway.distribute.inquiry import LOOP_HEADER, Inquiry
from gateway.distribute.schema import APPENDED, PENDING, QUEUED, DistDelivery
from gateway.spool import Spool, new_queue_id

log = logging.getLogger(__name__)

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_UNSAFE = re.compile(r"[\r\n\x00]")


def _clean(value: str, limit: int = 900) -> str:
    return _UNSAFE.sub(" ", value)[:limit]


def build_copy(raw: bytes, inquiry: Inquiry, shared: str, employee_email: str, delivery_id: str,
               hostname: str = "mailgate.invalid") -> bytes:
    """The employee's copy: Resent-* and distribution headers prepended to ``raw``."""
    eol = b"\r\n" if b"\r\n" in raw[:4096] or not raw else b"\n"
    lines = [
        f"Resent-From: {_clean(shared)}",
        f"Resent-To: {_clean(employee_email)}",
        f"Resent-Date: {email.utils.formatdate(localtime=False)}",
        f"Resent-Message-ID: <dist.{_clean(delivery_id, 60)}.{secrets.token_hex(6)}@{_clean(hostname, 200)}>",
        f"{LOOP_HEADER}: {_clean(delivery_id, 60)}",
    ]
    if not inquiry.reply_to and inquiry.from_addr:
        lines.append(f"Reply-To: {_clean(inquiry.from_addr, 320)}")
    return eol.join(line.encode("ascii", "replace") for line in lines) + eol + raw


def forward(spool: Spool, raw: bytes, inquiry: Inquiry, shared: str, sender: str,
            delivery: DistDelivery, employee_email: str, hostname: str) -> None:
    """Queue the forward and fill ``delivery.queue_id`` (inside the caller's transaction)."""
    data = build_copy(raw, inquiry, shared, employee_email, delivery.delivery_id, hostname)
    queue_id = new_queue_id()
    spool.write(queue_id, data)
    spool.insert(queue_id, sender, [employee_email], len(data), employee_id=delivery.employee_id,
                 message_id=inquiry.message_id)
    delivery.queue_id = queue_id
    delivery.state = QUEUED
    delivery.save()


class Appender:
    """IMAP APPEND into employees' mailboxes; idempotent per delivery id.

    ``connect(employee_email)`` returns a logged-in client (see gateway.distribute.imapconn)."""

    def __init__(self, connect: Callable[[str], Any], folder: str = "INBOX"):
        self._connect = connect
        self.folder = folder
        self._clients: dict[str, Any] = {}

    def _client(self, employee_email: str) -> Any:
        client = self._clients.get(employee_email)
        if client is None:
            if len(self._clients) >= 20:  # bounded: drop the oldest connection
                self._drop(next(iter(self._clients)))
            client = self._connect(employee_email)
            self._clients[employee_email] = client
        return client

    def _drop(self, employee_email: str) -> None:
        client = self._clients.pop(employee_email, None)
        if client is not None:
            try:
                client.logout()
            except Exception:
                pass

    def append(self, data: bytes, employee_email: str, delivery_id: str, check: bool = True) -> bool:
        """Append unless a copy with this delivery id is there already; True if appended now.

        ``check=False`` skips the search: for a delivery recorded by this very run (no earlier
        attempt can exist), which keeps a header search of the whole folder off the hot path."""
        try:
            client = self._client(employee_email)
            if check:
                client.select_folder(self.folder)
                if client.search(["HEADER", LOOP_HEADER, delivery_id]):
                    return False
            client.append(self.folder, data)
            return True
        except Exception:
            self._drop(employee_email)
            raise

    def close(self) -> None:
        for address in list(self._clients):
            self._drop(address)


def finish_append(delivery: DistDelivery, raw: bytes, inquiry: Inquiry, shared: str, employee_email: str,
                  appender: Appender, hostname: str, first_attempt: bool = False) -> None:
    """Append a pending delivery (idempotently) and mark it appended.

    ``first_attempt``: the delivery row was committed by this run just now, so no copy can
    exist yet; otherwise (a restart, a repeated round) the folder is searched first."""
    if delivery.state != PENDING:
        return
    data = build_copy(raw, inquiry, shared, employee_email, delivery.delivery_id, hostname)
    appended = appender.append(data, employee_email, delivery.delivery_id, check=not first_attempt)
    if not appended:
        log.info("distribution %s: copy already in %s (an earlier run appended it)", delivery.delivery_id,
                 employee_email)
    DistDelivery.update(state=APPENDED, created_at=delivery.created_at or utcnow()).where(
        DistDelivery.id == delivery.id).execute()
    delivery.state = APPENDED
