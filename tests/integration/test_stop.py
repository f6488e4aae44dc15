"""Stopping a running node (``mailgate run``, SIGTERM) loses nothing and delivers nothing twice.

The relay with a slow upstream (a sink that holds its replies, ``SinkServer.hold``): a delivery
whose end of data went out before the stop waits for its reply and is recorded; one still
before its end of data is cut and its row released — either way one delivery, and the row
right after a restart.  The SMTP sessions: an idle one is answered 421 at once; one in the
middle of DATA, or whose message is being committed, gets its 250 first, then the 421, and
its message is queued exactly once.  (gateway/relay.py and gateway/smtp/server.py, their
module docs; docs/ARCHITECTURE.md §1.)
"""

from __future__ import annotations

import os
import signal
import smtplib
import ssl

import pytest

from gateway.db import connect
from gateway.db.models import OutboundMessage
from gateway.demo.sample_data import seed
from gateway.demo.sink import SinkServer
from tests.harness.gateway import GatewayProcess, start_hooked
from tests.integration.test_submission_disconnect import SITECUSTOMIZE

pytestmark = pytest.mark.integration

RCPT = "einkauf@hamburg-tools.de"


def message(subject: str, message_id: str) -> bytes:
    return (f"From: alice@acme.test\r\nTo: {RCPT}\r\nSubject: {subject}\r\nMessage-ID: <{message_id}>\r\n\r\n"
            "Prices inside.\r\n").encode()


def client(gw: GatewayProcess, login: bool = True) -> smtplib.SMTP:
    conn = smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30)
    conn.starttls(context=ssl.create_default_context(cafile=str(gw.cert_path)))
    if login:
        conn.login("alice@acme.test", "alice-pw")
    return conn


def submit(gw: GatewayProcess, subject: str, message_id: str) -> None:
    with client(gw) as conn:
        conn.sendmail("alice@acme.test", [RCPT], message(subject, message_id))


def begin_data(conn: smtplib.SMTP) -> None:
    assert conn.mail("alice@acme.test")[0] == 250
    assert conn.rcpt(RCPT)[0] == 250
    conn.putcmd("data")
    assert conn.getreply()[0] == 354


def rows(message_id: str) -> list[OutboundMessage]:
    return list(OutboundMessage.select().where(OutboundMessage.message_id == f"<{message_id}>"))


def sigterm(gw: GatewayProcess) -> int:
    """Begin the stop; returns where its log lines begin."""
    mark = len(gw.log_lines)
    gw.proc.send_signal(signal.SIGTERM)
    gw.wait_for_log("mailgate stopping", after=mark)
    return mark


def delivered(sink: SinkServer, message_id: str) -> int:
    return sum(f"Message-ID: <{message_id}>".encode() in m.data for m in sink.messages())


# -- the relay, a slow upstream -------------------------------------------------------


@pytest.fixture
def upstream(tmp_path):
    """The relay's upstream: a sink of the test's own, reached directly (plain SMTP on loopback)."""
    with SinkServer(tmp_path / "upstream") as server:
        yield server
        server.release()


def relaying_gateway(tmp_path, dovecot, upstream: SinkServer, process: str) -> GatewayProcess:
    gw = GatewayProcess(tmp_path / "gw", dovecot, overrides={"relay": {
        "host": "127.0.0.1", "port": upstream.port, "security": "none", "process": process}})
    connect(gw.db_url)
    seed()
    gw.start()
    return gw


@pytest.mark.parametrize("process", ["separate", "inline"])
def test_a_reply_still_to_come_at_the_stop_is_waited_for_and_recorded(tmp_path, dovecot, upstream, process):
    """The upstream took the end of data and holds its reply when the node stops: the relay
    waits past its send deadline, records the 250, and the node exits cleanly; after a restart
    nothing is delivered again."""
    gw = relaying_gateway(tmp_path, dovecot, upstream, process)
    try:
        upstream.hold("DATA")
        submit(gw, "Quote Q-1", "q1@acme.test")
        assert upstream.held.wait(20)  # the end of data went out; no reply yet
        mark = sigterm(gw)
        gw.wait_for_log("s more for the upstream's reply to an end of data", after=mark)
        upstream.release()
        assert gw.stop() == 0
        [row] = rows("q1@acme.test")
        assert (row.state, row.attempts, row.claimed_by) == ("sent", 1, None)
        assert delivered(upstream, "q1@acme.test") == 1
        assert "could not record the relay outcome" not in gw.log_text()
        assert "did not end within" not in gw.log_text()

        gw.start()  # nothing of the first message is left to relay: only the second goes out
        submit(gw, "Quote Q-2", "q2@acme.test")
        upstream.wait_for(2, timeout=20)
        assert delivered(upstream, "q1@acme.test") == 1 and delivered(upstream, "q2@acme.test") == 1
        [row] = rows("q1@acme.test")
        assert (row.state, row.attempts) == ("sent", 1)
    finally:
        gw.stop()


