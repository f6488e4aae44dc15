"""Server-side sessions: the browser holds a random token, the table its SHA-256.

A session ends on logout, after ``idle_minutes`` without a request, or
``absolute_hours`` after sign-in, whichever comes first.  ``last_seen`` is written at
most every TOUCH_SECONDS so that reading pages does not turn into a write per request.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets

from gateway.db.models import utcnow
from panel.schema import PanelSession

TOUCH_SECONDS = 30


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def create(kind: str, user_id: int, ip: str = "", user_agent: str = "") -> tuple[str, PanelSession]:
    """A new session; returns (cookie token, row)."""
    token = secrets.token_urlsafe(32)
    row = PanelSession.create(token_hash=token_hash(token), kind=kind, user_id=user_id,
                              csrf=secrets.token_urlsafe(32), ip=ip[:64], user_agent=user_agent[:300])
    return token, row


def lookup(token: str, idle_minutes: int, absolute_hours: int) -> tuple[PanelSession | None, bool]:
    """(row, expired): the live session for ``token``; an expired one is deleted."""
    if not token or len(token) > 200:
        return None, False
    row = PanelSession.get_or_none(PanelSession.token_hash == token_hash(token))
    if row is None:
        return None, False
    now = utcnow()
    if row.last_seen < now - dt.timedelta(minutes=idle_minutes) or \
            row.created_at < now - dt.timedelta(hours=absolute_hours):
        row.delete_instance()
        return None, True
    if row.last_seen < now - dt.timedelta(seconds=TOUCH_SECONDS):
        PanelSession.update(last_seen=now).where(PanelSession.id == row.id).execute()
        row.last_seen = now
    return row, False


def delete(token: str) -> None:
    if token:
        PanelSession.delete().where(PanelSession.token_hash == token_hash(token)).execute()


def delete_for_user(kind: str, user_id: int) -> int:
    """End every session of one user (deactivated, password changed)."""
    return PanelSession.delete().where((PanelSession.kind == kind) & (PanelSession.user_id == user_id)).execute()


def purge_expired(idle_minutes: int, absolute_hours: int) -> int:
    now = utcnow()
    return PanelSession.delete().where(
        (PanelSession.last_seen < now - dt.timedelta(minutes=idle_minutes))
        | (PanelSession.created_at < now - dt.timedelta(hours=absolute_hours))
    ).execute()


def add_flash(row: PanelSession, message: str) -> None:
    messages = json.loads(row.flashes or "[]")
    messages = (messages + [message])[-10:]
    row.flashes = json.dumps(messages, ensure_ascii=False)
    PanelSession.update(flashes=row.flashes).where(PanelSession.id == row.id).execute()


def pop_flashes(row: PanelSession) -> list[str]:
    if not row.flashes:
        return []
    messages = json.loads(row.flashes)
    row.flashes = ""
    PanelSession.update(flashes="").where(PanelSession.id == row.id).execute()
    return messages
