"""Fewer reactor round trips per write on the proxy's two connections.

Twisted defers every write twice: the TLS layer aggregates small writes until
a ``callLater(0)``, and the TCP transport only registers for writability
(two ``epoll_ctl`` calls) and sends on the next loop iteration.  The proxy
already batches a whole upstream read into one write, so both delays only cost
CPU.  ``eager_send`` makes a TCP transport send at once when nothing is queued
(falling back to the reactor when the socket is full, closing or failing), and
``write_now`` writes through the TLS layer without the aggregation delay.
Order is preserved: anything the aggregator holds is flushed first.
"""

from __future__ import annotations

from typing import Any


def _tcp_of(transport: Any) -> Any:
    """The TCP connection under ``transport`` (itself, or below a TLSMemoryBIOProtocol)."""
    inner = getattr(transport, "transport", None)  # listenSSL: TLSMemoryBIOProtocol -> tcp.Server
    if inner is None:  # tcp.Connection itself (startTLS keeps the TLS layer in .protocol)
        return transport
    return getattr(inner, "_connection", inner)  # startTLS under a wrapper: _BypassTLS -> tcp.Connection


class _Eager:
    """The replacement of one TCP connection's ``startWriting``."""

    __slots__ = ("tcp", "via_reactor", "held")

    def __init__(self, tcp: Any):
        self.tcp = tcp
        self.via_reactor = tcp.startWriting
        self.held = False  # inside write_now: one send at the end for all TLS records

    def start_writing(self) -> None:
        if not self.held:
            self.send()

    def send(self) -> None:
        tcp = self.tcp
        if (tcp.disconnecting or tcp._writeDisconnected or not tcp.connected or not tcp._tempDataLen
                or tcp.offset < len(tcp.dataBuffer)):
            # closing (loseConnection asks for writability before it sets ``disconnecting``: nothing
            # to write means that), or data already waiting for the reactor
            self.via_reactor()
            return
        result = tcp.doWrite()
        if result is not None or tcp._tempDataLen or tcp.offset < len(tcp.dataBuffer):
            self.via_reactor()  # socket full (the rest goes when writable) or an error the reactor will handle


def eager_send(transport: Any) -> None:
    """Let the TCP connection of ``transport`` send at once when its buffer is empty."""
    tcp = _tcp_of(transport)
    if not hasattr(tcp, "doWrite") or not hasattr(tcp, "_tempDataBuffer") or not hasattr(tcp, "dataBuffer"):
        return
    eager = _Eager(tcp)
    tcp._mg_eager = eager
    tcp.startWriting = eager.start_writing


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, skipping the TLS layer's small-write aggregation delay."""
    if getattr(transport, "TLS", False):  # tcp.Connection after startTLS (both sides of the proxy)
        tls = transport.protocol
    elif hasattr(transport, "_aggregator"):  # a BufferingTLSTransport itself
        tls = transport
    else:
        tls = None
    agg = getattr(tls, "_aggregator", None)
    raw = getattr(agg, "_write", None)
    if raw is None or not getattr(transport, "connected", True):
        transport.write(data)
        return
    eager = getattr(_tcp_of(transport), "_mg_eager", None)
    if eager is None:
        agg.flush()
        raw(data)
        return
    eager.held = True  # a large write is several TLS records: send them together
    try:
        agg.flush()
        raw(data)
    finally:
        eager.held = False
        if eager.tcp._tempDataLen:
            eager.send()
