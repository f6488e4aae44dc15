"""Approval (审核) of held messages: PENDING -> APPROVED | REJECTED(reason) | EXPIRED.

A rule's ``hold_for_approval`` makes the verdict HOLD; the SMTP handler stores
the queue row as ``held`` and calls ``ApprovalService.record_hold``, which
keeps the message as submitted (before mutations), resolves the approvers
(the sender's manager, department head, named employees, a role), mails them
a summary with signed single-use approve/reject links, and tells the sender.

Approving runs the message through the policy again with ``ctx.approved``
set — hold rules step aside, a reject rule added meanwhile still refuses —
then through the mutations (rewrite, headers, DKIM last) into the spool as
``queued``.  Rejecting and expiry tell the sender why.  Everything here
blocks (DB, files): call it from worker threads or the CLI.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any

from peewee import IntegrityError

from gateway import oplog
from gateway.db.models import Approval, OutboundMessage, UsedApprovalToken, utcnow
from gateway.directory import Directory
from gateway.groupcommit import write_transaction
from gateway.policy.context import REJECT, Context, Verdict
from gateway.rules.notices import SpoolNotifier
from gateway.rules.parties import resolve_parties
from gateway.spool import note_written, write_durably

log = logging.getLogger("mailgate.approval")

PENDING, APPROVED, REJECTED, EXPIRED = "pending", "approved", "rejected", "expired"

TEXTS = {
    "held": {
        "zh-CN": ("邮件待审核：{subject}", "您的邮件已提交审核，审核通过后才会发出。\n\n"
                  "收件人：{recipients}\n主题：{subject}\n原因：{reason}\n审核人：{approvers}\n审核期限：{expires}\n"),
        "en": ("Held for approval: {subject}", "Your message is waiting for approval and will be sent once "
               "approved.\n\nTo: {recipients}\nSubject: {subject}\nReason: {reason}\nApprovers: {approvers}\n"
               "Decision due by: {expires}\n"),
    },
    "rejected": {
        "zh-CN": ("邮件未通过审核：{subject}", "您的邮件未通过审核，没有发出。\n\n"
                  "收件人：{recipients}\n主题：{subject}\n审核人：{actor}\n理由：{reason}\n"),
        "en": ("Not approved: {subject}", "Your message was not approved and has not been sent.\n\n"
               "To: {recipients}\nSubject: {subject}\nBy: {actor}\nReason: {reason}\n"),
    },
    "expired": {
        "zh-CN": ("邮件审核超时：{subject}", "您的邮件在审核期限内无人处理，没有发出。\n\n收件人：{recipients}\n"
                  "主题：{subject}\n"),
        "en": ("Approval expired: {subject}", "Nobody decided on your message in time; it has not been sent.\n\n"
               "To: {recipients}\nSubject: {subject}\n"),
    },
    "request": {
        "zh-CN": ("请审核：{sender} → {recipients}：{subject}", "{sender} 的邮件需要您审核。\n\n发件人：{sender}\n"
                  "收件人：{recipients}\n主题：{subject}\n大小：{size} 字节\n规则：{rule}\n原因：{reason}\n\n"
                  "批准：{approve_url}\n拒绝：{reject_url}\n\n链接在 {expires} 前有效，只能使用一次。\n"),
        "en": ("Approval needed: {sender} -> {recipients}: {subject}", "A message from {sender} needs your "
               "approval.\n\nFrom: {sender}\nTo: {recipients}\nSubject: {subject}\nSize: {size} bytes\n"
               "Rule: {rule}\nReason: {reason}\n\nApprove: {approve_url}\nReject: {reject_url}\n\n"
               "The links work once and until {expires}.\n"),
    },
}


class ApprovalError(Exception):
    """The approval cannot be acted on (unknown, already decided, bad or used link)."""


# -- link tokens -------------------------------------------------------------------------


def load_or_create_token_key(path: Path) -> bytes:
    """The key in ``path``, made first if there is none.  Safe when several processes start at
    once (the acceptors, the IMAP proxy, the panel: they also derive the failed-login marks'
    key from it, gateway/loginfail.py): the file appears whole, by a hard link that only the
    first process wins, and everybody reads the winner's key."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        write_durably(tmp, base64.b64encode(secrets.token_bytes(32)) + b"\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return base64.b64decode(path.read_bytes().strip())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class TokenClaims:
    approval_id: int
    action: str  # approve | reject
    expires: int  # unix time
    nonce: str


