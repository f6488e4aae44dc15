"""One client session: pre-login (owned by the proxy), then a relay that rewrites a little.

Pre-login the proxy answers CAPABILITY, STARTTLS, LOGIN, AUTHENTICATE, ID,
NOOP and LOGOUT itself and logs in upstream with the client's credentials.
After login, client commands go upstream verbatim (streamed, literals
included) and responses come back byte for byte — except FETCHes that touch
the header of a tagged message: those run as an exclusive operation
(``FetchOperation``) that looks ahead (UIDs, headers), decides, and rewrites.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet import defer, protocol, threads
from twisted.internet.interfaces import IPushProducer
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway import metrics
from gateway.imap import upstream as up
from gateway.imap.decisions import Decision, Tagger
from gateway.imap.fetchitems import FetchCommand, compress, explicit_uids, parse_fetch
from gateway.imap.headers import READER_FIELDS, SENT_FIELDS
from gateway.imap.headers import apply as apply_splices
from gateway.imap.parser import (
    LIST,
    Framer,
    FramerSink,
    Incomplete,
    LiteralInfo,
    ParseError,
    Parser,
    parse_astrings,
)
from gateway.imap.plan import needs_new_header, plan_message
from gateway.imap.rewrite import FetchCollector, FetchRewriter, fetch_seq

if TYPE_CHECKING:
    from gateway.imap.service import ProxyService

log = logging.getLogger("mailgate.imap")

_DROP_CAPS = (b"COMPRESS=", b"STARTTLS", b"LOGINDISABLED", b"AUTH=", b"SASL-IR", b"LOGIN-REFERRALS")
_HEADER_CACHE = 64
_DECISION_CACHE = 50000
_MAX_QUEUED = 256 * 1024  # client bytes buffered while a command runs exclusively
_SPECIAL_USE_TTL = 300.0  # seconds a LIST of \Sent / \Drafts is reused across an account's logins


def filter_capabilities(caps: list[bytes], max_literal: int) -> list[bytes]:
    """The upstream's capabilities minus what the proxy cannot relay (never more)."""
    out = []
    for c in caps:
        u = c.upper()
        if any(u.startswith(p) for p in _DROP_CAPS):
            continue
        if u.startswith(b"APPENDLIMIT="):
            try:
                c = b"APPENDLIMIT=%d" % min(int(u[12:]), max_literal)
            except ValueError:
                continue
        out.append(c)
    return out


def _rewrite_caps_in(line: bytes, max_literal: int) -> bytes:
    """Filter ``* CAPABILITY ...`` lines and ``[CAPABILITY ...]`` response codes."""
    if line[:13].upper() == b"* CAPABILITY ":
        caps = line[13:].rstrip(b"\r\n").split()
        return b"* CAPABILITY " + b" ".join(filter_capabilities(caps, max_literal)) + b"\r\n"
    i = line.upper().find(b"[CAPABILITY ")
    if i >= 0:
        j = line.find(b"]", i)
        if j > 0:
            caps = line[i + 12 : j].split()
            return line[: i + 12] + b" ".join(filter_capabilities(caps, max_literal)) + line[j:]
    return line


@implementer(IPushProducer)
class Valve:
    """Pauses a transport for several independent reasons (back-pressure, exclusive ops)."""

    def __init__(self, transport: object):
        self.transport = transport
        self.reasons: set[str] = set()

    def pause(self, reason: str) -> None:
        if not self.reasons:
            self.transport.pauseProducing()
        self.reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons:
                self.transport.resumeProducing()

    # IPushProducer, registered with the other side's transport
    def pauseProducing(self) -> None:
        self.pause("backpressure")

    def resumeProducing(self) -> None:
        self.resume("backpressure")

    def stopProducing(self) -> None:
        pass


class _Discard(FramerSink):
    def segment(self, data: bytes, first: bool, literal: LiteralInfo | None) -> None:
        pass

    def literal_data(self, data: bytes) -> None:
        pass


