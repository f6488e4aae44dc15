"""Pre-login: the proxy answers CAPABILITY, STARTTLS, LOGIN, AUTHENTICATE, ID, NOOP, LOGOUT.

Credentials are checked by logging in upstream with them (``upstream.login``);
the upstream's verdict is the answer.  A mixin of ``ClientSession``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task
from twisted.python.failure import Failure

from gateway import metrics
from gateway.imap import upstream as up
from gateway.imap.capabilities import filter_capabilities
from gateway.imap.decisions import Tagger
from gateway.imap.parser import LIST, Incomplete, LiteralInfo, ParseError, Parser, parse_astrings
from gateway.imap.tlslayer import start_tls


def _on_asyncio(coro: Coroutine[Any, Any, None]) -> defer.Deferred:
    """An asyncio coroutine awaited from Twisted code (the reactor runs on the asyncio loop)."""
    return defer.Deferred.fromFuture(asyncio.ensure_future(coro))


if TYPE_CHECKING:
    from gateway.imap.service import ProxyService

log = logging.getLogger("mailgate.imap")

_SPECIAL_USE_TTL = 300.0  # seconds the Sent/Drafts names from LIST are reused across logins of an account


def mailbox_key(name: bytes) -> bytes:
    return b"INBOX" if name.upper() == b"INBOX" else name


def no_delay(transport: object) -> None:
    """Small IMAP responses must not wait for Nagle + delayed ACK (40 ms)."""
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError):
        pass


class PreLogin:
    """Pre-login commands and the upstream login (mixin of ClientSession)."""

    svc: ProxyService

    def prelogin_caps(self) -> bytes:
        caps = [b"IMAP4rev1", b"LITERAL+", b"SASL-IR", b"ID", b"ENABLE", b"IDLE"]
        if not self.tls and self.svc.tls_context is not None:
            caps.append(b"STARTTLS")
        if self.plaintext_ok():
            caps += [b"AUTH=PLAIN", b"AUTH=LOGIN"]
        else:
            caps.append(b"LOGINDISABLED")
        return b" ".join(caps)

    def _prelogin_segment(self, data: bytes, first: bool, literal: LiteralInfo | None) -> None:
        if self._auth is not None and first and literal is None:
            cb, self._auth = self._auth, None
            cb(data[:-2])
            return
        self._cmd_size += len(data) + (literal.size if literal else 0)
        if self._cmd_size > 64 * 1024:
            if literal and not literal.nonsync:
                self.framer.cancel_literal()
            self._cmd, self._cmd_size = [], 0
            if literal and literal.nonsync:
                self.close(b"Command too long")
                return
            tag = data.split(b" ", 1)[0] if first else b"*"
            self.send(tag + b" BAD Command too long\r\n")
            return
        self._cmd.append(data)
        if literal is not None:
            if not literal.nonsync:
                self.send(b"+ Ready for literal data\r\n")
            return
        cmd = b"".join(self._cmd)
        self._cmd, self._cmd_size = [], 0
        self._prelogin_command(cmd)

    def _prelogin_command(self, cmd: bytes) -> None:
        parts = cmd[:-2].split(b" ", 2)
        tag = parts[0]
        if len(parts) < 2 or not tag or tag == b"*" or tag.startswith(b"+"):
            self.send(b"* BAD Invalid command\r\n")
            return
        name = parts[1].upper()
        args_at = len(parts[0]) + len(parts[1]) + 2
        if name == b"CAPABILITY":
            self.send(b"* CAPABILITY " + self.prelogin_caps() + b"\r\n" + tag + b" OK Capability completed\r\n")
        elif name == b"NOOP":
            self.send(tag + b" OK NOOP completed\r\n")
        elif name == b"LOGOUT":
            self.send(b"* BYE Logging out\r\n" + tag + b" OK Logout completed\r\n")
            self.close()
        elif name == b"ID":
            self._prelogin_id(tag, cmd, args_at)
        elif name == b"STARTTLS":
            self._starttls(tag)
        elif name == b"LOGIN":
            try:
                user, password = parse_astrings(cmd, args_at, 2)
            except (ParseError, Incomplete):
                self.send(tag + b" BAD Invalid LOGIN arguments\r\n")
                return
            self._login(tag, user, password)
        elif name == b"AUTHENTICATE":
            self._authenticate(tag, cmd[args_at:-2] if len(cmd) > args_at else b"")
        else:
            self.send(tag + b" BAD Command not allowed before login\r\n")

    def _prelogin_id(self, tag: bytes, cmd: bytes, at: int) -> None:
        try:
            v = Parser(cmd, at).value()
        except (ParseError, Incomplete):
            self.send(tag + b" BAD Invalid ID arguments\r\n")
            return
        params: list[tuple[bytes, bytes | None]] = []
        if v.kind == LIST:
            for i in range(0, len(v.items) - 1, 2):
                k, val = v.items[i], v.items[i + 1]
                key = k.data.lower()
                if key.startswith(b"x-originating-") or key.startswith(b"x-connected-") or key == b"x-session-id":
                    continue  # only the proxy says where the client is
                params.append((k.data, val.text()))
        self.id_params = params[:30]
        self.send(b'* ID ("name" "Mailgate")\r\n' + tag + b" OK ID completed\r\n")

    def _starttls(self, tag: bytes) -> None:
        if self.tls or self.svc.tls_context is None:
            self.send(tag + b" BAD STARTTLS not available\r\n")
            return
        # Anything pipelined after STARTTLS is plaintext injection: drop it.
        self.framer.take_buffer()
        self.transport.write(tag + b" OK Begin TLS negotiation now\r\n")
        start_tls(self.transport, self, self.svc.tls_context, server_side=True, clock=self.svc.reactor)
        self.tls = True

    def _authenticate(self, tag: bytes, args: bytes) -> None:
        mech, _, ir = args.partition(b" ")
        mech = mech.upper()
        if not self.plaintext_ok():
            self.send(tag + b" NO [PRIVACYREQUIRED] Use STARTTLS first\r\n")
            return

        def b64(data: bytes) -> bytes | None:
            if data == b"*":
                self.send(tag + b" BAD Authentication cancelled\r\n")
                return None
            if data == b"=":
                return b""
            try:
                return base64.b64decode(data, validate=True)
            except ValueError:
                self.send(tag + b" BAD Invalid base64\r\n")
                return None

        if mech == b"PLAIN":
            def plain(data: bytes) -> None:
                raw = b64(data)
                if raw is None:
                    return
                fields = raw.split(b"\0")
                if len(fields) != 3:
                    self.send(tag + b" BAD Invalid PLAIN response\r\n")
                    return
                authz, user, password = fields
                if authz and authz != user:
                    self.send(tag + b" NO [AUTHORIZATIONFAILED] Proxy authorization not supported\r\n")
                    return
                self._login(tag, user, password)

            if ir:
                plain(ir)
            else:
                self._auth = plain
                self.send(b"+ \r\n")
        elif mech == b"LOGIN":
            def got_user(data: bytes) -> None:
                user = b64(data)
                if user is None:
                    return

                def got_pass(data2: bytes) -> None:
                    password = b64(data2)
                    if password is not None:
                        self._login(tag, user, password)

                self._auth = got_pass
                self.send(b"+ UGFzc3dvcmQ6\r\n")

            if ir:
                got_user(ir)
            else:
                self._auth = got_user
                self.send(b"+ VXNlcm5hbWU6\r\n")
        else:
            self.send(tag + b" NO Unsupported authentication mechanism\r\n")

    def _login(self, tag: bytes, user: bytes, password: bytes) -> None:
        if not self.plaintext_ok():
            self.send(tag + b" NO [PRIVACYREQUIRED] Use STARTTLS first\r\n")
            return
        self.framer.paused = True
        d = defer.ensureDeferred(self._do_login(tag, user, password))
        d.addErrback(self._internal_error)

    def _internal_error(self, f: Failure) -> None:
        log.error("IMAP session failed: %s", f.getTraceback())
        self.close(b"Internal error")

    async def _do_login(self, tag: bytes, user: bytes, password: bytes) -> None:
        """The login penalty (``svc.guard``: a growing delay per client IP and per user after
        failures), then the upstream login."""
        guard = self.svc.guard
        ip = str(getattr(self.transport.getPeer(), "host", ""))
        name = user.decode("utf-8", "replace")
        if guard.wants_read(ip, name):  # the shared record read only where failures are known
            await _on_asyncio(guard.prepare(ip, name))
        delay = guard.delay(ip, name, password)  # sessions opened at once with one password: no wait
        guard.begin(ip, name, password)
        outcome: bool | None = None
        write = None
        try:
            if delay:
                await task.deferLater(self.svc.reactor, delay, lambda: None)  # the penalty itself
            if not self.closing:
                outcome = await self._upstream_login(tag, user, password)
        finally:
            if outcome is None:
                guard.abandon(ip, name, password)
            else:
                write = guard.finish(ip, name, outcome, password)
        if write is not None and guard.shared is not None:
            await _on_asyncio(guard.shared.run(write))  # the answer is out: written just after it
        if outcome is False:
            log.info("imap login failed user=%s ip=%s delay=%.2f", name[:320], ip, delay)
        elif outcome:
            log.info("imap login user=%s ip=%s delay=%.2f", name[:320], ip, delay)

    async def _upstream_login(self, tag: bytes, user: bytes, password: bytes) -> bool | None:
        """Log in upstream with the client's credentials and answer the client: True when the
        upstream accepted them, False when it refused them, None when nothing was decided."""
        svc = self.svc
        try:
            proto = await up.connect(svc.reactor, svc.upstream_settings)
        except up.UpstreamUnavailable as exc:
            log.warning("upstream unavailable: %s", exc)
            metrics.auth_results.labels("imap", "unavailable").inc()
            self.send(tag + b" NO [UNAVAILABLE] Mail server temporarily unavailable, try again later\r\n")
            self._resume_client()
            return None
        if self.closing:
            proto.transport.loseConnection()
            return None
        self.upstream = proto
        no_delay(proto.transport)
        proto.on_lost = self._upstream_lost
        peer = self.transport.getPeer()
        host = self.transport.getHost()
        id_params = [
            *self.id_params,
            (b"x-originating-ip", str(getattr(peer, "host", "")).encode()),
            (b"x-originating-port", str(getattr(peer, "port", "")).encode()),
            (b"x-connected-ip", str(getattr(host, "host", "")).encode()),
            (b"x-connected-port", str(getattr(host, "port", "")).encode()),
        ]
        try:
            caps = await up.login(svc.reactor, proto, svc.upstream_settings, user, password, id_params)
        except up.LoginRefused as exc:
            metrics.auth_results.labels("imap", "fail").inc()
            self.upstream = None
            proto.on_lost = None
            proto.transport.loseConnection()
            line = exc.line
            if line.upper().startswith(b"BAD"):
                line = b"NO" + line[3:]
            self.send(tag + b" " + line)
            self._resume_client()
            return False
        except up.UpstreamUnavailable:
            metrics.auth_results.labels("imap", "unavailable").inc()
            self.upstream = None
            self.send(tag + b" NO [UNAVAILABLE] Mail server temporarily unavailable, try again later\r\n")
            self._resume_client()
            return None
        if self.closing:  # the client left while we were logging in
            proto.on_lost = None
            proto.transport.loseConnection()
            return True
        account = user.decode("utf-8", "replace").lower()
        if svc.directory.deactivated(account):  # left the company: the upstream may not know yet
            metrics.auth_results.labels("imap", "deactivated").inc()
            log.warning("imap login refused user=%s: employee deactivated", account[:320])
            proto.on_lost = None
            proto.transport.loseConnection()
            self.upstream = None
            self.send(tag + b" NO [AUTHORIZATIONFAILED] This account has been deactivated\r\n")
            self._resume_client()
            return True  # the password was right: not a failure for the guard
        if not svc.limits.login(account):
            metrics.auth_results.labels("imap", "limit").inc()
            proto.on_lost = None
            proto.transport.loseConnection()
            self.upstream = None
            self.send(tag + b" NO [LIMIT] Too many connections for this account\r\n")
            self._resume_client()
            return True  # the password was right
        metrics.auth_results.labels("imap", "ok").inc()
        self.logged_in = True
        self.account = account
        self.limit_key = account
        employee = svc.directory.employee_for_address(account)
        if employee is not None:
            self.account = employee.email
            self.tagger = Tagger(svc.directory, employee.id, self.cfg.tag_own, self.cfg.tag_colleague)
            await self._learn_special_use(caps)
            if svc.on_login is not None:  # archive: opt-in credential capture
                svc.on_login(self.account, user, password)
        self._start_relay(proto)
        self.send(tag + b" OK [CAPABILITY " + b" ".join(filter_capabilities(caps, self.cfg.max_literal_size))
                  + b"] Logged in\r\n")
        self._resume_client()
        return True

    async def _learn_special_use(self, caps: list[bytes]) -> None:
        cached = self.svc.special_use.get(self.account)
        if cached is not None and self.svc.reactor.seconds() - cached[0] < _SPECIAL_USE_TTL:
            self.special = cached[1]  # shared by the account's sessions (idle sessions hold no copy)
            return
        self.special = frozenset(await self._list_special_use(caps))
        self.svc.special_use[self.account] = (self.svc.reactor.seconds(), self.special)

    async def _list_special_use(self, caps: list[bytes]) -> set[bytes]:
        """The account's \\Sent and \\Drafts mailboxes (LIST, SPECIAL-USE when offered)."""
        assert self.upstream is not None
        special: set[bytes] = set()
        ucaps = {c.upper() for c in caps}
        self.upstream.collected.clear()
        if b"SPECIAL-USE" in ucaps or b"LIST-EXTENDED" in ucaps:
            line = b'LIST "" "*" RETURN (SPECIAL-USE)\r\n'
        else:
            line = b'LIST "" "*"\r\n'
        try:
            await self.upstream.send(line)
        except up.UpstreamUnavailable:
            return special
        for resp in self.upstream.collected:
            if not resp[:7].upper() == b"* LIST ":
                continue
            try:
                p = Parser(resp, 7)
                attrs = p.value()
                p.sp()
                p.value()
                p.sp()
                name = p.value()
            except (ParseError, Incomplete):
                continue
            flags = {a.data.lower() for a in attrs.items} if attrs.kind == LIST else set()
            if flags & {b"\\sent", b"\\drafts"}:
                special.add(mailbox_key(name.data))
        self.upstream.collected.clear()
        return special

