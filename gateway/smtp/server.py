"""aiosmtpd servers: 587 with STARTTLS and 465 with implicit TLS.

``SubmissionSMTP`` adds what the stock server lacks for a gateway: a bound on
sessions, and a bound on concurrent DATA transfers (aiosmtpd holds a message
in memory while it arrives, so total memory is slots × max size).

At a stop (``SessionDrain.drain``, after the listeners closed) the open sessions end as
Postfix's do: one waiting for its next command is answered "421 4.3.2 Service shutting
down" at once and closed; one in the middle of a command — above all DATA, while the message
arrives and while it is being committed — finishes it, the client gets its 250 (or 451),
then the 421, and the session is closed; a command that arrives after the stop began is
answered 421.  The whole drain is bounded (``SESSION_GRACE``): a session still busy then is
cut (its message, if its commit was queued, is stored all the same — the client, who got no
250, may send it again: the at-least-once case of a lost 250).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import ssl
from typing import Any

import aiosmtpd.smtp
from aiosmtpd.smtp import MISSING, SMTP

from gateway.config import Config
from gateway.smtp.dataread import read_data
from gateway.smtp.errors import LOCAL_TEMPFAIL, describe_error
from gateway.smtp.handler import SubmissionHandler

log = logging.getLogger("mailgate.smtp")

DATA_SLOTS = 32
DATA_SLOT_WAIT = 30.0
# Seconds the sessions busy at a stop get, together, to finish their command: within the 15 s a
# node (or an acceptor process) has before it is killed, with the group commit still to stop.
SESSION_GRACE = 10.0
SHUTTING_DOWN = b"421 4.3.2 Service shutting down\r\n"


class _AuthMembers:
    """Stands in for ``inspect`` inside aiosmtpd.smtp, which calls
    ``inspect.getmembers(obj)`` on the server and the handler for every new
    connection only to find their ``auth_*`` methods — evaluating every attribute
    each time (a tenth of the accept path's CPU).  The names are looked up once
    per class; everything else is the real ``inspect``."""

    def __init__(self) -> None:
        self._names: dict[type, list[str]] = {}
        self._signatures: dict[Any, inspect.Signature] = {}

    def getmembers(self, obj: Any, predicate: Any = None) -> list[tuple[str, Any]]:
        names = self._names.get(type(obj))
        if names is None:
            names = self._names[type(obj)] = [n for n in dir(type(obj)) if n.startswith("auth_")]
        members = [(n, getattr(obj, n)) for n in names]
        return [(n, m) for n, m in members if predicate is None or predicate(m)]

    def signature(self, fn: Any) -> inspect.Signature:
        """aiosmtpd asks for the EHLO hook's signature on every connection: once per function."""
        key = getattr(fn, "__func__", fn)
        sig = self._signatures.get(key)
        if sig is None:
            sig = self._signatures[key] = inspect.signature(fn)
        return sig

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)


aiosmtpd.smtp.inspect = _AuthMembers()  # type: ignore[attr-defined]

_MAIL_LOG = logging.getLogger("mail.log")  # aiosmtpd's logger; gateway.cli sets it to ERROR
_sanitized_log = aiosmtpd.smtp.sanitized_log
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO}


def _sanitized_log_if_enabled(func: Any, msg: Any, *args: Any, **kwargs: Any) -> None:
    """aiosmtpd escapes every command line for two log calls (debug and info) before the
    logger looks at its level (~1 % of an SMTP process's CPU); with that level off, nothing."""
    level = _LEVELS.get(getattr(func, "__name__", ""))
    if level is not None and not _MAIL_LOG.isEnabledFor(level):
        return
    _sanitized_log(func, msg, *args, **kwargs)


aiosmtpd.smtp.sanitized_log = _sanitized_log_if_enabled  # type: ignore[attr-defined]


# A plain address in angle brackets (dot-atom local part, host name or address literal
# domain), optionally followed by parameters: the shape of nearly every MAIL/RCPT argument.
_PLAIN_ANGLE_ADDR = re.compile(
    r"\s*<([A-Za-z0-9!#$&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)>")


_CLASS_NAMES: dict[type, list[str]] = {}


_HOOK_PREFIXES = ("smtp_", "handle_", "auth_")


def class_dir(obj: Any) -> list[str]:
    """What ``dir(obj)`` is asked for, from a per-class cache: aiosmtpd's constructor runs
    ``dir()`` over the server and the handler on every connection only to collect their
    ``smtp_*``/``handle_*`` methods, which are class attributes (instance attributes never
    carry those prefixes).  Only names with a hook prefix are listed: testing ~160 names
    with ``startswith`` per connection was most of the constructor's ~0.2 ms."""
    names = _CLASS_NAMES.get(type(obj))
    if names is None:
        names = _CLASS_NAMES[type(obj)] = [n for n in object.__dir__(obj) if n.startswith(_HOOK_PREFIXES)]
    return names