def make_token(key: bytes, approval_id: int, action: str, expires: int, nonce: str | None = None) -> str:
    if action not in ("approve", "reject"):
        raise ValueError(action)
    payload = f"{approval_id}:{action}:{expires}:{nonce or secrets.token_hex(12)}".encode()
    mac = hmac.new(key, payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(mac)}"


def verify_token(key: bytes, token: str, now: float) -> TokenClaims:
    """Check signature and expiry (not use): a GET may call this to show the page."""
    try:
        payload_text, mac_text = token.split(".", 1)
        payload, mac = _unb64(payload_text), _unb64(mac_text)
    except (ValueError, TypeError) as exc:
        raise ApprovalError("malformed link") from exc
    if not hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest()):
        raise ApprovalError("invalid link")
    try:
        aid, action, expires, nonce = payload.decode().split(":")
        claims = TokenClaims(int(aid), action, int(expires), nonce)
    except ValueError as exc:
        raise ApprovalError("malformed link") from exc
    if now > claims.expires:
        raise ApprovalError("link expired")
    return claims


def consume_token(claims: TokenClaims) -> None:
    """Mark the link used; a second use raises ApprovalError."""
    try:
        with write_transaction():
            UsedApprovalToken.create(nonce=claims.nonce)
    except IntegrityError:
        raise ApprovalError("link already used") from None


# -- queries for the CLI and the panel -------------------------------------------------------


def list_approvals(state: str | None = PENDING) -> list[Approval]:
    query = Approval.select().order_by(Approval.requested_at.desc())
    if state:
        query = query.where(Approval.state == state)
    return list(query)


def describe(approval_id: int) -> str | None:
    a = Approval.get_or_none(Approval.id == approval_id)
    if a is None:
        return None
    lines = [
        f"approval {a.id}  state {a.state}  queue {a.queue_id}",
        f"from:       {a.mail_from}",
        f"to:         {', '.join(json.loads(a.recipients))}",
        f"subject:    {a.subject}",
        f"size:       {a.size} bytes",
        f"rule:       {a.rule}  ({a.reason})",
        f"approvers:  {', '.join(json.loads(a.approvers))}",
        f"requested:  {a.requested_at:%Y-%m-%d %H:%M} UTC   expires: {a.expires_at:%Y-%m-%d %H:%M} UTC",
    ]
    if a.decided_at:
        lines.append(f"decided:    {a.decided_at:%Y-%m-%d %H:%M} UTC by {a.decided_by}"
                     + (f": {a.decision_reason}" if a.decision_reason else ""))
    return "\n".join(lines)


# -- the service ----------------------------------------------------------------------------