def test_a_delivery_before_its_end_of_data_at_the_stop_is_cut_and_its_row_released(tmp_path, dovecot, upstream):
    """The upstream holds its RCPT reply when the node stops: the transaction is cut before any
    end of data, the row released (no attempt counted, no claim left), the node exits cleanly
    and, restarted, delivers the message once."""
    gw = relaying_gateway(tmp_path, dovecot, upstream, "separate")
    try:
        upstream.hold("RCPT")
        submit(gw, "Quote Q-3", "q3@acme.test")
        assert upstream.held.wait(20)
        sigterm(gw)
        assert gw.stop() == 0
        assert "delivery aborted by the stop before the end of data; released for another try" in gw.log_text()
        [row] = rows("q3@acme.test")
        assert (row.state, row.attempts, row.claimed_by, row.claimed_until) == ("queued", 0, None, None)
        upstream.release()
        assert upstream.messages() == []

        gw.start()
        upstream.wait_for(1, timeout=20)
        gw.wait_for_log("status=sent")
        [row] = rows("q3@acme.test")
        assert (row.state, row.attempts) == ("sent", 1)
        assert delivered(upstream, "q3@acme.test") == 1
    finally:
        gw.stop()


# -- the SMTP sessions -----------------------------------------------------------------


@pytest.fixture
def gated_gateway(tmp_path, dovecot, monkeypatch):
    """A gateway whose group commit holds a message with GATED in its subject until the test
    writes "ok" into the gate (test_submission_disconnect's hook)."""
    gate = tmp_path / "commit-gate"
    os.mkfifo(gate)
    gw = start_hooked(tmp_path, dovecot, monkeypatch, SITECUSTOMIZE, {"MAILGATE_TEST_COMMIT_GATE": str(gate)})
    gw.gate = gate
    yield gw
    gw.stop()


def test_open_sessions_are_drained_at_the_stop(gated_gateway, sink):
    """Three sessions when the node stops: an idle one gets 421 at once; one in the middle of
    its message and one whose message is being committed each get their 250, then the 421;
    both messages are queued exactly once and relayed once after a restart."""
    gw = gated_gateway
    sink.clear()
    committing = client(gw)
    begin_data(committing)
    mark = len(gw.log_lines)
    committing.send(message("GATED quote Q-4", "q4@acme.test") + b".\r\n")
    gw.wait_for_log("TEST commit held ", after=mark)
    sending = client(gw)
    begin_data(sending)
    half = message("Quote Q-5", "q5@acme.test")
    sending.send(half[:40])
    idle = client(gw, login=False)

    sigterm(gw)
    assert idle.getreply() == (421, b"4.3.2 Service shutting down")  # at once: not after the others
    sending.send(half[40:] + b".\r\n")
    with open(gw.gate, "w") as gate:  # the commit held since before the stop goes through
        gate.write("ok")
    for conn in (committing, sending):
        code, text = conn.getreply()
        assert code == 250, text
        assert conn.getreply() == (421, b"4.3.2 Service shutting down")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        idle.noop()
    assert gw.stop() == 0
    assert "still busy" not in gw.log_text() and "did not end within" not in gw.log_text()
    for message_id in ("q4@acme.test", "q5@acme.test"):
        [row] = rows(message_id)
        assert row.state == "queued"

    gw.start()
    sink.wait_for(2, timeout=20)
    assert delivered(sink, "q4@acme.test") == 1 and delivered(sink, "q5@acme.test") == 1