class SessionDrain:
    """The open submission sessions of one process, and their end at a stop (module doc).
    A session leaves ``live`` when its connection is lost or once it said its 421 (a TLS
    connection then still waits for the client's close_notify: no reason to wait for it)."""

    def __init__(self) -> None:
        self.live: set[SubmissionSMTP] = set()
        self.stopping = False
        self._gone = asyncio.Event()

    def add(self, session: SubmissionSMTP) -> None:
        self.live.add(session)

    def discard(self, session: SubmissionSMTP) -> None:
        self.live.discard(session)
        if self.stopping and not self.live:
            self._gone.set()

    async def drain(self, grace: float | None = None) -> int:
        """421 to every session waiting for a command, and close it; let the busy ones finish
        their command (``SubmissionSMTP._command`` says goodbye after it); wait until all are
        gone, at most ``grace`` seconds (``SESSION_GRACE``), then cut the rest.  Returns how many were cut.  Call
        after the listeners closed (a connection still coming in is answered 421 too)."""
        grace = SESSION_GRACE if grace is None else grace
        self.stopping = True
        busy = 0
        for session in list(self.live):
            if session.busy:
                busy += 1
            else:
                session.shut_down()
        if busy:
            log.info("stopping: waiting for %d SMTP session(s) to finish their command", busy)
        if self.live:
            try:
                await asyncio.wait_for(self._gone.wait(), grace)
            except TimeoutError:
                pass
        left = list(self.live)
        if left:
            log.warning("%d SMTP session(s) still busy %g s after the stop: cut", len(left), grace)
            for session in left:
                session.cut()
        return len(left)


class _Command:
    """A command method as aiosmtpd finds it in ``_smtp_methods``, run through
    ``SubmissionSMTP._command``; other attributes (HELP's syntax) are the method's."""

    __slots__ = ("session", "method")

    def __init__(self, session: SubmissionSMTP, method: Any) -> None:
        self.session, self.method = session, method

    def __call__(self, arg: str | None) -> Any:
        return self.session._command(self.method, arg)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.method, name)


