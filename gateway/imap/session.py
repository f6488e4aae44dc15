"""One client session: pre-login (owned by the proxy), then a relay that rewrites a little.

After login, client commands go upstream verbatim (streamed, literals
included) and responses come back byte for byte — except FETCHes that touch
the header of a tagged message, which run as an exclusive operation
(``fetchop.FetchOperation``).  Pre-login lives in ``prelogin.PreLogin``.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet import defer, protocol
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from gateway import metrics
from gateway.imap import upstream as up
from gateway.imap.capabilities import rewrite_caps_in
from gateway.imap.decisions import Decision, Tagger
from gateway.imap.fastio import HeldWrites, eager_send
from gateway.imap.fetchitems import explicit_uids, parse_fetch
from gateway.imap.fetchop import FetchOperation
from gateway.imap.parser import Framer, FramerSink, Incomplete, LiteralInfo, ParseError, parse_astrings
from gateway.imap.prelogin import PreLogin, no_delay
from gateway.imap.valve import Valve

if TYPE_CHECKING:
    from gateway.imap.service import ProxyService

log = logging.getLogger("mailgate.imap")

_MAX_QUEUED = 256 * 1024  # client bytes buffered while a command runs exclusively


class ClientSession(PreLogin, FetchOperation, protocol.Protocol, TimeoutMixin, FramerSink):
    """The client side of one proxied IMAP session."""

    # Slots: thousands of sessions sit idle; an instance dict per session costs ~2 KB.
    __slots__ = ("_auth", "_barrier", "_batch", "_cmd", "_cmd_size", "_cur_kind", "_cur_select", "_cur_tag",
                 "_discarding_line", "_pending_select", "_pending_uidvalidity", "_skip_literal", "account", "cfg",
                 "client_valve", "closing", "counted", "decisions", "exclusive", "framer", "header_cache",
                 "id_params", "idling", "inflight", "limit_key", "logged_in", "logging_out", "mailbox", "special",
                 "svc", "tagger", "tls", "uidvalidity", "upstream", "upstream_bye", "upstream_valve")

    def __init__(self, svc: ProxyService, implicit_tls: bool):
        self.svc = svc
        self.cfg = svc.config.imap
        self.tls = implicit_tls
        self.framer = Framer(self, self.cfg.max_line_length)
        self.upstream: up.UpstreamProtocol | None = None
        self.logged_in = False
        self.account = ""  # the employee's address when the login is an employee (alias-proof)
        self.limit_key = ""  # what the per-account connection limit counted
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
        self.inflight: dict[bytes, list[bytes]] = {}  # tag -> verbs, oldest first
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
        self.special: frozenset[bytes] = frozenset()
        self.decisions: dict[int, Decision] = {}
        self.header_cache: OrderedDict[int, bytes] | None = None  # made when first needed
        self.client_valve: Valve | None = None
        self.upstream_valve: Valve | None = None
        self.logging_out = False
        self.upstream_bye = False
        self._batch = HeldWrites()

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
        if not self.closing and not self._batch.add(data):
            self.transport.write(data)

    def begin_batch(self) -> None:
        self._batch.hold()

    def end_batch(self) -> None:
        data = self._batch.release()
        if data and not self.closing:
            self.transport.write(data)

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
        no_delay(self.transport)
        eager_send(self.transport)
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
            self.svc.limits.logout(self.limit_key)
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
        upstream = self.upstream if self.logged_in else None
        if upstream is not None:
            upstream.hold()  # everything this read relays goes upstream in one write
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
        finally:
            if upstream is not None:
                upstream.release()

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

    def _start_relay(self, proto: up.UpstreamProtocol) -> None:
        """Logged in: upstream responses now flow to the client, with back-pressure both ways."""
        proto.relay = _UpstreamRelay(self)
        proto.batch = (self.begin_batch, self.end_batch)
        self.upstream_valve = Valve(proto.transport)
        self.transport.registerProducer(self.upstream_valve, True)
        proto.transport.registerProducer(self.client_valve, True)

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
                if literal is not None:
                    # IDLE ends with one line (DONE): the upstream reads any other line as a
                    # line too, so what follows is commands, for the proxy to see, not a
                    # literal to relay unread.
                    self.framer.cancel_literal()
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
                    if not self._known_untagged(fc):
                        self._start_fetch(fc, data)
                        return
                    self._note_whole(fc, explicit_uids(fc.sequence, limit=200) or [])
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
            return rewrite_caps_in(data, self.cfg.max_literal_size)
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
            data = rewrite_caps_in(data, self.cfg.max_literal_size)
        if not self.inflight and self._barrier is not None:
            d, self._barrier = self._barrier, None
            self.svc.reactor.callLater(0, d.callback, None)
        return data

    def _select(self, name: bytes | None, uidvalidity: int | None) -> None:
        self.mailbox = name
        self.uidvalidity = uidvalidity if name is not None else None
        self.decisions = {}
        self.header_cache = None


class _UpstreamRelay(up.RelaySink):
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

    def verbatim(self, data: bytes) -> None:
        self.s.send(data)
