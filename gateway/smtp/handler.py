"""The submission handler: aiosmtpd hooks, one small job each.

A message's path, top to bottom:
  EHLO  -> helo_problem
  AUTH  -> LoginGuard delay -> UpstreamAuthenticator.verify -> Identity
  MAIL  -> must be authenticated (or from a trusted network); the address must
           be the employee's own or an alias (553 otherwise)
  RCPT  -> syntax (no %-hacks, source routes …), recipient limit
  DATA  -> bare CR refused, bare LF normalised -> the header section and the MIME parts'
           header sections written as Postfix reads them (as_postfix_reads: one reading
           for the policy, the archive and the relay; over 1 MB refused) -> headers
           parsed -> From/Sender spoof check -> MIME structure that readers read
           differently refused (550 5.6.0, archived as refused; the rules not asked) ->
           policy.decide -> mutate (tag, rewrite, sign) -> archive + spool (fsync) -> 250

Nothing unexpected before the 250 reaches aiosmtpd (its "500 Error: (Type) text" is a
permanent code that shows internals): the policy raising answers 451 4.3.0 (POLICY_TEMPFAIL),
storing failing 452 4.3.1 / 451 4.3.0, anything else 451 4.3.0 (LOCAL_TEMPFAIL) — each logged
with the queue id and the user, counted as verdict "tempfail", and nothing of it stored.
A client that goes away while the commit is pending (aiosmtpd cancels the handler) leaves the
message to the commit's outcome: stored if it commits, removed if it fails (``_store``) — kept
for the orphan sweep if that outcome is unknown (``groupcommit.outcome_unknown``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import email.utils
import errno
import functools
import ipaddress
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any, NamedTuple, NoReturn

import peewee
from aiosmtpd.smtp import SMTP, AuthResult, Envelope
from aiosmtpd.smtp import Session as SMTPSession

from gateway import metrics
from gateway.archive import Archive, Capture, OriginalCopy, PreparedBlob, pending
from gateway.archive.mime_walk import parse_headers
from gateway.archive.pending import PENDING_MAX
from gateway.archive.schema import ArchiveRecord, ArchiveSighting
from gateway.config import Config
from gateway.db.errors import describe_db_error
from gateway.db.inserts import buffered_inserts, flush_inserts, insert_row
from gateway.db.models import Customer, OutboundMessage, utcnow
from gateway.directory import Directory, EmployeeInfo
from gateway.groupcommit import CommitterStopped, GroupCommitter, outcome_unknown
from gateway.i18n import t
from gateway.mutate import apply_mutations
from gateway.policy import ACCEPT, HOLD, REJECT, Context, Policy, Verdict
from gateway.policy.context import Session, ambiguous_mime_refusal, header_text
from gateway.policy.split import split_hold
from gateway.rules.headerblock import HeaderSectionTooLarge, as_postfix_reads
from gateway.smtp.auth import UpstreamAuthenticator, UpstreamUnavailable
from gateway.smtp.checks import (
    ForeignSender,
    address_problem,
    foreign_header_senders,
    has_bare_cr,
    helo_problem,
    normalize_bare_lf,
)
from gateway.smtp.errors import LOCAL_TEMPFAIL, POLICY_TEMPFAIL, PolicyError, describe_error
from gateway.smtp.guard import LoginGuard
from gateway.spool import Spool, SpoolError, archive_ref, new_queue_id
from gateway.untag import StripReadingTags

log = logging.getLogger("mailgate.smtp")

MAX_HEADER_BLOCK = 1024 * 1024  # a longer header section is refused (552)
READ_INLINE = 256 * 1024  # as_postfix_reads of a larger message (its MIME walk: Python work a part) in a thread


@dataclass
class Identity:
    """Who authenticated on this session.  ``password`` is kept only in memory,
    for relay.mode = employee_credentials; it is never logged (repr hides it)."""

    username: str
    employee: EmployeeInfo | None
    password: str = ""

    def __repr__(self) -> str:
        return f"Identity({self.username!r})"


class Prepared(NamedTuple):
    """A message part after phase 1 of storing (``SubmissionHandler._prepare``)."""

    ctx: Context
    verdict: Verdict
    queue_id: str
    outgoing: Any  # gateway.mutate.Outgoing: the final envelope and bytes
    credentials: bytes | None  # sealed employee login (relay.mode = employee_credentials)
    blob: PreparedBlob  # the archive blob, written and fsynced
    dirs: set  # folders of the files written, fsynced once per batch
    spool_path: str | None  # archive_ref of the blob, or None: the spool file
    original: OriginalCopy | None  # the submitted bytes, when mutations changed them
    sync_later: bool  # the blob file is not fsynced: its sealed bytes go in the transaction
    capture: Capture  # the archive's view, its rows' values staged (Archive.stage)


# Failures of the storage itself (logged as what they were), not bugs (logged by type and frames).
_STORAGE_ERRORS = (OSError, peewee.DatabaseError, peewee.InterfaceError, sqlite3.Error, CommitterStopped)


def smtp_reply(code: int, enhanced: str, text: str) -> str:
    """A (possibly multi-line) SMTP reply; every line bounded and free of CR/LF."""
    lines = [line.strip()[:400] for line in text.replace("\r", "").split("\n") if line.strip()] or [""]
    out = [f"{code}-{enhanced} {line}" for line in lines[:-1]]
    out.append(f"{code} {enhanced} {lines[-1]}")
    return "\r\n".join(out)


def _shown(name: str) -> str:
    """A display name for a reply line: at most 100 characters, ASCII control characters as
    spaces, the rest of non-ASCII as escapes (``\\uff20``: what hid the address shows)."""
    text = "".join(" " if c < " " or c == "\x7f" else c for c in name[:100])
    return text.encode("ascii", "backslashreplace").decode("ascii")


TRUSTED_MEMO = 4096  # client addresses whose trusted-network answer is remembered


def _run_after(queue_id: str, after: Callable[[], None], state: str) -> None:
    """``after`` (a stored or refused message's metrics, log line and relay wake-up), whose
    failure is logged and nothing more: the message's fate is decided (``state``), and an
    error now must not turn a 250 into a 451 (the client would send it again, and it would
    be relayed twice)."""
    try:
        after()
    except Exception as exc:
        summary, frames = describe_error(exc)
        log.error("%s: %s; what follows the store failed: %s\n%s", queue_id, state, summary, frames)


class SubmissionHandler:
    def __init__(
        self,
        cfg: Config,
        directory: Directory,
        policy: Policy,
        spool: Spool,
        archive: Archive,
        authenticator: UpstreamAuthenticator,
        guard: LoginGuard,
        credentials_key: bytes | None = None,
        on_queued=None,
        approvals=None,
        sign=None,
        rule_env=None,
        committer: GroupCommitter | None = None,
    ):
        self.cfg = cfg
        self.directory = directory
        self.policy = policy
        self.spool = spool
        self.archive = archive
        archive.configure(cfg)  # the key file: the archive must work from the first message on
        self.authenticator = authenticator
        self.guard = guard
        self.credentials_key = credentials_key
        self.on_queued = on_queued or (lambda: None)
        self.approvals = approvals  # gateway.approval.ApprovalService: records holds
        self.sign = sign  # gateway.dkim.DkimSign mutation, or None when DKIM is off
        self.untag = StripReadingTags((cfg.imap.tag_own, cfg.imap.tag_colleague))
        self.rule_env = rule_env  # gateway.rules.env.RuleEnv: its history feeds first-contact
        self.committer = committer or GroupCommitter()
        self.trusted = tuple(ipaddress.ip_network(n, strict=False) for n in cfg.smtp.trusted_networks)
        self._trusted_memo: dict[str, bool] = {}
        self.language = cfg.company.language

    def __dir__(self) -> list[str]:
        from gateway.smtp.server import class_dir  # gateway.smtp.server imports this module

        return class_dir(self)

    # -- session facts -------------------------------------------------------
    def is_trusted(self, session: SMTPSession) -> bool:
        """Whether the client's address is in ``smtp.trusted_networks`` (asked at MAIL and at
        every RCPT: the answer is remembered per address, up to TRUSTED_MEMO of them)."""
        try:
            peer = session.peer[0]
        except (TypeError, IndexError):
            return False
        known = self._trusted_memo.get(peer)
        if known is None:
            try:
                ip = ipaddress.ip_address(peer)
            except (TypeError, ValueError):
                return False
            known = any(ip in net for net in self.trusted)
            if len(self._trusted_memo) >= TRUSTED_MEMO:
                self._trusted_memo.clear()
            self._trusted_memo[peer] = known
        return known

    @staticmethod
    def identity(session: SMTPSession) -> Identity | None:
        data = session.auth_data
        return data if session.authenticated and isinstance(data, Identity) else None

    # -- EHLO/HELO -----------------------------------------------------------
    async def handle_EHLO(self, server: SMTP, session: SMTPSession, envelope: Envelope, hostname: str, responses):
        if problem := helo_problem(hostname):
            session.host_name = None
            return [f"501 5.5.2 {problem}"]
        session.host_name = hostname
        return responses

    async def handle_HELO(self, server: SMTP, session: SMTPSession, envelope: Envelope, hostname: str):
        if problem := helo_problem(hostname):
            return f"501 5.5.2 {problem}"
        session.host_name = hostname
        return f"250 {server.hostname}"

    # -- AUTH (PLAIN and LOGIN, checked against the upstream) ----------------
    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = base64.b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await server.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return await self._login(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            user = await server.challenge_auth("Username:")
        else:
            try:
                user = base64.b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        if not isinstance(user, bytes):
            return AuthResult(success=False, handled=True)
        password = await server.challenge_auth("Password:")
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._login(server, user, password)

    async def _login(self, server: SMTP, user_b: bytes, password_b: bytes) -> AuthResult:
        try:
            username = user_b.decode("utf-8")
            password = password_b.decode("utf-8")
        except UnicodeDecodeError:
            return AuthResult(success=False, handled=False)
        if not username or len(username) > 320 or any(c in username for c in "\r\n\x00"):
            return AuthResult(success=False, handled=False)
        ip = server.session.peer[0] if server.session and server.session.peer else ""
        await self.guard.prepare(ip, username)  # the shared record read only where failures are known
        delay = self.guard.delay(ip, username, password_b)  # the same password in flight: not counted
        self.guard.begin(ip, username, password_b)
        ok, undecided = False, False  # undecided: the upstream was unavailable (not counted as a failure)
        settled = False
        try:
            if delay:
                await asyncio.sleep(delay)  # the penalty itself, not a wait for an event
            try:
                ok = await self.authenticator.verify(username, password, ip)
            except UpstreamUnavailable:
                undecided = True
                metrics.auth_results.labels("smtp", "unavailable").inc()
                log.warning("auth user=%s ip=%s result=upstream-unavailable", username, ip)
                return AuthResult(
                    success=False, handled=False, message="454 4.7.0 Temporary authentication failure, try again later"
                )
            settled = True
        finally:
            if undecided:
                self.guard.abandon(ip, username, password_b)
            elif not settled:  # cancelled in the check (the session cut): counted here, as a failure
                self.guard.end(ip, username, False, password_b)
        await self.guard.settle(ip, username, ok, password_b)  # a failure written to the shared record before the 535
        metrics.auth_results.labels("smtp", "ok" if ok else "failed").inc()
        log.info("auth user=%s ip=%s result=%s delay=%.2f", username, ip, "ok" if ok else "failed", delay)
        if not ok:
            return AuthResult(success=False, handled=False)  # aiosmtpd answers 535 5.7.8
        if self.directory.deactivated(username):  # left the company: the upstream may not know yet
            metrics.auth_results.labels("smtp", "deactivated").inc()
            log.warning("auth user=%s ip=%s refused: employee deactivated", username, ip)
            return AuthResult(success=False, handled=False, message="535 5.7.8 This account has been deactivated")
        employee = self.directory.employee_for_address(username)
        return AuthResult(success=True, auth_data=Identity(username, employee, password))

    # -- envelope --------------------------------------------------------------
    async def handle_MAIL(self, server: SMTP, session: SMTPSession, envelope: Envelope, address: str, options):
        ident = self.identity(session)
        if ident is None and not self.is_trusted(session):
            if not server.is_tls:
                return "530 5.7.0 Must issue a STARTTLS command first"
            return "530 5.7.0 Authentication required"
        if address and (problem := address_problem(address)):
            return f"553 5.1.7 {problem}"
        if ident is not None:
            own = self._own_addresses(ident)
            if address.lower() not in own:
                return smtp_reply(553, "5.7.1", f"Sender address <{address}> is not yours; send as one of: "
                                  + ", ".join(sorted(own)[:5]))
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    def _spoofed_header(self, foreign: list[ForeignSender], ident: Identity, session: SMTPSession) -> str:
        """550 for a From/Sender field naming someone else, in its address or its display name
        (nothing is stored; the log names the address, never the display name's other text)."""
        first = foreign[0]
        address = first.address[:200]
        metrics.smtp_messages.labels("refused").inc()
        reason = "header-display-name-not-own" if first.display_name else "header-sender-not-own"
        log.warning("refused user=%s ip=%s reason=%s address=<%s>", ident.username, session.peer[0], reason,
                    address)
        own = ", ".join(sorted(self._own_addresses(ident))[:5])
        if first.display_name:
            return smtp_reply(550, "5.7.1", f'From/Sender display name "{_shown(first.display_name)}" names the '
                              f"address <{address}>, which is not yours; put a name there, or one of: {own}")
        return smtp_reply(550, "5.7.1", f"From/Sender header address <{address}> is not yours; "
                          "send as one of: " + own)

    @staticmethod
    def _ambiguous(ctx: Context, queue_id: str, ident: Identity | None, session: SMTPSession) -> Verdict:
        """The refusal of a message whose MIME structure readers read differently, the rules
        not asked (``ambiguous_mime_refusal``); the log line says what and where (field names
        and part numbers, nothing of the content)."""
        log.warning("%s: refused user=%s ip=%s reason=ambiguous-mime what=%s", queue_id,
                    ident.username if ident else "-", session.peer[0], ctx.ambiguous_mime)
        return ambiguous_mime_refusal(ctx, ctx.ambiguous_mime)

    def _own_addresses(self, ident: Identity) -> set[str]:
        if ident.employee is None:
            return {ident.username.lower()}
        return self.directory.addresses_of(ident.employee.id) | {ident.username.lower()}

    async def handle_RCPT(self, server: SMTP, session: SMTPSession, envelope: Envelope, address: str, options):
        if self.identity(session) is None and not self.is_trusted(session):
            return "530 5.7.0 Authentication required"
        if problem := address_problem(address):
            return f"553 5.1.3 {problem}"
        if len(envelope.rcpt_tos) >= self.cfg.smtp.max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    # -- DATA --------------------------------------------------------------------
    async def handle_DATA(self, server: SMTP, session: SMTPSession, envelope: Envelope) -> str:
        started = time.monotonic()
        data: bytes = envelope.original_content or b""
        ident = self.identity(session)
        if has_bare_cr(data):
            log.warning("refused from=<%s> reason=bare-cr ip=%s", envelope.mail_from, session.peer[0])
            return "550 5.6.0 Message contains bare CR characters; refused (SMTP smuggling protection)"
        data = normalize_bare_lf(data)
        if len(data) > self.cfg.smtp.max_message_size:
            return "552 5.3.4 Message size exceeds fixed maximum message size"
        queue_id = new_queue_id()
        try:
            # One reading of the header section from here on (gateway/rules/headerblock.py):
            # what the spoof check and the policy read is what is archived and relayed.
            ambiguous: list[str] = []  # MIME structure readers read differently (refused below)
            try:
                if len(data) > READ_INLINE:  # many MIME parts to walk, perhaps: off the event loop
                    read, body_at = await asyncio.to_thread(as_postfix_reads, data, MAX_HEADER_BLOCK, ambiguous)
                else:
                    read, body_at = as_postfix_reads(data, MAX_HEADER_BLOCK, ambiguous)
            except HeaderSectionTooLarge:
                log.warning("refused from=<%s> reason=header-section-too-large ip=%s", envelope.mail_from,
                            session.peer[0])
                return "552 5.3.4 Message header section exceeds 1 MB"
            ctx = self._context(server, session, envelope, read, body_at, data, queue_id, ident)
            ctx.ambiguous_mime = ambiguous[0] if ambiguous else ""
            if ident is not None and (foreign := foreign_header_senders(ctx.headers, self._own_addresses(ident))):
                return self._spoofed_header(foreign, ident, session)
            if ctx.ambiguous_mime:  # the rules would guess what the recipient sees: refused (and archived)
                verdict, free = self._ambiguous(ctx, queue_id, ident, session), None
                prepared = await asyncio.to_thread(self._prepare_refusal, ctx, queue_id)
            else:
                # One trip to a worker thread for the policy (body and attachment conditions parse
                # MIME, ~10 ms/MB) and phase 1 of the store (sealing, fsyncs): off the loop.
                ctx, verdict, free, prepared = await self._decided(ctx, queue_id, ident)
            after = functools.partial(self._after_store, started, queue_id, envelope.mail_from, ctx, verdict, free)
            reply = await self._store(ctx, verdict, queue_id, prepared, also=free, after=after)
        except SpoolError as exc:
            return self._store_failure_reply(exc, queue_id, session, ident)
        except PolicyError as exc:
            return self._temporary_failure(exc.__cause__ or exc, "policy decision", POLICY_TEMPFAIL, queue_id,
                                           session, ident)
        except Exception as exc:  # an unexpected one: 451, never aiosmtpd's 500
            return self._temporary_failure(exc, "submission", LOCAL_TEMPFAIL, queue_id, session, ident)
        _run_after(queue_id, after, "stored and answered 250")
        return reply

    def _context(self, server: SMTP, session: SMTPSession, envelope: Envelope, data: bytes, body_at: int,
                 submitted: bytes, queue_id: str, ident: Identity | None) -> Context:
        """The policy's view of the message ``data`` (``as_postfix_reads`` of the client's
        ``submitted`` bytes; its body starts at ``body_at``), with the Received header (and a
        Message-ID) added."""
        trace = self._trace_headers(data[:body_at], session, queue_id, ident)
        block = trace + data[:body_at]
        repaired = submitted is not data  # as_postfix_reads gives the very bytes back otherwise
        data = trace + data
        # The email package's header parser, or its very result from a leaner one (28 → 8 µs a block).
        headers = parse_headers(block)
        if headers is None:
            headers = BytesHeaderParser(policy=compat32).parsebytes(block)
        employee = ident.employee if ident else self.directory.employee_for_address(envelope.mail_from)
        return Context(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            headers=headers,
            raw=data,
            submitted=trace + submitted if repaired else None,
            employee=employee,
            session=Session(
                peer_ip=session.peer[0],
                helo=session.host_name or "",
                tls=server.is_tls,
                authenticated=ident is not None,
                trusted_network=ident is None,
            ),
            language=self.language,
        )

    def _store_failure_reply(self, exc: SpoolError, queue_id: str, session: SMTPSession,
                             ident: Identity | None) -> str:
        """452 when the disk or database is full, else 451; nothing of the message was stored."""
        metrics.smtp_messages.labels("tempfail").inc()
        user, ip = ident.username if ident else "-", session.peer[0]
        cause = exc.__cause__
        if cause is not None and not isinstance(cause, _STORAGE_ERRORS):
            # A bug in phase 1 or 2 (a mutation, DKIM, the archive's staging): where, not its text.
            summary, frames = describe_error(cause)
            log.error("%s: store failed user=%s ip=%s error=%s; answered 451, nothing stored\n%s",
                      queue_id, user, ip, summary, frames)
        else:  # a storage error: what it was (a database error's SQLSTATE, never the values it quotes)
            log.error("%s: store failed user=%s ip=%s: %s", queue_id, user, ip,
                      describe_db_error(cause if cause is not None else exc))
        if exc.errno == errno.ENOSPC or "database or disk is full" in str(exc):
            return "452 4.3.1 Insufficient system storage, try again later"
        return "451 4.3.0 Temporary local problem storing the message, try again later"

    def _temporary_failure(self, exc: BaseException, stage: str, reply: str, queue_id: str, session: SMTPSession,
                           ident: Identity | None) -> str:
        """An unexpected exception before anything of the message was stored: logged (the
        queue id, the user, where it happened; not its text, which may quote the mail),
        counted, and answered with ``reply`` (451) so the client keeps the message."""
        metrics.smtp_messages.labels("tempfail").inc()
        summary, frames = describe_error(exc)
        log.error("%s: %s failed user=%s ip=%s error=%s; answered %s, nothing stored\n%s", queue_id, stage,
                  ident.username if ident else "-", session.peer[0], summary, reply[:3], frames)
        return reply

    def _after_store(self, started: float, queue_id: str, mail_from: str, ctx: Context, verdict: Verdict,
                     free: tuple | None) -> None:
        """The stored message's metrics, log line and relay wake-up."""
        employee = ctx.employee
        delay = time.monotonic() - started
        metrics.smtp_delay.observe(delay)
        metrics.smtp_messages.labels({ACCEPT: "accepted", REJECT: "refused", HOLD: "held"}[verdict.action]).inc()
        log.info(
            "%s: from=<%s> employee=%s nrcpt=%d size=%d verdict=%s%s delay=%.3f",
            queue_id, mail_from, employee.email if employee else "-", len(ctx.rcpt_tos),
            len(ctx.raw), verdict.action, f" rule={verdict.rule}" if verdict.rule else "", delay,
        )
        if free is not None:
            log.info("%s: from=<%s> nrcpt=%d verdict=accept split-from=%s", free[2], mail_from,
                     len(free[0].rcpt_tos), queue_id)
        if verdict.action == ACCEPT or free is not None:
            self.on_queued()

    def _trace_headers(self, head: bytes, session: SMTPSession, queue_id: str, ident: Identity | None) -> bytes:
        """What goes on top of the message: Received (one line each part, no client-controlled
        CR/LF) and a Message-ID if the header section ``head`` has none."""
        helo = session.host_name or "unknown"
        proto = "ESMTPSA" if ident else "ESMTP"
        received = (
            f"Received: from {helo} ([{session.peer[0]}])\r\n\tby {self.cfg.smtp.hostname} (Mailgate)"
            f" with {proto} id {queue_id};\r\n\t{email.utils.formatdate(localtime=False)}\r\n"
        ).encode("ascii", "replace")
        extra = b""
        if b"\nmessage-id:" not in b"\n" + head.lower():
            domain = self.cfg.company.domains[0]
            extra = f"Message-ID: <{queue_id}.{int(time.time())}@{domain}>\r\n".encode()
        return received + extra

    def _decide_and_prepare(self, ctx: Context, queue_id: str, ident: Identity | None) -> tuple:
        """Blocking (a worker thread): the verdict — a held message's free recipients split
        off (accepted at once, with their own queue id) when configured — and phase 1 of
        storing each part that is not refused (``_prepare``).  Returns (ctx, verdict, split-off
        part or None, prepared parts or None).  Raises PolicyError when the policy raised
        (nothing written yet), SpoolError when phase 1 failed (its files removed)."""
        try:
            verdict = self.policy.decide(ctx)
            free = None
            if verdict.action == HOLD and self.cfg.approval.split_recipients:
                split = split_hold(self.policy, ctx, verdict)
                if split is not None:
                    free, held = split
                    ctx, verdict = held.ctx, held.verdict
                    free = (free.ctx, free.verdict, new_queue_id())
        except Exception as exc:
            raise PolicyError("the policy decision failed") from exc
        untag = self.untag.needed(ctx)
        for v in (verdict, free[1] if free else None):
            if v is not None and untag and v.action != REJECT:
                v.mutations.append(self.untag)
            if v is not None and self.sign is not None and v.action != REJECT:
                v.mutations.append(self.sign)
        if verdict.action == REJECT:
            return ctx, verdict, free, self._prepare_refusal(ctx, queue_id)
        parts = [(ctx, verdict, queue_id)] + ([free] if free else [])
        try:
            return ctx, verdict, free, [self._prepare(c, v, q, ident) for c, v, q in parts]
        except BaseException as exc:
            self._store_failed(parts, exc)

    async def _decided(self, ctx: Context, queue_id: str, ident: Identity | None) -> tuple:
        """``_decide_and_prepare`` in a worker thread.  The thread runs to its end even if this
        session is cancelled meanwhile (the client went away, the session timed out): the
        spool files it wrote, for parts that will now never be committed, go when it ends."""
        # asyncio.to_thread's own steps, its future kept: shielded, no task of its own.
        run = functools.partial(contextvars.copy_context().run, self._decide_and_prepare, ctx, queue_id, ident)
        work = asyncio.get_running_loop().run_in_executor(None, run)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(functools.partial(self._prepared_abandoned, queue_id))
            raise

    def _prepared_abandoned(self, queue_id: str, work: asyncio.Future) -> None:
        """Done-callback of phase 1 after its session was cancelled: nothing is committed yet,
        nothing will be — the spool files go (archive blobs stay: content-addressed, perhaps
        another message's too, and harmless unreferenced).  A failed phase 1 removed its own."""
        if work.cancelled() or work.exception() is not None:
            return
        _, verdict, _, prepared = work.result()
        if verdict.action != REJECT:
            for part in prepared:
                self.spool.discard(part.queue_id)
        log.info("%s: the client went away before the verdict was made; nothing stored", queue_id)

    def _prepare_refusal(self, ctx: Context, queue_id: str) -> tuple[PreparedBlob, set] | None:
        """Phase 1 of a refused message's archive record: its blob, written (None if that
        failed: the record is then tried with the blob made in phase 2)."""
        try:
            blob = self.archive.prepare(ctx.raw)
            folder = self.archive.store.write(blob, sync_dir=False)
        except Exception:
            log.exception("%s: archiving a refused message: blob failed", queue_id)
            return None
        return blob, {folder} if folder is not None else set()

    def _store_failed(self, parts: list[tuple[Context, Verdict, str]], exc: BaseException) -> NoReturn:
        """Nothing of ``parts`` is stored: their spool files go (with a held message's original),
        a SpoolError is raised.  Unless the commit's outcome is unknown (``outcome_unknown``: the
        connection lost during the COMMIT, which PostgreSQL may have applied, or a WAL fsync
        failed after it): their rows may exist, so the files stay — the orphan sweep removes
        them if the rows do not, and keeps them for the relay or the approval if they do."""
        self._discard_unless_stored(parts, exc)
        if isinstance(exc, SpoolError):
            raise exc
        if isinstance(exc, OSError):
            raise SpoolError(exc.errno, f"store failed: {exc.strerror or exc}") from exc
        raise SpoolError(None, f"store failed: {exc}") from exc

    def _discard_unless_stored(self, parts: list[tuple[Context, Verdict, str]], exc: BaseException) -> None:
        """The files of ``parts`` after a failed store: removed when the failure is known to
        have stored nothing, kept when the commit's outcome is unknown (see ``_store_failed``)."""
        if outcome_unknown(exc):
            log.warning("%s: the commit's outcome is unknown; its files are kept for the orphan sweep (kept"
                        " if the message was stored after all, else removed)", ", ".join(q for _, _, q in parts))
            return
        for _, _, q in parts:
            self.spool.discard(q)

    async def _store(self, ctx: Context, verdict: Verdict, queue_id: str, prepared: Any,
                     also: tuple[Context, Verdict, str] | None = None,
                     after: Callable[[], None] = lambda: None) -> str:
        """Phase 2 of storing, then the reply text.  Raises SpoolError when nothing was stored.

        Phase 1 (``_prepare``, any worker thread, in parallel): mutations, sealing, the files.
        Phase 2 (the group-commit thread): archive record, queue row, approval, in
        one savepoint of a shared transaction; the 250 follows its commit.  ``also`` is
        the recipients split off a held message (accepted at once); both parts commit
        in the same savepoint, so the client's retry after a failure never duplicates.

        Once queued, the commit job runs whatever becomes of this session.  Cancelled while
        waiting for it (the client went away, the session timed out), the handler leaves the
        message to the job's outcome (``_commit_abandoned``): committed, it stays stored and
        ``after`` (the stored message's metrics, log line and relay wake-up) runs then;
        failed, its spool files go.  Never removed before: the job may still commit."""
        if verdict.action == REJECT:
            blob, dirs = prepared or (None, ())
            try:
                future = self.committer.enqueue(self._record_refusal, ctx, verdict, queue_id, blob, dirs=dirs)
                await self._outcome(future, functools.partial(self._refusal_abandoned, queue_id, after))
            except Exception as exc:  # the refusal is answered all the same
                log.error("%s: archive record of a refused message failed: %s\n%s", queue_id, describe_db_error(exc),
                          describe_error(exc)[1])
            summary = t("conflict.summary", self.language) + "\n" if verdict.rule == "send-conflict" else ""
            return smtp_reply(verdict.smtp_code, verdict.enhanced, summary + verdict.reason)
        parts = [(ctx, verdict, queue_id)] + ([also] if also else [])
        try:
            # The reply first: once committed, nothing may fail before the 250.
            if also:
                reply = f"250 2.0.0 {t('queued_split', self.language, queue_id=also[2], held_id=queue_id)}"
            elif verdict.action == HOLD:  # the sender's client shows it: the mail waits for an approver
                reply = f"250 2.0.0 {t('queued_held', self.language, queue_id=queue_id)}"
            else:
                reply = f"250 2.0.0 {t('queued', self.language, queue_id=queue_id)}"
            dirs = set().union(*(p.dirs for p in prepared))  # the blob's and spool file's folders
            future = self.committer.enqueue(self._commit_parts, prepared, dirs=dirs, many=self._commit_many)
        except Exception as exc:  # nothing queued: nothing can commit
            self._store_failed(parts, exc)
        try:
            await self._outcome(future, functools.partial(self._commit_abandoned, parts, after))
        except Exception as exc:  # the job failed: nothing of it committed
            self._store_failed(parts, exc)
        return reply

    @staticmethod
    async def _outcome(future: asyncio.Future, if_abandoned: Callable[[asyncio.Future], None]) -> Any:
        """The result of a queued group-commit job.  If this task is cancelled while it waits,
        the job goes on (the future is shielded) and ``if_abandoned(future)`` runs once its
        outcome is known; the cancellation goes on up (aiosmtpd ends the session)."""
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(if_abandoned)  # at once (soon) if it is known already
            raise

    def _commit_abandoned(self, parts: list[tuple[Context, Verdict, str]], after: Callable[[], None],
                          future: asyncio.Future) -> None:
        """The outcome of a commit whose session was cancelled before its 250 (a done-callback,
        on the event loop).  Committed: the message stays — it is relayed (or waits for
        approval); the client, who got no 250, may send it again (a duplicate: the accepted
        at-least-once cost).  Failed: its spool files go, as after any failed commit (unless its
        outcome is unknown: ``_store_failed``)."""
        queue_id = parts[0][2]
        error = None if future.cancelled() else future.exception()
        if error is not None:
            self._discard_unless_stored(parts, error)
            metrics.smtp_messages.labels("tempfail").inc()
            summary, frames = describe_error(error)
            stored = "perhaps stored (the commit's outcome is unknown)" if outcome_unknown(error) else "nothing stored"
            log.error("%s: the client went away before the 250 and the store failed: %s; %s\n%s",
                      queue_id, summary, stored, frames)
            return
        # (A cancelled future, which nothing here does, would leave the outcome unknown: the
        # files stay, for the job may have committed; sweep_orphans takes them if it did not.)
        split = f" (and {parts[1][2]}, split from it)" if len(parts) > 1 else ""
        log.warning("%s: client went away before the 250; the message is stored%s", queue_id, split)
        _run_after(queue_id, after, "stored, the client gone")

    @staticmethod
    def _refusal_abandoned(queue_id: str, after: Callable[[], None], future: asyncio.Future) -> None:
        """The archive record of a refused message whose session was cancelled before the
        refusal was answered: nothing to remove either way; its count and log line."""
        if not future.cancelled() and (error := future.exception()) is not None:
            summary, _ = describe_error(error)
            log.error("%s: archive record of a refused message failed: %s", queue_id, summary)
        log.info("%s: the client went away before the refusal was answered", queue_id)
        _run_after(queue_id, after, "refused, the client gone")

    def _prepare(self, ctx: Context, verdict: Verdict, queue_id: str, ident: Identity | None) -> Prepared:
        """Phase 1, blocking: the final bytes, the archive blob and (unless the blob serves
        as the queue's copy) the spool file, each fsynced; their directories are fsynced
        once per batch by the group commit, before its transaction (see ``submit(dirs=)``)."""
        outgoing = apply_mutations(ctx, verdict, self.cfg)
        credentials = None
        if self.cfg.relay.mode == "employee_credentials" and ident is not None:
            from gateway.credentials import seal

            credentials = seal(self.credentials_key, ident.username, ident.password, queue_id)
        # The archive blob (hash, zstd, AES-GCM, fsync), here in parallel: phase 2 (one thread
        # for everybody) then only inserts rows.  A crash before the commit leaves an
        # unreferenced blob, which is harmless (content-addressed, written again by the
        # client's retry).
        blob = self.archive.prepare(outgoing.data)
        # The node's blob syncer running (gateway/archive/pending.py): the file without an
        # fsync, its sealed bytes durable in the group commit's transaction instead.
        later = self.archive.sync_later and blob.data is not None and len(blob.data) <= PENDING_MAX
        folder = self.archive.store.write(blob, sync_dir=False, durable=not later)
        dirs = {folder} if folder is not None and not later else set()
        spool_path = None
        if self._queue_in_archive(verdict):
            # One durable write per message: the queue row points at the blob (same bytes).
            spool_path = archive_ref(blob.name, blob.sha256)
        else:
            self.spool.write(queue_id, outgoing.data, sync_dir=False)
            dirs.add(self.spool.directory)
        # The client's bytes as submitted, kept beside the changed ones (usually their header
        # section only, sealed into the record row; no second file).
        original = self.archive.original_copy(ctx.submitted or ctx.raw, outgoing.data)
        # The archive rows' values (digest, JSON) made here: the group commit, which holds the
        # database write lock, then only links and inserts them.
        capture = self.archive.stage(self._capture(ctx, verdict, queue_id, outgoing, original), blob)
        return Prepared(ctx, verdict, queue_id, outgoing, credentials, blob, dirs, spool_path, original, later,
                        capture)

    def _queue_in_archive(self, verdict: Verdict) -> bool:
        """Accepted mail is relayed from its archive blob, unless the spool is shared between
        nodes (another node's relay may take the row; the archive directory is this node's).
        Held mail keeps its spool file (approval rewrites it)."""
        return verdict.action == ACCEPT and not self.cfg.node.shared_spool

    def _archive_fields(self, ctx: Context, verdict: Verdict, queue_id: str) -> dict:
        return {
            "direction": "outbound", "subject": ctx.subject, "queue_id": queue_id, "reason": verdict.reason,
            "message_id": self._message_id(ctx),
            "employee_id": ctx.employee.id if ctx.employee else None,
            "employee_email": ctx.employee.email if ctx.employee else "",  # no lookup in the group commit
            "trace": [s.as_dict() for s in ctx.trace],
        }

    @staticmethod
    def _message_id(ctx: Context) -> str:
        return header_text(ctx.headers.get("Message-ID"))  # raw 8-bit bytes decoded, no NULs

    def _record_refusal(self, ctx: Context, verdict: Verdict, queue_id: str, blob: PreparedBlob | None) -> None:
        """Phase 2 of a refused message: only its archive record."""
        original = self.archive.original_copy(ctx.submitted, ctx.raw) if ctx.submitted else None
        self.archive.record(ctx.raw, verdict="refused", mail_from=ctx.mail_from, recipients=ctx.rcpt_tos,
                            prepared=blob, original=original, **self._archive_fields(ctx, verdict, queue_id))

    def _commit_parts(self, prepared: list[Prepared]) -> None:
        """Phase 2 of one message (and the part split off it), in the group-commit thread
        inside a savepoint."""
        self._commit_many([(prepared,)])

    def _commit_many(self, jobs: list[tuple[list[Prepared]]]) -> list[None]:
        """Phase 2 of every message of a group-commit batch (the batch form of
        ``_commit_parts``, one savepoint for all): the archive records and sightings with one
        look-up of content already archived, the queue rows, holds, and the recipients'
        last contact in one update."""
        parts = [part for (prepared,) in jobs for part in prepared]
        touched: list[str] = []
        # The records, sightings, blob rows and queue rows: one statement per table.
        with buffered_inserts((ArchiveRecord, ArchiveSighting, pending.ArchivePendingBlob, OutboundMessage)):
            self.archive.chain_batch([p.capture for p in parts], [p.blob for p in parts])
            for p in parts:
                if p.sync_later:
                    insert_row(pending.row(self.cfg.node.name, p.blob.name, p.blob.data))
                held = p.verdict.action == HOLD
                insert_row(self.spool.row(
                    p.queue_id, p.outgoing.mail_from, p.outgoing.recipients, len(p.outgoing.data),
                    employee_id=p.ctx.employee.id if p.ctx.employee else None,
                    message_id=self._message_id(p.ctx), credentials=p.credentials,
                    state="held" if held else "queued", spool_path=p.spool_path))
                if held:
                    if self.approvals is not None:
                        flush_inserts()  # the approval refers to its queue row
                        self.approvals.record_hold(p.ctx, p.verdict, p.queue_id)
                    continue
                touched.extend(p.outgoing.recipients)
                if self.rule_env is not None:
                    self._remember_contacts(p.ctx)
            self._touch_customers(touched)
        return [None] * len(jobs)

    def _capture(self, ctx: Context, verdict: Verdict, queue_id: str, outgoing: Any,
                 original: OriginalCopy | None) -> Capture:
        """The archive's view of an accepted or held part: the bytes as relayed, with the
        submitted ones beside them."""
        return Capture(raw=outgoing.data, place="smtp:submitted",
                       verdict="held" if verdict.action == HOLD else "accepted",
                       mail_from=outgoing.mail_from, recipients=list(outgoing.recipients),
                       original=original, **self._archive_fields(ctx, verdict, queue_id))

    def _touch_customers(self, recipients: list[str]) -> None:
        """Last contact (the public pool's auto-return clock) comes from real traffic."""
        ids = {m.customer.id for r in recipients if (m := self.directory.lookup(r)) is not None}
        if ids:
            Customer.update(last_contact_at=utcnow()).where(Customer.id.in_(sorted(ids))).execute()

    def _remember_contacts(self, ctx: Context) -> None:
        """Teach the first-contact condition which domains were written to."""
        from gateway.rules.facts import facts_for

        try:
            facts = facts_for(ctx, self.directory, self.rule_env)
            self.rule_env.history.record(facts.external_keys.values(), ctx.employee.id if ctx.employee else None)
        except Exception:
            log.exception("could not record contacted domains")