class SubmissionSMTP(SMTP):
    sessions = 0
    max_sessions = 500
    data_slots: asyncio.Semaphore | None = None
    drain: SessionDrain | None = None  # set per session by start_smtp's factory

    implicit_tls = False
    busy = False  # in the middle of a command
    _goodbye = False  # the 421 was sent

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._smtp_methods = {name: _Command(self, method) for name, method in self._smtp_methods.items()}

    def __dir__(self) -> list[str]:
        return class_dir(self)

    async def _command(self, method: Any, arg: str | None) -> None:
        """One command; at a stop, 421 instead of one that came after it began, and 421 after
        the reply of one that was under way (module doc)."""
        drain = self.drain
        if drain is not None and drain.stopping:
            self.shut_down()
            return
        self.busy = True
        try:
            await method(arg)
        except Exception as error:
            if drain is None or not drain.stopping or isinstance(error, aiosmtpd.smtp.TLSSetupException):
                raise  # aiosmtpd answers it (handle_exception) and reads the next command
            await self.push(await self.handle_exception(error))  # as aiosmtpd would, then the 421
        finally:
            self.busy = False
        if drain is not None and drain.stopping:
            self.shut_down()

    def shut_down(self) -> None:
        """421 4.3.2 and close (once; not on a connection closing already)."""
        transport = self.transport
        if self._goodbye or transport is None or transport.is_closing():
            return
        self._goodbye = True
        self._writer.write(SHUTTING_DOWN)
        transport.close()
        if self.drain is not None:
            self.drain.discard(self)

    def cut(self) -> None:
        """Close at once, whatever the session is doing (the drain's grace ran out)."""
        if self.transport is not None:
            self.transport.abort()

    @property
    def is_tls(self) -> bool:
        """TLS is on: implicit (465) or after STARTTLS (587)."""
        return self.implicit_tls or self._tls_protocol is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None and self.transport is None:
            self.implicit_tls = transport.get_extra_info("sslcontext") is not None
        super().connection_made(transport)
        if getattr(self, "_counted", False):
            return  # the second call, after STARTTLS
        SubmissionSMTP.sessions += 1
        self._counted = True
        if self.drain is not None:
            self.drain.add(self)
        if SubmissionSMTP.sessions > self.max_sessions:
            log.warning("too many sessions (%d); refusing %s", SubmissionSMTP.sessions, self.session.peer)
            transport.write(b"421 4.7.0 Too many connections, try again later\r\n")
            transport.close()
        elif self.drain is not None and self.drain.stopping:  # e.g. a TLS handshake that ended after the stop
            self._goodbye = True
            transport.write(SHUTTING_DOWN)
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_counted", False):
            SubmissionSMTP.sessions -= 1
            self._counted = False
        if self.drain is not None:
            self.drain.discard(self)
        super().connection_lost(exc)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's parser (email's header grammar, plus a class defined on every call) for
        anything unusual; a plain ``<local@domain>`` is taken as it is — the same result."""
        match = _PLAIN_ANGLE_ADDR.match(arg)
        rest = arg[match.end():].lstrip(" \t") if match is not None else ""
        if match is None or rest.startswith("("):  # a comment after it: the full grammar
            return super()._getaddr(arg)
        addr = match.group(1)
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, rest

    async def handle_exception(self, error: Exception) -> str:
        """A command's unexpected exception (a hook's bug; DATA handles its own): 451 and a log
        line with the user, instead of aiosmtpd's "500 Error: (Type) text" — a permanent code
        that shows internals to the client."""
        peer = self.session.peer[0] if self.session is not None and self.session.peer else "-"
        if isinstance(error, aiosmtpd.smtp.TLSSetupException):  # the client's handshake: aiosmtpd closes
            log.info("STARTTLS handshake failed ip=%s: %s", peer, describe_error(error.__cause__ or error)[0])
            return "454 4.7.0 TLS handshake failed"
        summary, frames = describe_error(error)
        ident = SubmissionHandler.identity(self.session) if self.session is not None else None
        log.error("command failed user=%s ip=%s error=%s; answered 451\n%s",
                  ident.username if ident else "-", peer, summary, frames)
        return LOCAL_TEMPFAIL

    async def smtp_AUTH(self, arg: str) -> None:
        if not self.is_tls and self.session.extended_smtp:
            await self.push("530 5.7.0 Must issue a STARTTLS command first")
            return
        await super().smtp_AUTH(arg)

    async def smtp_DATA(self, arg: str) -> None:
        slots = SubmissionSMTP.data_slots
        if slots is None:
            slots = SubmissionSMTP.data_slots = asyncio.Semaphore(DATA_SLOTS)
        try:
            await asyncio.wait_for(slots.acquire(), DATA_SLOT_WAIT)
        except TimeoutError:
            await self.push("451 4.3.2 System busy, try again later")
            return
        try:
            if self._decode_data:
                await super().smtp_DATA(arg)
            else:
                await self._data(arg)
        finally:
            slots.release()

    async def _data(self, arg: str) -> None:
        """aiosmtpd's ``smtp_DATA`` (same checks, replies and hook) with the message read by
        ``gateway.smtp.dataread.read_data`` in large pieces instead of line by line."""
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            content, error = await read_data(self._reader, self.data_size_limit, self.line_length_limit)
        except asyncio.CancelledError:  # the connection was reset (aiosmtpd cancels us)
            log.info("connection lost during DATA")
            self._writer.close()
            raise
        except asyncio.IncompleteReadError:  # the stream ended before the end-of-data line
            log.info("connection closed during DATA")
            self._writer.close()
            return
        if error is not None:
            await self.push(error)
            self._set_post_data_state()
            return
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)


def server_tls_context(cfg: Config) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cfg.tls.cert), str(cfg.tls.key))
    return ctx


async def start_smtp(cfg: Config, handler: SubmissionHandler, processes: int = 1,
                     drain: SessionDrain | None = None) -> list[asyncio.AbstractServer]:
    """Listen on the submission ports; a port of 0 in the config means "off".  ``processes`` > 1:
    this is one of that many processes sharing the ports (SO_REUSEPORT, see
    gateway/smtp/acceptor.py), each with its share of ``max_sessions``.  ``drain`` keeps the
    sessions, for the stop (``SessionDrain.drain``)."""
    loop = asyncio.get_running_loop()
    tls = server_tls_context(cfg)
    s = cfg.smtp
    SubmissionSMTP.max_sessions = max(1, -(-s.max_sessions // max(1, processes)))
    shared = {"reuse_port": True} if processes > 1 else {}
    SubmissionSMTP.line_length_limit = max(1001, s.max_line_length)

    def factory(tls_context: ssl.SSLContext | None, implicit: bool = False):
        # On the implicit-TLS port every byte is encrypted, so aiosmtpd's own
        # "AUTH needs STARTTLS" check must be off there (it knows only STARTTLS).
        return lambda: _tracked(SubmissionSMTP(
            handler,
            hostname=s.hostname,
            ident="Mailgate ESMTP",
            data_size_limit=s.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=tls_context,
            require_starttls=False,
            auth_require_tls=not implicit,
            auth_required=False,
            timeout=s.timeout,
            loop=loop,
        ))

    def _tracked(session: SubmissionSMTP) -> SubmissionSMTP:
        session.drain = drain
        return session

    servers = []
    if s.submission_port:
        servers.append(await loop.create_server(factory(tls), s.listen, s.submission_port, reuse_address=True,
                                                **shared))
    if s.smtps_port:
        servers.append(
            await loop.create_server(factory(None, implicit=True), s.listen, s.smtps_port, ssl=tls,
                                     reuse_address=True, **shared)
        )
    return servers
