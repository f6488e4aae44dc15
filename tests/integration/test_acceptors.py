"""Several processes accepting on the submission port (smtp.processes = 2): both take
connections, every message is archived, queued and relayed exactly once, and the
acceptor stops with the node."""

from __future__ import annotations

import json
import re
import smtplib
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage

import pytest

from gateway.db import connect
from gateway.db.models import OutboundMessage
from gateway.demo.sample_data import seed
from tests.harness import wait_until
from tests.harness.gateway import GatewayProcess

pytestmark = pytest.mark.integration

TOKEN = re.compile(rb"Subject: acceptors (\d+)")
COUNT = 60


@pytest.fixture
def gw(tmp_path, dovecot):
    gw = GatewayProcess(tmp_path / "gw", dovecot,
                        {"smtp": {"processes": 2, "trusted_networks": ["127.0.0.0/8"]}})
    connect(gw.db_url)
    seed()
    yield gw
    gw.stop()


def send_one(gw, n: int) -> str:
    """A connection per message, like Outlook: the kernel spreads them over both listeners."""
    msg = EmailMessage()
    msg["From"] = "alice@acme.test"
    msg["To"] = "buyer@unknown-buyer.com"
    msg["Subject"] = f"acceptors {n}"
    msg.set_content(f"message {n}")
    with smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30) as conn:
        conn.sendmail("alice@acme.test", ["buyer@unknown-buyer.com"], msg.as_bytes())
        return conn.noop()[1].decode()


def test_two_processes_accept_and_nothing_is_delivered_twice(gw, sink):
    gw.start()
    gw.wait_for_log("smtp acceptor 1 ready")
    sink.clear()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: send_one(gw, n), range(COUNT)))
    arrived: list[str] = []
    while len(arrived) < COUNT:
        sink.wait_for(len(arrived) + 1, timeout=60)
        arrived = [m.group(1).decode() for msg in sink.messages() if (m := TOKEN.search(msg.data))]
    assert sorted(arrived, key=int) == [str(n) for n in range(COUNT)]  # each once
    accepted = [line for line in gw.log_lines if "verdict=accept" in line]
    by_child = [line for line in accepted if "[acceptor1]" in line]
    assert len(accepted) == COUNT
    assert 0 < len(by_child) < COUNT, "both processes took connections"
    # The sink has them all; the relay's outcomes commit a moment later.
    wait_until(lambda: OutboundMessage.select().where(OutboundMessage.state == "sent").count() == COUNT,
               what="every queue row sent")
    rows = list(OutboundMessage.select())
    assert len(rows) == COUNT and {r.state for r in rows} == {"sent"}
    assert all(r.spool_path.startswith("archive:") for r in rows)
    from gateway.archive.schema import ArchiveSighting

    submitted = ArchiveSighting.select().where(ArchiveSighting.place == "smtp:submitted").count()
    relayed = [json.loads(s.recipients) for s in ArchiveSighting.select().where(ArchiveSighting.place == "relay:sent")]
    assert submitted == COUNT and relayed == [["buyer@unknown-buyer.com"]] * COUNT
    assert gw.stop() == 0
    assert any("smtp acceptor 1 stopped" in line for line in gw.log_lines)


def test_on_uvloop_the_node_and_its_acceptor_take_starttls_logins_and_relay(tmp_path, dovecot, sink):
    """``[node] event_loop = "uvloop"``: the node, its acceptor and its relay process run on
    libuv's loop — aiosmtpd's STARTTLS (asyncio's SSL protocol over a uvloop transport), the
    upstream login check and the relay as on the standard loop."""
    import ssl

    gw = GatewayProcess(tmp_path / "gw", dovecot, {"node": {"event_loop": "uvloop"}, "smtp": {"processes": 2}})
    connect(gw.db_url)
    seed()
    try:
        gw.start()
        gw.wait_for_log("smtp acceptor 1 ready")
        sink.clear()
        tls = ssl.create_default_context(cafile=str(gw.cert_path))

        def send(n: int) -> None:
            msg = EmailMessage()
            msg["From"], msg["To"], msg["Subject"] = "alice@acme.test", "buyer@unknown-buyer.com", f"acceptors {n}"
            msg.set_content(f"message {n}")
            with smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30) as conn:
                conn.starttls(context=tls)
                conn.login("alice@acme.test", "alice-pw")
                conn.send_message(msg)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(send, range(12)))
        arrived: list[str] = []
        while len(arrived) < 12:
            sink.wait_for(len(arrived) + 1, timeout=60)
            arrived = [m.group(1).decode() for msg in sink.messages() if (m := TOKEN.search(msg.data))]
        assert sorted(arrived, key=int) == [str(n) for n in range(12)]
        assert {"node", "acceptor1"} <= {"acceptor1" if "[acceptor1]" in line else "node"
                                         for line in gw.log_lines if "verdict=accept" in line}
    finally:
        gw.stop()