class ApprovalService:
    def __init__(self, cfg: Any, directory: Directory, spool: Any, *, policy: Any = None,
                 signer: Any = None, notifier: SpoolNotifier | None = None,
                 clock: Callable[[], dt.datetime] = utcnow, on_released: Callable[[], None] | None = None):
        self.cfg = cfg
        self.directory = directory
        self.spool = spool
        self.policy = policy
        self.signer = signer
        self.notifier = notifier or SpoolNotifier(cfg, spool, directory, signer, on_released)
        self.clock = clock
        self.on_released = on_released
        self._key: bytes | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> ApprovalService:
        """Everything from the config, for the CLI: DB, directory, rules, DKIM."""
        from gateway.db import connect
        from gateway.dkim import DkimSigner
        from gateway.policy import Policy
        from gateway.rules.loader import load_rules
        from gateway.spool import Spool

        connect(cfg.database.url)
        directory = Directory(cfg.company.domains, cfg.public_mail_domains)
        directory.load()
        rules, errors = load_rules(cfg.rules.dir)
        if errors:
            raise SystemExit("rules have errors; fix them first (mailgate rules check)")
        signer = DkimSigner.from_config(cfg) if cfg.dkim.enabled else None
        return cls(cfg, directory, Spool(cfg.spool_dir), policy=Policy(directory, rules), signer=signer)

    # -- keys and links --
    @property
    def key(self) -> bytes:
        if self._key is None:
            path = Path(self.cfg.approval.key_file)
            if not path.is_absolute() and self.cfg.path is not None:
                path = Path(self.cfg.path).parent / path
            self._key = load_or_create_token_key(path)
        return self._key

    def links(self, approval: Approval) -> dict[str, str]:
        expires = int(approval.expires_at.replace(tzinfo=dt.UTC).timestamp())
        base = self.cfg.approval.link_base_url.rstrip("/")
        return {action: f"{base}/{action}?t={make_token(self.key, approval.id, action, expires)}"
                for action in ("approve", "reject")}

    def _original_path(self, queue_id: str) -> Path:
        return self.spool.directory / f"{queue_id}.orig.eml"

    def _text(self, key: str, **values: Any) -> tuple[str, str]:
        lang = self.cfg.company.language
        subject, body = TEXTS[key].get(lang, TEXTS[key]["en"])
        return subject.format(**values), body.format(**values)

    def _values(self, a: Approval, **extra: Any) -> dict[str, Any]:
        return {"subject": a.subject, "recipients": ", ".join(json.loads(a.recipients)), "sender": a.mail_from,
                "reason": a.reason, "rule": a.rule, "size": a.size,
                "expires": f"{a.expires_at:%Y-%m-%d %H:%M} UTC",
                "approvers": ", ".join(json.loads(a.approvers))} | extra

    def _tell_sender(self, a: Approval, key: str, **extra: Any) -> None:
        if not self.cfg.approval.notify_sender or not a.mail_from:
            return
        employee = self.directory.employee(a.employee_id) if a.employee_id else None
        to = employee.email if employee else a.mail_from
        try:
            self.notifier.send(to, *self._text(key, **self._values(a, **extra)))
        except Exception:
            log.exception("approval %s: could not queue the %s notice to %s", a.id, key, to)

    # -- hold --
    def record_hold(self, ctx: Context, verdict: Verdict, queue_id: str) -> Approval:
        """After the handler stored the queue row as ``held``: remember the message as
        submitted, resolve approvers, mail them their links, tell the sender.  Inside the
        handler's group-commit job: should the job or its commit fail, the committer removes
        the original (``<id>.orig.eml``) and the notices' spool files (``files_written``) —
        unless the commit's outcome is unknown, when the orphan sweep decides."""
        write_durably(self._original_path(queue_id), ctx.raw)
        note_written(self._original_path(queue_id))
        resolved, problems = resolve_parties(verdict.approvers, ctx.employee, self.directory)
        approvers = [who if isinstance(who, str) else who.email for who in resolved]
        if ctx.employee is not None and ctx.employee.email in approvers and len(approvers) > 1:
            approvers.remove(ctx.employee.email)  # nobody approves their own message
        for p in problems:
            log.warning("%s: approver %s", queue_id, p)
        now = self.clock()
        a = Approval.create(
            queue_id=queue_id, employee=ctx.employee.id if ctx.employee else None, mail_from=ctx.mail_from,
            recipients=json.dumps(ctx.rcpt_tos), subject=ctx.subject[:2000], size=len(ctx.raw),
            rule=verdict.rule, reason=verdict.reason, approvers=json.dumps(approvers),
            original_path=self._original_path(queue_id).name, requested_at=now,
            expires_at=now + dt.timedelta(hours=self.cfg.approval.expire_hours),
        )
        if not approvers:
            log.error("%s: held by %s but no approver could be found (%s)", queue_id, verdict.rule,
                      "; ".join(problems))
        links = self.links(a)
        for to in approvers:
            try:
                self.notifier.send(to, *self._text("request", **self._values(
                    a, approve_url=links["approve"], reject_url=links["reject"])))
            except Exception:
                log.exception("%s: could not queue the approval request to %s", queue_id, to)
        self._tell_sender(a, "held")
        return a

    # -- decisions --
    def _pending(self, approval_id: int) -> Approval:
        a = Approval.get_or_none(Approval.id == approval_id)
        if a is None:
            raise ApprovalError(f"no approval {approval_id}")
        if a.state == PENDING and a.expires_at <= self.clock():
            self._expire(a)
        if a.state != PENDING:
            raise ApprovalError(f"approval {approval_id} is already {a.state}")
        return a

    def _decide(self, a: Approval, state: str, actor: str, reason: str = "") -> bool:
        """Compare-and-set pending -> state; False if someone else decided first."""
        n = (Approval.update(state=state, decided_at=self.clock(), decided_by=actor[:320], decision_reason=reason)
             .where(Approval.id == a.id, Approval.state == PENDING).execute())
        a.state, a.decided_by, a.decision_reason = state, actor, reason
        if n == 1:  # every decision, whoever made it (panel, link, CLI, expiry), in the operation log
            oplog.record(actor, f"approval.{state}", f"approval:{a.id}",
                         {"queue_id": a.queue_id, "subject": a.subject[:200], "sender": a.mail_from,
                          "reason": reason})
        return n == 1

    def approve(self, approval_id: int, actor: str) -> Approval:
        a = self._pending(approval_id)
        row = OutboundMessage.get(OutboundMessage.queue_id == a.queue_id)
        raw = (self.spool.directory / a.original_path).read_bytes()
        ctx = self._context(a, raw)
        verdict = self.policy.decide(ctx) if self.policy is not None else Verdict()
        if verdict.action == REJECT:
            return self.reject(approval_id, actor=f"rule {verdict.rule}", reason=verdict.reason)
        if not self._decide(a, APPROVED, actor):
            raise ApprovalError(f"approval {approval_id} was decided meanwhile")
        out = self._mutate(ctx, verdict)
        write_durably(self.spool.directory / row.spool_path, out.data)
        (OutboundMessage.update(state="queued", mail_from=out.mail_from, recipients=json.dumps(out.recipients),
                                size=len(out.data), next_attempt_at=utcnow())
         .where(OutboundMessage.id == row.id, OutboundMessage.state == "held").execute())
        self._drop_original(a)
        log.info("approval %s: approved by %s; %s queued", a.id, actor, a.queue_id)
        if self.on_released is not None:
            self.on_released()
        return a

    def reject(self, approval_id: int, actor: str, reason: str) -> Approval:
        a = self._pending(approval_id)
        if not self._decide(a, REJECTED, actor, reason):
            raise ApprovalError(f"approval {approval_id} was decided meanwhile")
        self._drop_message(a, "rejected")
        log.info("approval %s: rejected by %s: %s", a.id, actor, reason)
        self._tell_sender(a, "rejected", actor=actor, reason=reason)
        return a

    def _expire(self, a: Approval) -> None:
        if self._decide(a, EXPIRED, "expiry"):
            self._drop_message(a, "expired")
            log.info("approval %s: expired", a.id)
            self._tell_sender(a, "expired")

    def expire_due(self) -> int:
        """Expire every pending approval past its time; run this every minute or so."""
        due = list(Approval.select().where(Approval.state == PENDING, Approval.expires_at <= self.clock()))
        for a in due:
            self._expire(a)
        return len(due)

    # -- links (the panel's confirm page POSTs here; a GET only calls verify_token) --
    def act_on_token(self, token: str, actor: str = "", reason: str = "") -> Approval:
        claims = verify_token(self.key, token, self.clock().replace(tzinfo=dt.UTC).timestamp())
        self._pending(claims.approval_id)
        consume_token(claims)
        actor = actor or "link"
        if claims.action == "approve":
            return self.approve(claims.approval_id, actor)
        return self.reject(claims.approval_id, actor, reason or "rejected by approver")

    # -- helpers --
    def _context(self, a: Approval, raw: bytes) -> Context:
        end = raw.find(b"\r\n\r\n")
        return Context(
            mail_from=a.mail_from, rcpt_tos=json.loads(a.recipients),
            headers=BytesHeaderParser(policy=compat32).parsebytes(raw[: end + 2] if end >= 0 else raw),
            raw=raw, employee=self.directory.employee(a.employee_id) if a.employee_id else None,
            approved=True, language=self.cfg.company.language,
        )

    def _mutate(self, ctx: Context, verdict: Verdict) -> Any:
        from gateway.dkim import DkimSign
        from gateway.mutate import apply_mutations

        if self.signer is not None and not any(getattr(m, "stage", "") == "sign" for m in verdict.mutations):
            verdict.mutations.append(DkimSign(self.signer))
        return apply_mutations(ctx, verdict, self.cfg)

    def _drop_original(self, a: Approval) -> None:
        try:
            (self.spool.directory / a.original_path).unlink()
        except FileNotFoundError:
            pass

    def _drop_message(self, a: Approval, state: str) -> None:
        row = OutboundMessage.get_or_none(OutboundMessage.queue_id == a.queue_id)
        if row is not None:
            OutboundMessage.update(state=state, done_at=utcnow()).where(OutboundMessage.id == row.id).execute()
            self.spool.remove(row)
        self._drop_original(a)
