"""Sends without a reactor round trip on the proxy's TCP connections.

Twisted's TCP transport only registers for writability (two ``epoll_ctl``
calls) and sends on the next loop iteration.  The proxy already batches a
whole read into one write (and ``tlslayer.TLSLayer`` turns one application
write into one TCP write), so that delay only costs CPU.  ``eager_send`` makes
a TCP transport send at once when nothing is queued, falling back to the
reactor when the socket is full, closing or failing.  Order is preserved.
"""

from __future__ import annotations

from typing import Any


def _tcp_of(transport: Any) -> Any:
    """The TCP connection under ``transport`` (itself, or below a ``TLSLayer``)."""
    inner = getattr(transport, "transport", None)
    return transport if inner is None else inner


class _Eager:
    """The replacement of one TCP connection's ``startWriting``."""

    __slots__ = ("tcp", "via_reactor")

    def __init__(self, tcp: Any):
        self.tcp = tcp
        self.via_reactor = tcp.startWriting

    def start_writing(self) -> None:
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
    tcp.startWriting = _Eager(tcp).start_writing


class HeldWrites:
    """Writes collected between ``hold`` and ``release`` and then sent as one (one read
    relayed -> one write on the other connection)."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] | None = None

    def hold(self) -> None:
        if self._parts is None:
            self._parts = []

    def add(self, data: bytes) -> bool:
        """Keep ``data`` if writes are held (True); False: the caller writes it now."""
        if self._parts is None:
            return False
        self._parts.append(data)
        return True

    def release(self) -> bytes:
        """Stop holding; what was held, joined (b"" if nothing)."""
        parts, self._parts = self._parts, None
        if not parts:
            return b""
        return parts[0] if len(parts) == 1 else b"".join(parts)
