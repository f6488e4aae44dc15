"""TLS for the proxy's connections: the standard library's ``ssl.SSLObject`` over a Twisted TCP transport.

Twisted's own TLS layer (``TLSMemoryBIOProtocol`` over pyOpenSSL) costs the
proxy twice: CPU (every ``recv``/``send``/``bio_read`` is a cffi call through
Python, a 32 KB buffer is allocated and copied per call, and each read ends in
a ``WantReadError`` raised through Python code) and memory (≈ 60–100 KB per
idle TLS connection with the OpenSSL that ``cryptography`` bundles, against
≈ 19 KB for ``ssl.SSLObject``, measured with 1,000 idle pairs in one process).

``TLSLayer`` sits between the TCP connection (its ``transport``) and the IMAP
protocol (``inner``), for which it *is* the transport.  It is installed either
when a connection is accepted (implicit TLS, ``TLSServerFactory``) or on a
live connection (``start_tls``: STARTTLS from a client, TLS to the upstream).

Memory BIOs never shrink (OpenSSL keeps a ``BIO_s_mem`` buffer at the largest
size it ever held), so bytes go through them at most ``CHUNK`` at a time: an
idle connection keeps at most a few KB there, whatever it carried before.
Each application write becomes one TCP write (the proxy already batches per
read), each TCP read one ``dataReceived`` of the protocol above.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from twisted.internet import protocol
from twisted.internet.interfaces import IPushProducer, IReactorTime, ITCPTransport
from twisted.python.failure import Failure
from zope.interface import implementer

log = logging.getLogger("mailgate.imap.tls")

#: Bytes moved through a memory BIO at a time (bounds what an idle connection keeps there).
CHUNK = 4096
#: Largest TLS record payload: one ``SSLObject.read`` returns at most this much.
_RECORD = 16384
#: Seconds a connection closed during its handshake may take to finish it (then it is aborted).
CLOSE_HANDSHAKE_TIMEOUT = 10.0


@implementer(ITCPTransport, IPushProducer)
class TLSLayer(protocol.Protocol):
    """TLS between a TCP transport (below, ``transport``) and a protocol (above, ``inner``)."""

    TLS = True  # what twisted's TCP transport says after startTLS; callers may check it
    __slots__ = ("_close_after_handshake", "_handshaking", "_in", "_lost", "_out", "_pending", "_ssl", "clock",
                 "disconnecting", "inner")

    def __init__(self, ctx: ssl.SSLContext, inner: protocol.Protocol, server_side: bool,
                 hostname: str | None = None, clock: IReactorTime | None = None):
        self.inner = inner
        self.clock = clock  # for the close-during-handshake timeout (None: the global reactor)
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = ctx.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=hostname)
        self._handshaking = True
        self._pending: list[bytes] = []  # application writes before the handshake finished
        self._close_after_handshake = False
        self._lost = False
        self.disconnecting = False

    # -- below: the TCP connection ---------------------------------------------------------
    def connectionMade(self) -> None:
        """Implicit TLS: the protocol above starts at once (its first writes wait for the handshake)."""
        self.inner.makeConnection(self)
        self._handshake()

    def dataReceived(self, data: bytes) -> None:
        if self._lost:
            return
        parts: list[bytes] = []
        if len(data) <= CHUNK:
            self._in.write(data)
            going = self._decrypt(parts)
        else:
            view = memoryview(data)
            for i in range(0, len(data), CHUNK):
                self._in.write(view[i : i + CHUNK])
                going = self._decrypt(parts)
                if not going:
                    break
        if parts and not self._lost:
            self.inner.dataReceived(parts[0] if len(parts) == 1 else b"".join(parts))
        if self._lost:
            return
        if not going:  # the peer's close_notify: the stream is over
            self.disconnecting = True
            self.transport.loseConnection()
        elif self._out.pending:  # post-handshake messages (tickets, key updates)
            self.transport.write(self._out.read())

    def _decrypt(self, parts: list[bytes]) -> bool:
        """Append the application bytes now readable to ``parts``; False when the stream is over."""
        if self._handshaking and not self._handshake():
            return not self._lost
        sslobj, inc = self._ssl, self._in
        try:
            while inc.pending or sslobj.pending():
                data = sslobj.read(_RECORD)
                if not data:  # the peer's close_notify
                    return False
                parts.append(data)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:  # close_notify (when the stdlib raises rather than returns b"")
            return False
        except ssl.SSLError as exc:
            self._fail(exc)
            return False
        return True

    def _handshake(self) -> bool:
        """Advance the handshake; True once it is complete."""
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_out()
            return False
        except ssl.SSLError as exc:
            self._flush_out()  # the alert tells the peer why
            self._fail(exc)
            return False
        self._handshaking = False
        self._flush_out()
        pending, self._pending = self._pending, []
        if pending:
            self._encrypt(b"".join(pending))
        if self._close_after_handshake:
            self.loseConnection()
        return True

    def _fail(self, exc: Exception) -> None:
        peer = getattr(self.transport.getPeer(), "host", "?")
        log.info("TLS with %s failed: %s", peer, exc)
        self._lost = True
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._lost = True
        self._pending = []
        self.inner.connectionLost(reason)
        # The OpenSSL objects go now, not when the garbage collector finds the cycle between this
        # layer and its protocol (their C memory is invisible to its thresholds).
        self._ssl = self._in = self._out = None  # type: ignore[assignment]

    # -- above: the transport of the protocol ----------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.disconnecting or self._lost:
            return
        if self._handshaking:
            self._pending.append(data)
            return
        self._encrypt(data)

    def writeSequence(self, seq: list[bytes]) -> None:
        self.write(b"".join(seq))

    def _encrypt(self, data: bytes) -> None:
        sslobj, out = self._ssl, self._out
        try:
            if len(data) <= CHUNK:
                sslobj.write(data)
                self.transport.write(out.read())
                return
            view = memoryview(data)
            records = []
            for i in range(0, len(data), CHUNK):
                sslobj.write(view[i : i + CHUNK])
                records.append(out.read())
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self.transport.writeSequence(records)

    def _flush_out(self) -> None:
        if self._out.pending:
            self.transport.write(self._out.read())

    def loseConnection(self) -> None:
        """Send close_notify after what is written, then close (the peer's close_notify is not awaited)."""
        if self.disconnecting or self._lost:
            return
        if self._handshaking:
            if not self._close_after_handshake:
                self._close_after_handshake = True
                clock = self.clock
                if clock is None:
                    from twisted.internet import reactor as clock
                clock.callLater(CLOSE_HANDSHAKE_TIMEOUT, self._abort_if_handshaking)
            return
        self.disconnecting = True
        try:
            self._ssl.unwrap()
        except ssl.SSLError:
            pass  # SSLWantReadError: our close_notify is out, the peer's is not awaited
        self._flush_out()
        self.transport.loseConnection()

    def _abort_if_handshaking(self) -> None:
        if self._handshaking and not self._lost:
            self.abortConnection()

    def abortConnection(self) -> None:
        self.disconnecting = True
        self.transport.abortConnection()

    def getPeer(self) -> Any:
        return self.transport.getPeer()

    def getHost(self) -> Any:
        return self.transport.getHost()

    def getHandle(self) -> Any:
        return self.transport.getHandle()

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.transport.setTcpNoDelay(enabled)

    def getTcpNoDelay(self) -> bool:
        return self.transport.getTcpNoDelay()

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.transport.setTcpKeepAlive(enabled)

    def getTcpKeepAlive(self) -> bool:
        return self.transport.getTcpKeepAlive()

    def loseWriteConnection(self) -> None:
        self.loseConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    # IPushProducer: pausing the layer pauses reading from the socket
    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()


class TLSServerFactory(protocol.Factory):
    """Implicit TLS: wraps each protocol of ``factory`` in a server-side ``TLSLayer``."""

    def __init__(self, factory: protocol.Factory, ctx: ssl.SSLContext, clock: IReactorTime | None = None):
        self.factory = factory
        self.ctx = ctx
        self.clock = clock

    def buildProtocol(self, addr: Any) -> TLSLayer | None:
        inner = self.factory.buildProtocol(addr)
        if inner is None:
            return None
        layer = TLSLayer(self.ctx, inner, server_side=True, clock=self.clock)
        layer.factory = self
        return layer


def start_tls(transport: Any, inner: protocol.Protocol, ctx: ssl.SSLContext, server_side: bool,
              hostname: str | None = None, clock: IReactorTime | None = None) -> TLSLayer:
    """Put TLS under ``inner`` on its live TCP ``transport`` (STARTTLS, or TLS to the upstream)."""
    layer = TLSLayer(ctx, inner, server_side, hostname, clock)
    layer.transport = transport
    layer.connected = 1
    transport.protocol = layer  # twisted's tcp.Connection delivers reads to .protocol
    inner.transport = layer
    layer._handshake()
    return layer
