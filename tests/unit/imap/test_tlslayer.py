"""The proxy's TLS layer (stdlib SSLObject over a Twisted transport), over in-memory transports."""

from __future__ import annotations

import logging
import random
import ssl

import pytest
from twisted.internet import protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway.demo.upstream import make_self_signed_cert
from gateway.imap import tlslayer
from gateway.imap.tlslayer import CHUNK, TLSLayer, TLSServerFactory, start_tls


class Recorder(protocol.Protocol):
    def __init__(self, greeting: bytes = b""):
        self.greeting = greeting
        self.data = bytearray()
        self.reads = 0
        self.lost = False

    def connectionMade(self) -> None:
        if self.greeting:
            self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.reads += 1

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.lost = True


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "c.crt", d / "c.key"
    make_self_signed_cert(cert, key)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


class Pair:
    """A server layer (implicit TLS) and a client layer (start_tls) joined by StringTransports."""

    def __init__(self, contexts, greeting: bytes = b"", split: random.Random | None = None,
                 server_app: Recorder | None = None):
        server_ctx, client_ctx = contexts
        self.server_app, self.client_app = server_app or Recorder(greeting), Recorder()
        self.server_tcp, self.client_tcp = StringTransport(), StringTransport()
        self.clock = Clock()
        factory = TLSServerFactory(protocol.Factory.forProtocol(lambda: self.server_app), server_ctx, self.clock)
        self.server = factory.buildProtocol(None)
        self.server.makeConnection(self.server_tcp)
        self.client_app.makeConnection(self.client_tcp)
        self.client = start_tls(self.client_tcp, self.client_app, client_ctx, server_side=False,
                                hostname="localhost")
        self.split = split
        self.pump()

    def _move(self, tcp: StringTransport, to: TLSLayer) -> bool:
        data = tcp.value()
        tcp.clear()
        if not data:
            return False
        if self.split is None:
            to.dataReceived(data)
        else:  # arbitrary TCP segmentation, pieces below and above CHUNK
            i = 0
            while i < len(data):
                n = self.split.choice([1, 5, 100, CHUNK - 1, CHUNK + 7, 3 * CHUNK, 70_000])
                to.dataReceived(data[i : i + n])
                i += n
        return True

    def pump(self) -> None:
        while self._move(self.client_tcp, self.server) | self._move(self.server_tcp, self.client):
            pass


def test_handshake_and_data_both_ways(contexts):
    p = Pair(contexts, greeting=b"* OK ready\r\n")
    assert bytes(p.client_app.data) == b"* OK ready\r\n"  # written before the handshake, delivered after
    assert p.client_app.transport is p.client and p.client_tcp.protocol is p.client
    p.client.write(b"a LOGIN u p\r\n")
    p.client.writeSequence([b"b NOOP", b"\r\n"])
    p.pump()
    assert bytes(p.server_app.data) == b"a LOGIN u p\r\nb NOOP\r\n"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_large_writes_arrive_byte_identical_in_any_segmentation(contexts, seed):
    rnd = random.Random(seed)
    p = Pair(contexts, split=rnd)
    blob = rnd.randbytes(1_000_003)
    p.server.write(blob)
    p.server.write(b"tail\r\n")
    p.client.write(blob[:200_001])
    p.pump()
    assert bytes(p.client_app.data) == blob + b"tail\r\n"
    assert bytes(p.server_app.data) == blob[:200_001]


def test_one_tcp_read_is_one_read_above(contexts):
    p = Pair(contexts)
    for part in (b"x" * 300, b"y" * 20_000, b"z" * 40):
        p.server.write(part)
    p.client_app.reads = 0
    p.pump()  # three TLS writes, one TCP read of all their records
    assert p.client_app.reads == 1
    assert bytes(p.client_app.data) == b"x" * 300 + b"y" * 20_000 + b"z" * 40


def test_close_sends_close_notify_and_the_peer_closes(contexts):
    p = Pair(contexts)
    p.server.write(b"* BYE bye\r\n")
    p.server.loseConnection()
    assert p.server_tcp.disconnecting
    p.server.write(b"after close\r\n")  # dropped
    p.pump()
    assert bytes(p.client_app.data) == b"* BYE bye\r\n"
    assert p.client_tcp.disconnecting  # the close_notify ended the stream


def test_close_during_handshake_waits_for_it_then_sends_what_was_written(contexts):
    class Refuser(Recorder):
        def connectionMade(self) -> None:
            self.transport.write(b"* BYE [UNAVAILABLE] Too many connections\r\n")
            self.transport.loseConnection()

    p = Pair(contexts, server_app=Refuser())
    assert bytes(p.client_app.data) == b"* BYE [UNAVAILABLE] Too many connections\r\n"
    assert p.server_tcp.disconnecting and p.client_tcp.disconnecting
    p.clock.advance(tlslayer.CLOSE_HANDSHAKE_TIMEOUT)  # the handshake timer is harmless after it
    assert not p.server_tcp.disconnected


def test_close_during_a_handshake_that_never_ends_aborts_later(contexts):
    clock = Clock()
    server_ctx, client_ctx = contexts
    app = Recorder()
    layer = TLSLayer(server_ctx, app, server_side=True, clock=clock)
    tcp = StringTransport()
    layer.makeConnection(tcp)
    app.transport.write(b"* BYE [UNAVAILABLE] Too many connections\r\n")
    app.transport.loseConnection()
    clock.advance(tlslayer.CLOSE_HANDSHAKE_TIMEOUT - 1)
    assert not tcp.disconnecting
    clock.advance(1)  # a client that never finishes the handshake is aborted by the timer
    assert tcp.disconnecting


def test_failed_handshake_aborts_and_logs(contexts, tmp_path, caplog):
    other_cert, other_key = tmp_path / "o.crt", tmp_path / "o.key"
    make_self_signed_cert(other_cert, other_key)
    wrong = ssl.create_default_context(cafile=str(other_cert))  # does not trust the server
    server_ctx, _ = contexts
    with caplog.at_level(logging.INFO, logger="mailgate.imap.tls"):
        p = Pair((server_ctx, wrong))
    assert p.client_tcp.disconnected or p.client_tcp.disconnecting
    assert not p.client_app.data and not p.server_app.data
    assert any("certificate verify failed" in r.getMessage() for r in caplog.records)


def test_connection_lost_reaches_the_protocol_above(contexts):
    p = Pair(contexts)
    p.client.connectionLost(protocol.connectionDone)
    assert p.client_app.lost
    p.client.dataReceived(b"late bytes")  # ignored after the loss
    assert not p.client_app.data


def test_producer_calls_go_to_the_tcp_transport(contexts):
    p = Pair(contexts)
    p.server.pauseProducing()
    assert p.server_tcp.producerState == "paused"
    p.server.resumeProducing()
    assert p.server_tcp.producerState == "producing"

    class Producer:
        def pauseProducing(self): ...
        def resumeProducing(self): ...
        def stopProducing(self): ...

    prod = Producer()
    p.server.registerProducer(prod, True)
    assert p.server_tcp.producer is prod
    p.server.unregisterProducer()
    assert p.server_tcp.producer is None
