"""The proxy's connection to the upstream IMAP server.

``UpstreamProtocol`` frames the upstream's responses and routes each one:
completions of the proxy's own commands (tags ``~mgN``) fire Deferreds;
untagged responses go to a ``chooser`` installed by whoever runs a
look-ahead (it may claim FETCH responses), else to the relay sink (the
client session), else — before relaying starts — into ``collected``.
``connect`` does the greeting and STARTTLS/TLS, ``login`` ID and the login.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTCP
from twisted.python.failure import Failure

from gateway.imap.fastio import HeldWrites, eager_send
from gateway.imap.parser import Framer, FramerSink, LiteralInfo, ParseError, quote, refuse_oversized
from gateway.imap.tlslayer import start_tls

log = logging.getLogger("mailgate.imap.upstream")

TAG_PREFIX = b"~mg"


class UpstreamUnavailable(Exception):
    """Cannot reach or talk to the upstream: answer NO [UNAVAILABLE]."""


class LoginRefused(Exception):
    """The upstream refused the credentials; ``line`` is its tagged answer (without tag)."""

    def __init__(self, line: bytes):
        super().__init__(line.decode("utf-8", "replace"))
        self.line = line


class _Collect(FramerSink):
    """Collects one (small) response into a list."""

    def __init__(self, into: list[bytes], limit: int = 1024 * 1024):
        self.into = into
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = limit

    def segment(self, data: bytes, first: bool, literal: LiteralInfo | None) -> None:
        self._add(data)
        if literal is None:
            self.into.append(b"".join(self.parts))

    def literal_data(self, data: bytes) -> None:
        self._add(data)

    def _add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise ParseError("upstream response too large")
        self.parts.append(data)


class _Tagged(FramerSink):
    def __init__(self, done: Callable[[bytes], None]):
        self.done = done

    def segment(self, data: bytes, first: bool, literal: LiteralInfo | None) -> None:
        if literal is not None:
            raise ParseError("literal in a tagged response")
        self.done(data)

    def literal_data(self, data: bytes) -> None:  # pragma: no cover - excluded above
        raise ParseError("literal in a tagged response")


Chooser = Callable[[bytes], FramerSink | None]

#: Lines of an upstream response the relay must look at: tagged lines (completions, the proxy's own
#: ``~mg`` tags) and the untagged responses ``ClientSession.on_untagged`` acts on.  Every other
#: complete line without a literal is relayed untouched, so it may skip the framer.
_NEEDS_LOOK = re.compile(rb"(?im)^(?:\* (?:CAPABILITY |OK \[CAPABILITY|PREAUTH|BYE|OK \[UIDVALIDITY)|(?!\* |\+)(?=.))")


class RelaySink(FramerSink):
    """The relay of upstream responses to the client (``ClientSession``'s side)."""

    def verbatim(self, data: bytes) -> None:
        """Complete response lines that ``_NEEDS_LOOK`` passes over: to the client as they are."""
        raise NotImplementedError


class UpstreamProtocol(protocol.Protocol, FramerSink):
    __slots__ = ("_current", "_got_greeting", "_n", "_out", "batch", "chooser", "closed", "collected", "framer",
                 "greeting", "greeting_caps", "on_lost", "ready", "relay", "waiters")

    def __init__(self, max_line: int = 8 * 1024 * 1024):
        self.framer = Framer(self, max_line, refuse_oversized)  # 20+ digits: a protocol error
        self.waiters: dict[bytes, defer.Deferred[bytes]] = {}
        self.chooser: Chooser | None = None
        self.relay: RelaySink | None = None
        self.collected: list[bytes] = []
        self.greeting: defer.Deferred[bytes] = defer.Deferred()
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.on_lost: Callable[[str], None] | None = None
        self._current: FramerSink | None = None
        self._n = 0
        self._got_greeting = False
        self.closed = False
        self.greeting_caps: list[bytes] | None = None
        # (begin, end) hooks around each read, so the client gets one write per upstream read
        self.batch: tuple[Callable[[], None], Callable[[], None]] | None = None
        self._out = HeldWrites()  # writes held while one client read is relayed

    # -- twisted ---------------------------------------------------------------------
    def connectionMade(self) -> None:
        self.ready.callback(None)

    def dataReceived(self, data: bytes) -> None:
        batch = self.batch
        if batch is not None:
            batch[0]()
        try:
            if self.relay is None or self.chooser is not None or not self.framer.idle or not self._pass_through(data):
                self.framer.feed(data)
        except ParseError as exc:
            log.error("upstream protocol error: %s", exc)
            self.fail(f"upstream protocol error: {exc}")
        finally:
            if batch is not None:
                batch[1]()

    def _pass_through(self, data: bytes) -> bool:
        """Relay a read of complete lines without literals, framing only the lines the relay must see.

        Returns False (nothing consumed) when the read needs the framer: a partial line, a literal,
        a bare LF.  If routing changes midway (a completion installs a look-ahead ``chooser``), the
        rest of the read goes to the framer, which is at a line boundary then.
        """
        if data[-2:] != b"\r\n" or b"}\r\n" in data or data.count(b"\n") != data.count(b"\r\n"):
            return False
        relay = self.relay
        assert relay is not None
        start = 0
        for m in _NEEDS_LOOK.finditer(data):
            at = m.start()
            end = data.index(b"\n", at) + 1
            if at > start:
                relay.verbatim(data[start:at])
            self.segment(data[at:end], True, None)
            start = end
            if self.chooser is not None or self.relay is not relay or self.closed:
                if end < len(data) and not self.closed:
                    self.framer.feed(data[end:])
                return True
        if start == 0:
            relay.verbatim(data)
        elif start < len(data):
            relay.verbatim(data[start:])
        return True

    def fail(self, why: str) -> None:
        if not self.closed:
            self.closed = True
            self.transport.abortConnection()
            self._lost(why)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.closed = True
        self._lost("upstream connection closed")
        self.relay = self.chooser = self.batch = None  # no cycle with the client session to wait for the GC

    def _lost(self, why: str) -> None:
        waiters, self.waiters = self.waiters, {}
        for d in waiters.values():
            d.errback(UpstreamUnavailable(why))
        if not self.greeting.called:
            self.greeting.errback(UpstreamUnavailable(why))
        cb, self.on_lost = self.on_lost, None
        if cb is not None:
            cb(why)

    # -- framing -----------------------------------------------------------------------
    def segment(self, data: bytes, first: bool, literal: LiteralInfo | None) -> None:
        if first:
            self._current = self._route(data)
        assert self._current is not None
        self._current.segment(data, first, literal)

    def literal_data(self, data: bytes) -> None:
        assert self._current is not None
        self._current.literal_data(data)

    def literal_end(self) -> None:
        assert self._current is not None
        self._current.literal_end()

    def _route(self, first: bytes) -> FramerSink:
        if not self._got_greeting:
            self._got_greeting = True
            return _Tagged(self._on_greeting)
        if first.startswith(TAG_PREFIX):
            return _Tagged(self._on_tagged)
        if self.chooser is not None:
            sink = self.chooser(first)
            if sink is not None:
                return sink
        if self.relay is not None:
            return self.relay
        return _Collect(self.collected)

    def _on_greeting(self, line: bytes) -> None:
        self.greeting.callback(line)

    def _on_tagged(self, line: bytes) -> None:
        tag, _, rest = line.partition(b" ")
        d = self.waiters.pop(tag, None)
        if d is None:
            log.warning("unexpected upstream completion %r", line[:80])
            return
        d.callback(rest)

    # -- commands ------------------------------------------------------------------------
    def next_tag(self) -> bytes:
        self._n += 1
        return TAG_PREFIX + b"%d" % self._n

    def send(self, line: bytes, tag: bytes | None = None) -> defer.Deferred[bytes]:
        """Send ``TAG line`` (line ends with CRLF); fires with the completion (without tag)."""
        if self.closed:
            return defer.fail(UpstreamUnavailable("upstream connection closed"))
        tag = tag or self.next_tag()
        d: defer.Deferred[bytes] = defer.Deferred()
        self.waiters[tag] = d
        self.write(tag + b" " + line)
        return d

    def write(self, data: bytes) -> None:
        if not self._out.add(data) and not self.closed:
            self.transport.write(data)

    def hold(self) -> None:
        """Collect writes until ``release`` (one client read -> one upstream write)."""
        self._out.hold()

    def release(self) -> None:
        data = self._out.release()
        if data and not self.closed:
            self.transport.write(data)


def status_of(completion: bytes) -> bytes:
    return completion.split(b" ", 1)[0].upper()


def capabilities_from(lines: list[bytes], completion: bytes = b"") -> list[bytes] | None:
    """Capabilities from ``* CAPABILITY`` lines or a ``[CAPABILITY ...]`` code."""
    for line in lines:
        if line[:13].upper() == b"* CAPABILITY ":
            return line[13:].rstrip(b"\r\n").split()
    for text in [completion, *lines]:
        i = text.upper().find(b"[CAPABILITY ")
        if i >= 0:
            j = text.find(b"]", i)
            if j > 0:
                return text[i + 12 : j].split()
    return None


@dataclass
class UpstreamSettings:
    host: str
    port: int
    security: str  # tls | starttls | none
    timeout: float
    tls_context: ssl.SSLContext | None  # verifies the upstream (host name and chain)


class _OneProtocol(protocol.ClientFactory):
    """Connects ``proto`` itself: no wrapper protocol, no factory class made per connection."""

    def __init__(self, proto: UpstreamProtocol):
        self.proto = proto

    def buildProtocol(self, addr: object) -> UpstreamProtocol:
        return self.proto

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        if not self.proto.ready.called:
            self.proto.ready.errback(reason)


def _give_up(proto: UpstreamProtocol, connector: object | None) -> None:
    """A connection that failed or timed out must not linger (connecting or connected)."""
    if proto.transport is not None:
        proto.closed = True
        proto.on_lost = None
        proto.transport.abortConnection()
    elif connector is not None and getattr(connector, "state", "") == "connecting":
        connector.stopConnecting()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def connect(reactor: IReactorTCP, s: UpstreamSettings) -> UpstreamProtocol:
    """Connect (TLS when asked) and read the greeting, or raise UpstreamUnavailable."""
    proto = UpstreamProtocol()
    connector = None
    try:
        if _is_ip(s.host):
            connector = reactor.connectTCP(s.host, s.port, _OneProtocol(proto), timeout=s.timeout)
            d = proto.ready
        else:  # names: HostnameEndpoint tries every address (IPv6 and IPv4)
            d = HostnameEndpoint(reactor, s.host, s.port, timeout=s.timeout).connect(_OneProtocol(proto))
        d.addTimeout(s.timeout, reactor)
        await d
        eager_send(proto.transport)
        if s.security == "tls":
            start_tls(proto.transport, proto, s.tls_context, server_side=False, hostname=s.host, clock=reactor)
        g = proto.greeting
        g.addTimeout(s.timeout, reactor)
        greeting = await g
    except Exception as exc:  # noqa: BLE001 - every failure here means "unavailable"
        _give_up(proto, connector)
        if isinstance(exc, UpstreamUnavailable):
            raise
        raise UpstreamUnavailable(str(exc) or exc.__class__.__name__) from exc
    if not greeting.upper().startswith(b"* OK"):
        proto.transport.loseConnection()
        raise UpstreamUnavailable("upstream greeting: " + greeting.decode("utf-8", "replace").strip())
    proto.greeting_caps = capabilities_from([], greeting)
    if s.security == "starttls":
        done = await _command(proto, b"STARTTLS\r\n", s, reactor)
        if status_of(done) != b"OK":
            proto.transport.loseConnection()
            raise UpstreamUnavailable("upstream refused STARTTLS")
        # Whatever came after the OK in the same read was sent before TLS: injected by someone
        # on the path (CVE-2011-0411's client side), never the server's answer to anything.
        if injected := proto.framer.take_buffer():
            log.warning("upstream sent %d bytes after STARTTLS's OK, before TLS; dropped", len(injected))
        start_tls(proto.transport, proto, s.tls_context, server_side=False, hostname=s.host, clock=reactor)
        proto.greeting_caps = None  # capabilities must be asked again under TLS
    return proto


async def _command(proto: UpstreamProtocol, line: bytes, s: UpstreamSettings, reactor: IReactorTCP) -> bytes:
    return await _wait(proto.send(line), s, reactor, proto)


async def _wait(d: defer.Deferred[bytes], s: UpstreamSettings, reactor: IReactorTCP, proto: UpstreamProtocol) -> bytes:
    d.addTimeout(s.timeout, reactor)
    try:
        return await d
    except defer.TimeoutError:
        proto.fail("upstream timeout")
        raise UpstreamUnavailable("upstream timeout") from None


async def login(reactor: IReactorTCP, proto: UpstreamProtocol, s: UpstreamSettings, user: bytes, password: bytes,
                id_params: list[tuple[bytes, bytes | None]]) -> list[bytes]:
    """ID + login with the client's credentials; returns the post-login capabilities."""
    proto.collected.clear()
    pre = proto.greeting_caps
    if pre is None:
        await _command(proto, b"CAPABILITY\r\n", s, reactor)
        pre = capabilities_from(proto.collected) or []
    caps = {c.upper() for c in pre}
    id_done = None
    if b"ID" in caps and id_params:
        # Pipelined with the login: the ID must reach the server first, not its answer.
        fields = b" ".join(quote(k) + b" " + (b"NIL" if v is None else quote(v)) for k, v in id_params)
        id_done = proto.send(b"ID (" + fields + b")\r\n")
    if b"AUTH=PLAIN" in caps and b"SASL-IR" in caps:
        token = base64.b64encode(b"\0" + user + b"\0" + password)
        auth = proto.send(b"AUTHENTICATE PLAIN " + token + b"\r\n")
        if id_done is not None:
            await _wait(id_done, s, reactor, proto)
        proto.collected.clear()
        done = await _wait(auth, s, reactor, proto)
    else:
        if id_done is not None:
            await _wait(id_done, s, reactor, proto)
        proto.collected.clear()
        done = await _login_command(proto, s, reactor, user, password, b"LITERAL+" in caps)
    if status_of(done) != b"OK":
        raise LoginRefused(done)
    proto.greeting_caps = None  # not needed any more (an idle session keeps nothing it does not use)
    after = capabilities_from(proto.collected, done)
    if after is None:
        proto.collected.clear()
        await _command(proto, b"CAPABILITY\r\n", s, reactor)
        after = capabilities_from(proto.collected) or []
    return after


async def _login_command(proto: UpstreamProtocol, s: UpstreamSettings, reactor: IReactorTCP,
                         user: bytes, password: bytes, literal_plus: bool) -> bytes:
    def arg(v: bytes) -> bytes:
        if literal_plus and (b'"' in v or b"\\" in v or any(c > 126 or c < 32 for c in v)):
            return b"{%d+}\r\n" % len(v) + v
        return quote(v)

    if not literal_plus and any(b'"' in v or b"\\" in v or b"\r" in v or b"\n" in v for v in (user, password)):
        # Quoting handles " and \ ; CR/LF cannot be sent without synchronising literals.
        if any(b"\r" in v or b"\n" in v for v in (user, password)):
            return b"NO [AUTHENTICATIONFAILED] Invalid characters in credentials\r\n"
    return await _command(proto, b"LOGIN " + arg(user) + b" " + arg(password) + b"\r\n", s, reactor)
