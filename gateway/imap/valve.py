"""Flow control between the two transports of a session."""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


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