class ClientSession(protocol.Protocol, TimeoutMixin, FramerSink):
    """The client side of one proxied IMAP session."""

    def __init__(self, svc: ProxyService, implicit_tls: bool):
        self.svc = svc
        self.cfg = svc.config.imap
        self.tls = implicit_tls
        self.framer = Framer(self, self.cfg.max_line_length)
        self.upstream: up.UpstreamProtocol | None = None
        self.logged_in = False
        self.account = ""
        self.tagger: Tagger | None = None
        self.counted = False
        self.closing = False
        self.id_params: list[tuple[bytes, bytes | None]] = []
        # pre-login command assembly
        self._cmd: list[bytes] = []
        self._cmd_size = 0
        self._auth: Callable[[bytes], None] | None = None
        self._discarding_line = False
        # relay state
        self.inflight: OrderedDict[bytes, list[bytes]] = OrderedDict()
        self._barrier: defer.Deferred[None] | None = None
        self._skip_literal: bytes | None = None  # tag of a refused command whose literal we swallow
        self._cur_kind = b""
        self._cur_tag = b""
        self._cur_select: list[bytes] | None = None
        self.idling = False
        self.exclusive = False
        self.mailbox: bytes | None = None
        self.uidvalidity: int | None = None
        self._pending_select: dict[bytes, bytes] = {}
        self._pending_uidvalidity: int | None = None
        self.special: set[bytes] = set()
        self.decisions: dict[int, Decision] = {}
        self.header_cache: OrderedDict[int, bytes] = OrderedDict()
        self._out: list[bytes] = []
        self.client_valve: Valve | None = None
        self.upstream_valve: Valve | None = None
        self.caps: list[bytes] = []
        self.logging_out = False
        self.upstream_bye = False
        self._batch: list[bytes] | None = None

    # -- helpers -----------------------------------------------------------------------
    @property
    def peer_host(self) -> str:
        p = self.transport.getPeer()
        return getattr(p, "host", "")

    def plaintext_ok(self) -> bool:
        if self.tls:
            return True
        try:
            ip = ipaddress.ip_address(self.peer_host)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(n, strict=False) for n in self.cfg.plaintext_networks)

    def send(self, data: bytes) -> None:
        if self.closing:
            return
        if self._batch is not None:
            self._batch.append(data)
        else:
            self.transport.write(data)

    def begin_batch(self) -> None:
        if self._batch is None:
            self._batch = []

    def end_batch(self) -> None:
        batch, self._batch = self._batch, None
        if batch and not self.closing:
            self.transport.writeSequence(batch)

    def close(self, bye: bytes | None = None) -> None:
        if self.closing:
            return
        self.end_batch()
        if bye:
            self.transport.write(b"* BYE " + bye + b"\r\n")
        self.closing = True
        self._unregister()
        self.transport.loseConnection()
        if self.upstream is not None and not self.upstream.closed:
            self.upstream.on_lost = None
            self.upstream.transport.loseConnection()

    def _unregister(self) -> None:
        """Producers hold a transport open on loseConnection: drop them first."""
        if self.upstream_valve is not None:
            self.upstream_valve = None
            self.transport.unregisterProducer()
            if self.upstream is not None and not self.upstream.closed:
                self.upstream.transport.unregisterProducer()

    # -- twisted ---------------------------------------------------------------------------
    def connectionMade(self) -> None:
        if not self.svc.limits.open():
            self.transport.write(b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n")
            self.closing = True
            self.transport.loseConnection()
            return
        self.counted = True
        metrics.imap_sessions.inc()
        _no_delay(self.transport)
        self.client_valve = Valve(self.transport)
        self.setTimeout(self.cfg.idle_timeout)
        self.send(b"* OK [CAPABILITY " + self.prelogin_caps() + b"] Mailgate IMAP proxy ready\r\n")

    def timeoutConnection(self) -> None:
        self.close(b"Autologout; idle for too long")

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.setTimeout(None)
        self.closing = True
        if self.counted:
            self.svc.limits.close()
            self.counted = False
        if self.logged_in:
            self.svc.limits.logout(self.account)
            self.logged_in = False
        if self.upstream is not None and not self.upstream.closed:
            self.upstream.on_lost = None
            self.upstream.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.resetTimeout()
        if self._discarding_line:
            nl = data.find(b"\n")
            if nl < 0:
                return
            self._discarding_line = False
            data = data[nl + 1 :]
        try:
            self.framer.feed(data)
            if self.framer.paused and self.framer.buffered > _MAX_QUEUED and self.client_valve:
                self.client_valve.pause("exclusive")  # stop reading until the current command is done
        except ParseError as exc:
            if str(exc) == "line too long":
                self._line_too_long()
            else:
                self.close(b"Protocol error: " + str(exc).encode())
        except Exception:  # noqa: BLE001 - never let one session take the reactor down
            log.exception("IMAP session error")
            self.close(b"Internal error")

    def _line_too_long(self) -> None:
        data = self.framer.take_buffer()
        tag = data.split(b" ", 1)[0][:64] if b" " in data[:65] else b"*"
        if any(c < 33 or c > 126 or c in b'(){%"\\' for c in tag):
            tag = b"*"
        self.send(tag + b" BAD Command line too long\r\n")
        self.framer = Framer(self, self.cfg.max_line_length)
        nl = data.find(b"\n")
        self._discarding_line = nl < 0
        if nl >= 0:
            self.framer.feed(data[nl + 1 :])

    # -- framer sink: client commands ------------------------------------------------------------
    def segment(self, data: bytes, first: bool, literal: LiteralInfo | None) -> None:
        if self.logged_in:
            self._relay_segment(data, first, literal)
        else:
            self._prelogin_segment(data, first, literal)

    def literal_data(self, data: bytes) -> None:
        if self.logged_in:
            if self._skip_literal is None and self.upstream is not None:
                self.upstream.write(data)
        else:
            self._cmd.append(data)

    def literal_end(self) -> None:
        pass

    # ======================================================================================
    # pre-login
    # ======================================================================================
    def prelogin_caps(self) -> bytes:
        caps = [b"IMAP4rev1", b"LITERAL+", b"SASL-IR", b"ID", b"ENABLE", b"IDLE"]
        if not self.tls and self.svc.tls_options is not None:
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
        if self.tls or self.svc.tls_options is None:
            self.send(tag + b" BAD STARTTLS not available\r\n")
            return
        # Anything pipelined after STARTTLS is plaintext injection: drop it.
        self.framer.take_buffer()
        self.transport.write(tag + b" OK Begin TLS negotiation now\r\n")
        self.transport.startTLS(self.svc.tls_options)
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
        svc = self.svc
        try:
            proto = await up.connect(svc.reactor, svc.upstream_settings)
        except up.UpstreamUnavailable as exc:
            log.warning("upstream unavailable: %s", exc)
            metrics.auth_results.labels("imap", "unavailable").inc()
            self.send(tag + b" NO [UNAVAILABLE] Mail server temporarily unavailable, try again later\r\n")
            self._resume_client()
            return
        if self.closing:
            proto.transport.loseConnection()
            return
        self.upstream = proto
        _no_delay(proto.transport)
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
            return
        except up.UpstreamUnavailable:
            metrics.auth_results.labels("imap", "unavailable").inc()
            self.upstream = None
            self.send(tag + b" NO [UNAVAILABLE] Mail server temporarily unavailable, try again later\r\n")
            self._resume_client()
            return
        if self.closing:
            return
        account = user.decode("utf-8", "replace").lower()
        if not svc.limits.login(account):
            metrics.auth_results.labels("imap", "limit").inc()
            proto.on_lost = None
            proto.transport.loseConnection()
            self.upstream = None
            self.send(tag + b" NO [LIMIT] Too many connections for this account\r\n")
            self._resume_client()
            return
        metrics.auth_results.labels("imap", "ok").inc()
        self.logged_in = True
        self.account = account
        employee = svc.directory.employee_for_address(account)
        if employee is not None:
            self.account = employee.email
            self.tagger = Tagger(svc.directory, employee.id, self.cfg.tag_own, self.cfg.tag_colleague)
            await self._learn_special_use(caps)
        self.caps = filter_capabilities(caps, self.cfg.max_literal_size)
        proto.relay = _UpstreamRelay(self)
        proto.batch = (self.begin_batch, self.end_batch)
        self.upstream_valve = Valve(proto.transport)
        self.transport.registerProducer(self.upstream_valve, True)
        proto.transport.registerProducer(self.client_valve, True)
        self.send(tag + b" OK [CAPABILITY " + b" ".join(self.caps) + b"] Logged in\r\n")
        self._resume_client()

    async def _learn_special_use(self, caps: list[bytes]) -> None:
        cached = self.svc.special_use.get(self.account)
        if cached is not None and self.svc.reactor.seconds() - cached[0] < _SPECIAL_USE_TTL:
            self.special = set(cached[1])
            return
        await self._list_special_use(caps)
        self.svc.special_use[self.account] = (self.svc.reactor.seconds(), frozenset(self.special))

    async def _list_special_use(self, caps: list[bytes]) -> None:
        assert self.upstream is not None
        ucaps = {c.upper() for c in caps}
        self.upstream.collected.clear()
        if b"SPECIAL-USE" in ucaps or b"LIST-EXTENDED" in ucaps:
            line = b'LIST "" "*" RETURN (SPECIAL-USE)\r\n'
        else:
            line = b'LIST "" "*"\r\n'
        try:
            await self.upstream.send(line)
        except up.UpstreamUnavailable:
            return
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
                self.special.add(_mailbox_key(name.data))
        self.upstream.collected.clear()

    def _resume_client(self) -> None:
        if self.closing:
            return
        if self.framer.paused:
            self.framer.resume()

    def _upstream_lost(self, why: str) -> None:
        if self.closing:
            return
        if self.logged_in and (self.logging_out or self.upstream_bye):
            self.close()
        else:
            self.close(b"[UNAVAILABLE] Connection to the mail server lost")

    # ======================================================================================
    # relay: client -> upstream
    # ======================================================================================
    def _relay_segment(self, data: bytes, first: bool, literal: LiteralInfo | None) -> None:
        assert self.upstream is not None
        if self._skip_literal is not None:
            # Swallowing a refused command (non-synchronising literal over the limit).
            if literal is None:
                tag, self._skip_literal = self._skip_literal, None
                self.send(tag + b" NO [TOOBIG] Literal too large\r\n")
            return
        if first:
            if self.idling:
                self.idling = False
                self.upstream.write(data)
                return
            tag, _, rest = data.partition(b" ")
            verb, _, rest2 = rest.partition(b" ")
            verb = verb.rstrip(b"\r\n").upper()
            if verb == b"UID":
                verb = b"UID " + rest2.split(b" ", 1)[0].rstrip(b"\r\n").upper()
            self._cur_tag, self._cur_kind = tag, verb
            self._cur_select = None
            if not tag or tag.startswith(up.TAG_PREFIX):
                self.send((tag or b"*") + b" BAD Invalid tag\r\n")
                if literal is not None and not literal.nonsync:
                    self.framer.cancel_literal()
                elif literal is not None:
                    self._skip_literal = tag or b"*"
                return
            if self._nesting(data) > self.cfg.max_nesting_depth:
                self._refuse(tag, literal, b" BAD Too deeply nested\r\n")
                return
            if verb in (b"FETCH", b"UID FETCH") and literal is None and self.tagger is not None \
                    and self.uidvalidity is not None:
                fc = parse_fetch(data, self.cfg.max_nesting_depth)
                if fc is not None and fc.has_content:
                    self._start_fetch(fc, data)
                    return
            if verb == b"COMPRESS":
                self._refuse(tag, literal, b" NO [CANNOT] Compression is not available through this proxy\r\n")
                return
            if verb in (b"STARTTLS", b"AUTHENTICATE", b"LOGIN"):
                self._refuse(tag, literal, b" BAD Already logged in\r\n")
                return
            if verb in (b"SELECT", b"EXAMINE"):
                self._cur_select = []
            self.inflight.setdefault(tag, []).append(verb)
            if verb == b"IDLE":
                self.idling = True
            elif verb == b"LOGOUT":
                self.logging_out = True
        if literal is not None and literal.size > self.cfg.max_literal_size:
            if first:
                self._forget(self._cur_tag)
                self._refuse(self._cur_tag, literal, b" NO [TOOBIG] Literal too large\r\n")
                return
            self.close(b"[TOOBIG] Literal too large")
            return
        if self._cur_select is not None:
            self._cur_select.append(data)
            if literal is None:
                self._note_select(self._cur_tag, b"".join(self._cur_select))
                self._cur_select = None
        self.upstream.write(data)

    def _refuse(self, tag: bytes, literal: LiteralInfo | None, answer: bytes) -> None:
        if literal is None:
            self.send(tag + answer)
        elif not literal.nonsync:
            self.framer.cancel_literal()
            self.send(tag + answer)
        else:
            self._skip_literal = tag  # its literal bytes are dropped in literal_data

    def _forget(self, tag: bytes) -> None:
        verbs = self.inflight.get(tag)
        if verbs:
            verbs.pop()
            if not verbs:
                del self.inflight[tag]

    @staticmethod
    def _nesting(line: bytes) -> int:
        if line.count(b"(") < 8:
            return line.count(b"(")
        depth = best = 0
        quoted = False
        prev = 0
        for c in line:
            if quoted:
                if c == 0x22 and prev != 0x5C:
                    quoted = False
            elif c == 0x22:
                quoted = True
            elif c == 0x28:
                depth += 1
                best = max(best, depth)
            elif c == 0x29:
                depth -= 1
            prev = c
        return best

    def _note_select(self, tag: bytes, cmd: bytes) -> None:
        at = cmd.find(b" ", len(tag) + 1)
        try:
            (name,) = parse_astrings(cmd, at + 1, 1)
        except (ParseError, Incomplete):
            return
        self._pending_select[tag] = name

    # ======================================================================================
    # relay: upstream -> client (called by _UpstreamRelay)
    # ======================================================================================
    def on_untagged(self, data: bytes) -> bytes:
        u = data[:24].upper()
        if u.startswith(b"* CAPABILITY ") or u.startswith(b"* OK [CAPABILITY") or u.startswith(b"* PREAUTH"):
            return _rewrite_caps_in(data, self.cfg.max_literal_size)
        if u.startswith(b"* BYE"):
            self.upstream_bye = True
        elif u.startswith(b"* OK [UIDVALIDITY"):
            try:
                self._pending_uidvalidity = int(data[17 : data.index(b"]")].strip())
            except ValueError:
                pass
        return data

    def on_completion(self, data: bytes) -> bytes:
        tag, _, rest = data.partition(b" ")
        verbs = self.inflight.get(tag)
        verb = b""
        if verbs:
            verb = verbs.pop(0)
            if not verbs:
                del self.inflight[tag]
        ok = rest[:3].upper() == b"OK "
        if verb in (b"SELECT", b"EXAMINE"):
            name = self._pending_select.pop(tag, None)
            if ok and name is not None:
                self._select(name, self._pending_uidvalidity)
            else:
                self._select(None, None)
            self._pending_uidvalidity = None
        elif verb in (b"CLOSE", b"UNSELECT") and ok:
            self._select(None, None)
        if b"[CAPABILITY " in data[:64].upper():
            data = _rewrite_caps_in(data, self.cfg.max_literal_size)
        if not self.inflight and self._barrier is not None:
            d, self._barrier = self._barrier, None
            self.svc.reactor.callLater(0, d.callback, None)
        return data

    def _select(self, name: bytes | None, uidvalidity: int | None) -> None:
        self.mailbox = name
        self.uidvalidity = uidvalidity if name is not None else None
        self.decisions = {}
        self.header_cache.clear()

    # ======================================================================================
    # FETCH of possibly tagged messages: an exclusive operation
    # ======================================================================================
    def _start_fetch(self, fc: FetchCommand, raw: bytes) -> None:
        self.framer.paused = True
        self.exclusive = True
        d = defer.ensureDeferred(self._fetch(fc, raw))
        d.addErrback(self._fetch_failed)
        d.addBoth(self._end_exclusive)

    def _fetch_failed(self, f: Failure) -> None:
        if f.check(up.UpstreamUnavailable):
            self.close(b"[UNAVAILABLE] Connection to the mail server lost")
            return
        if f.check(ParseError):
            log.error("malformed upstream response, closing session: %s", f.getErrorMessage())
            self.close(b"[SERVERBUG] Malformed response from the mail server")
            return
        self._internal_error(f)

    def _end_exclusive(self, _: object) -> None:
        self.exclusive = False
        if self.upstream is not None:
            self.upstream.chooser = None
        if self.closing:
            return
        if self.client_valve:
            self.client_valve.resume("exclusive")
        try:
            self.framer.resume()
        except ParseError as exc:
            if str(exc) == "line too long":
                self._line_too_long()
            else:
                self.close(b"Protocol error: " + str(exc).encode())

    async def _wait_idle(self) -> None:
        if self.inflight:
            self._barrier = defer.Deferred()
            await self._barrier

    async def _lookahead(self, line: bytes) -> tuple[bytes, list]:
        """Run one of the proxy's own FETCHes; returns (completion, collected responses)."""
        assert self.upstream is not None
        sinks: list[FetchCollector] = []

        def choose(first: bytes) -> FramerSink | None:
            if fetch_seq(first) is None:
                return None
            c = FetchCollector(max_depth=self.cfg.max_nesting_depth)
            sinks.append(c)
            return c

        self.upstream.chooser = choose
        try:
            done = await self.upstream.send(line)
        finally:
            self.upstream.chooser = None
        results = []
        for c in sinks:
            r = c.result()
            results.append(r)
            extra = [(n, v) for n, v in r.extra if n.upper() not in (b"UID", b"BODY[HEADER]")]
            if extra:  # unsolicited changes (FLAGS …) that rode on our response
                body = b" ".join(n + b" " + r.buf[v.start : v.end] for n, v in extra)
                self.send(b"* %d FETCH (%s)\r\n" % (r.seq, body))
        return done, results

    async def _fetch(self, fc: FetchCommand, raw: bytes) -> None:
        assert self.upstream is not None and self.tagger is not None
        await self._wait_idle()
        if self.closing:
            return
        mailbox, uidvalidity = self.mailbox, self.uidvalidity
        if mailbox is None or uidvalidity is None:
            self._forward(fc.tag, raw)
            return
        verb = b"UID FETCH" if fc.uid else b"FETCH"
        # 1. which messages (seq -> uid)
        ids: dict[int, int] = {}  # id used in commands (seq or uid) -> uid
        known = explicit_uids(fc.sequence) if fc.uid else None
        if known is not None:
            missing = [u for u in known if u not in self.decisions]
            if missing:
                self._remember(self.svc.cached_decisions(self.account, mailbox, uidvalidity, missing))
        if known is not None and all(u in self.decisions for u in known):
            ids = {u: u for u in known}
        else:
            done, rows = await self._lookahead(verb + b" " + fc.sequence + b" (UID)\r\n")
            if up.status_of(done) != b"OK":
                self._forward(fc.tag, raw)
                return
            for r in rows:
                uid = r.items.get(b"UID")
                if uid is not None and uid.data.isdigit():
                    ids[int(uid.data) if fc.uid else r.seq] = int(uid.data)
        # 2. decisions: memory, DB, else decide from the header
        unknown = [u for u in ids.values() if u not in self.decisions]
        store = self.svc.store
        if unknown:
            shared = self.svc.cached_decisions(self.account, mailbox, uidvalidity, unknown)
            if shared:
                self._remember(shared)
                unknown = [u for u in unknown if u not in self.decisions]
        if unknown:
            loaded = await threads.deferToThreadPool(self.svc.reactor, self.svc.pool, store.load,
                                                     self.account, mailbox.decode("utf-8", "replace"),
                                                     uidvalidity, unknown)
            self._remember(loaded)
            self.svc.cache_decisions(self.account, mailbox, uidvalidity, loaded)
            unknown = [u for u in unknown if u not in self.decisions]
        if unknown:
            await self._decide(fc, ids, set(unknown), mailbox, uidvalidity)
        tagged = {i: u for i, u in ids.items() if self.decisions.get(u, None) is not None
                  and self.decisions[u].tagged}
        if not tagged:
            self._forward(fc.tag, raw)
            return
        # 3. untagged messages verbatim, tagged ones one by one, rewritten
        fields = SENT_FIELDS if self._sent_like() else READER_FIELDS
        completions: list[bytes] = []
        if b"VANISHED" in fc.modifiers.upper():
            # QRESYNC: the split sets below name existing messages only; let the client hear
            # about expunged UIDs of its original range (FETCH UID/MODSEQ responses pass as they are).
            completions.append(await self.upstream.send(fc.command(b"", fc.sequence, b"(UID)")[1:]))
        plain = [i for i in ids if i not in tagged]
        if plain:
            completions.append(await self.upstream.send(fc.command(b"", compress(plain))[1:]))
        for i, uid in sorted(tagged.items()):
            d = self.decisions[uid]
            new_header = None
            if needs_new_header(fc, d):
                new_header = await self._new_header(verb, i, uid, d)
            plan = plan_message(fc, d, fields, new_header)
            completions.append(await self._run_rewritten(fc.command(b"", b"%d" % i, plan.items)[1:], plan.handlers))
            for t in d.tags:
                metrics.imap_tagged.labels(t).inc()
        final = next((c for c in completions if up.status_of(c) != b"OK"), completions[0])
        self.send(fc.tag + b" " + final)

    def _forward(self, tag: bytes, raw: bytes) -> None:
        assert self.upstream is not None
        self.inflight.setdefault(tag, []).append(b"FETCH")
        self.upstream.write(raw)

    def _remember(self, decisions: dict[int, Decision]) -> None:
        if len(self.decisions) + len(decisions) > _DECISION_CACHE:
            self.decisions = {}
        self.decisions.update(decisions)

    def _sent_like(self) -> bool:
        return self.mailbox is not None and _mailbox_key(self.mailbox) in self.special

    async def _decide(self, fc: FetchCommand, ids: dict[int, int], unknown: set[int], mailbox: bytes,
                      uidvalidity: int) -> None:
        assert self.tagger is not None
        verb = b"UID FETCH" if fc.uid else b"FETCH"
        wanted = [i for i, u in ids.items() if u in unknown]
        done, rows = await self._lookahead(verb + b" " + compress(wanted) + b" (UID BODY.PEEK[HEADER])\r\n")
        if up.status_of(done) != b"OK":
            return
        sent_like = self._sent_like()
        await self.svc.maybe_refresh_directory()
        new: dict[int, Decision] = {}
        heads: dict[int, bytes] = {}
        for r in rows:
            uid_v = r.items.get(b"UID")
            if uid_v is None or not uid_v.data.isdigit():
                continue
            uid = int(uid_v.data)
            if uid not in unknown:
                continue
            hv = r.items.get(b"BODY[HEADER]")
            header = hv.text() if hv is not None else None
            new[uid] = self.tagger.decide(header, sent_like)
            if header is not None and new[uid].tagged:
                heads[uid] = header
        svc = self.svc
        stored = await threads.deferToThreadPool(svc.reactor, svc.pool, svc.store.save, self.account,
                                                 mailbox.decode("utf-8", "replace"), uidvalidity, new)
        self._remember(stored)
        svc.cache_decisions(self.account, mailbox, uidvalidity, stored)
        for uid, h in heads.items():
            self._cache_header(uid, h)

    def _cache_header(self, uid: int, header: bytes) -> None:
        self.header_cache[uid] = header
        self.header_cache.move_to_end(uid)
        while len(self.header_cache) > _HEADER_CACHE:
            self.header_cache.popitem(last=False)

    async def _new_header(self, verb: bytes, i: int, uid: int, d: Decision) -> bytes:
        header = self.header_cache.get(uid)
        if header is None:
            done, rows = await self._lookahead(verb + b" %d (UID BODY.PEEK[HEADER])\r\n" % i)
            for r in rows:
                hv = r.items.get(b"BODY[HEADER]")
                if hv is not None and hv.text() is not None:
                    header = hv.text()
            if header is None:
                raise ParseError("upstream did not return the header of a tagged message")
            self._cache_header(uid, header)
        return apply_splices(header, d.splices)

    async def _run_rewritten(self, line: bytes, handlers: dict) -> bytes:
        assert self.upstream is not None

        def choose(first: bytes) -> FramerSink | None:
            if fetch_seq(first) is None:
                return None
            return FetchRewriter(handlers, self.send, self.cfg.max_nesting_depth)

        self.upstream.chooser = choose
        try:
            return await self.upstream.send(line)
        finally:
            self.upstream.chooser = None


class _UpstreamRelay(FramerSink):
    """Upstream responses for the client, byte for byte (with capability filtering)."""

    __slots__ = ("s",)

    def __init__(self, session: ClientSession):
        self.s = session

    def segment(self, data: bytes, first: bool, literal: LiteralInfo | None) -> None:
        s = self.s
        if first and literal is None:
            if data[:2] == b"* ":
                data = s.on_untagged(data)
            elif data[:1] != b"+":
                data = s.on_completion(data)
        s.send(data)

    def literal_data(self, data: bytes) -> None:
        self.s.send(data)


def _no_delay(transport: object) -> None:
    """Small IMAP responses must not wait for Nagle + delayed ACK (40 ms)."""
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError):
        pass


def _mailbox_key(name: bytes) -> bytes:
    return b"INBOX" if name.upper() == b"INBOX" else name
