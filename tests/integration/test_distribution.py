"""Distribution against the real Dovecot: a shared mailbox fed through LMTP, the watcher
(IDLE) in a thread, every routing path, the reject list, APPEND delivery, idempotence.

Each test gets a fresh shared mailbox (a new Dovecot user) and a fresh database, so
tests do not see each other's mail.  No sleeps: waits poll a DB condition with a deadline.
"""

from __future__ import annotations

import email
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from imapclient import IMAPClient

from gateway import config as config_mod
from gateway import customers
from gateway.db import connect
from gateway.db.models import OutboundMessage, SentMessage, database
from gateway.directory import Directory
from gateway.distribute import manage
from gateway.distribute.imapconn import connector
from gateway.distribute.schema import DistDelivery, Distribution
from gateway.distribute.service import Runner
from gateway.spool import Spool
from tests.harness import wait_until

pytestmark = pytest.mark.integration

RULES = """\
groups:
  quotes:
    members: [alice@acme.test, bob@acme.test]
    pick: round-robin
rules:
  - name: germany
    priority: 10
    when:
      country: [de]
    to: carol@acme.test
  - name: quotations
    priority: 20
    when:
      keyword: [quotation, 报价]
    group: quotes
"""


def message(sender: str, subject: str, body: str = "Hello.", **headers: str) -> bytes:
    mid = f"<{secrets.token_hex(8)}@{sender.rpartition('@')[2]}>"
    lines = [f"From: Buyer <{sender}>", "To: sales@acme.test", f"Subject: {subject}", f"Message-ID: {mid}",
             "Date: Mon, 23 Nov 2026 10:00:00 +0000", "MIME-Version: 1.0",
             "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode()


def make_config(tmp: Path, dovecot, shared: str, **distribution: object) -> config_mod.Config:
    (tmp / "rules").mkdir(exist_ok=True)
    (tmp / "rules" / "inbound.yaml").write_text(RULES)
    data = {
        "node": {"name": "t", "data_dir": str(tmp / "var")},
        "database": {"url": "sqlite:///" + str(tmp / "var" / "db.sqlite")},
        "company": {"domains": ["acme.test"]},
        "upstream": {"host": dovecot.host, "imap_port": dovecot.imaps_port, "imap_security": "tls",
                     "submission_port": dovecot.submission_port, "ca_file": str(dovecot.cert_path)},
        "relay": {"username": "relay@acme.test", "password": "relay-pw"},
        "smtp": {"hostname": "gw.acme.test"},
        "distribution": {"enabled": True, "mailboxes": [shared], "master_user": "archiver",
                         "master_password": "archiver-pw", "rules_dir": str(tmp / "rules"), "initial": "all",
                         "poll_interval": 30.0, **distribution},
    }
    return config_mod.from_dict(data, base_dir=tmp)


class Env:
    def __init__(self, tmp: Path, dovecot, **distribution: object):
        self.dovecot = dovecot
        self.shared = f"shared-{secrets.token_hex(4)}@acme.test"
        dovecot.add_user(self.shared, "x-" + secrets.token_hex(6))
        self.cfg = make_config(tmp, dovecot, self.shared, **distribution)
        connect(self.cfg.database.url)
        self.alice = customers.create_employee("alice@acme.test", "Alice")
        self.bob = customers.create_employee("bob@acme.test", "Bob")
        self.carol = customers.create_employee("carol@acme.test", "Carol")
        customers.create_customer("Customer GmbH", contacts=["buyer@customer.example"], owners=[self.bob])
        customers.create_customer("Two Owners", domains=["twoowners.example"], owners=[self.alice, self.carol])
        self.directory = Directory(["acme.test"], self.cfg.public_mail_domains)
        self.directory.load()
        self.spool = Spool(self.cfg.spool_dir, node="t")
        self.wakes = 0
        self.runner: Runner | None = None

    def wake(self) -> None:
        self.wakes += 1

    def start(self) -> Runner:
        self.directory.load()
        self.runner = Runner(self.cfg, self.directory, self.spool, wake=self.wake)
        self.runner.start()
        wait_until(lambda: self.runner.watchers[0].sessions >= 1 and self.runner.watchers[0].idle, what="watching")
        return self.runner

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()
            self.runner = None

    def deliver(self, raw: bytes) -> None:
        self.dovecot.deliver(self.shared, raw)

    def record_for(self, raw: bytes) -> Distribution:
        mid = email.message_from_bytes(raw)["Message-ID"]
        return wait_until(lambda: Distribution.get_or_none(Distribution.message_id == mid), what=f"record of {mid}")

    def queued_to(self, rec: Distribution) -> list[str]:
        rows = (OutboundMessage.select(OutboundMessage.recipients).join(
            DistDelivery, on=(DistDelivery.queue_id == OutboundMessage.queue_id))
            .where(DistDelivery.distribution == rec))
        import json

        return sorted(a for row in rows for a in json.loads(row.recipients))

    def imap(self, user: str) -> IMAPClient:
        return connector(self.cfg)(user)


@pytest.fixture
def env(tmp_path: Path, dovecot) -> Iterator[Env]:
    e = Env(tmp_path, dovecot)
    yield e
    e.stop()
    database.close()


def test_every_routing_path(env: Env) -> None:
    SentMessage.create(message_id="<sent-1@acme.test>", employee=env.carol, company_address="sales@acme.test")
    manage.add_reject("spam.example", "test")
    manage.set_mapping("mapped.example", "alice@acme.test", "test")
    env.start()
    cases = {
        "reply": (message("x@unknown.example", "Re: offer", In_Reply_To="<sent-1@acme.test>"), ["carol@acme.test"]),
        "customer": (message("buyer@customer.example", "Order"), ["bob@acme.test"]),
        "owners": (message("someone@twoowners.example", "Hi"), ["alice@acme.test", "carol@acme.test"]),
        "mapping": (message("who@mapped.example", "Hello"), ["alice@acme.test"]),
        "country": (message("kunde@firma.de", "Anfrage"), ["carol@acme.test"]),
        "rr1": (message("a@shop.example", "Quotation please"), ["alice@acme.test"]),
        "rr2": (message("b@shop.example", "请报价"), ["bob@acme.test"]),
        "none": (message("c@nobody.example", "Just saying hi"), []),
        "public": (message("someone@gmail.com", "Question"), []),
        "reject": (message("bad@spam.example", "Buy now"), []),
    }
    for raw, _ in cases.values():
        env.deliver(raw)
    steps = {}
    for name, (raw, expected) in cases.items():
        rec = env.record_for(raw)
        steps[name] = (rec.step, rec.state)
        assert env.queued_to(rec) == expected, (name, rec.reason)
    assert steps == {
        "reply": ("reply", "distributed"), "customer": ("customer", "distributed"),
        "owners": ("customer", "distributed"), "mapping": ("mapping", "distributed"),
        "country": ("rule", "distributed"), "rr1": ("rule", "distributed"), "rr2": ("rule", "distributed"),
        "none": ("none", "undistributed"), "public": ("none", "undistributed"),
        "reject": ("reject", "rejected"),
    }
    # The forwarded copy: the original intact after Resent-* headers; Reply-To to the customer.
    rec = env.record_for(cases["customer"][0])
    delivery = DistDelivery.get(DistDelivery.distribution == rec)
    data = env.spool.path_for(delivery.queue_id).read_bytes()
    assert data.endswith(cases["customer"][0])
    fwd = email.message_from_bytes(data)
    assert fwd["Resent-From"] == env.shared and fwd["Resent-To"] == "bob@acme.test"
    assert fwd["From"] == "Buyer <buyer@customer.example>" and fwd["Reply-To"] == "buyer@customer.example"
    assert fwd["X-Mailgate-Distribution-Id"] == delivery.delivery_id
    queue_row = OutboundMessage.get(OutboundMessage.queue_id == delivery.queue_id)
    assert queue_row.mail_from == env.shared and queue_row.state == "queued"
    assert env.wakes >= 1
    # The shared copies: keyword on every handled one, the rejected one moved to Junk.
    wait_until(lambda: env.runner.watchers[0].sessions and _flagged(env) == 9, what="9 flagged")
    client = env.imap(env.shared)
    client.select_folder("INBOX", readonly=True)
    assert len(client.search(["KEYWORD", "$Undistributed"])) == 2
    client.select_folder("Junk", readonly=True)
    junk = client.fetch(client.search(["ALL"]), ["BODY.PEEK[HEADER.FIELDS (FROM)]"])
    assert [b"bad@spam.example" in v[b"BODY[HEADER.FIELDS (FROM)]"] for v in junk.values()] == [True]
    client.logout()


def _flagged(env: Env) -> int:
    client = env.imap(env.shared)
    try:
        client.select_folder("INBOX", readonly=True)
        return len(client.search(["KEYWORD", "$Distributed"]))
    finally:
        client.logout()


def test_restart_never_repeats_and_idle_wakes_without_polling(env: Env) -> None:
    env.start()
    first = message("buyer@customer.example", "First")
    env.deliver(first)
    rec = env.record_for(first)  # poll_interval is 30 s: only IDLE can have woken the watcher this fast
    assert env.runner.watchers[0].idle
    env.stop()
    # Simulate a crash after the commit, before the keyword: strip the keyword and roll the checkpoint back.
    client = env.imap(env.shared)
    client.select_folder("INBOX")
    client.remove_flags([rec.uid], ["$Distributed"])
    client.logout()
    from gateway.distribute.schema import DistCheckpoint

    DistCheckpoint.update(last_uid=0).execute()
    second = message("buyer@customer.example", "Second")
    env.deliver(second)
    env.start()
    env.record_for(second)
    wait_until(lambda: _flagged(env) == 2, what="both flagged")
    assert DistDelivery.select().count() == 2  # the first one was not sent again
    assert OutboundMessage.select().count() == 2
    assert Distribution.select().count() == 2


def test_append_delivery_is_idempotent(tmp_path: Path, dovecot) -> None:
    e = Env(tmp_path, dovecot, delivery="append")
    try:
        e.start()
        raw = message("buyer@customer.example", "Append me " + secrets.token_hex(3))
        e.deliver(raw)
        rec = e.record_for(raw)
        delivery = wait_until(lambda: DistDelivery.get_or_none((DistDelivery.distribution == rec)
                                                               & (DistDelivery.state == "appended")), what="appended")
        bob = e.imap("bob@acme.test")
        bob.select_folder("INBOX", readonly=True)
        found = bob.search(["HEADER", "X-Mailgate-Distribution-Id", delivery.delivery_id])
        assert len(found) == 1
        body = bob.fetch(found, ["BODY.PEEK[]"])[found[0]][b"BODY[]"]
        assert body.endswith(raw.replace(b"\r\n", b"\n")) or body.endswith(raw)
        bob.logout()
        e.stop()
        # A crash between APPEND and marking the row: the restart finds the copy and appends nothing.
        DistDelivery.update(state="pending").where(DistDelivery.id == delivery.id).execute()
        e.start()
        wait_until(lambda: DistDelivery.get_by_id(delivery.id).state == "appended", what="re-marked")
        bob = e.imap("bob@acme.test")
        bob.select_folder("INBOX", readonly=True)
        assert len(bob.search(["HEADER", "X-Mailgate-Distribution-Id", delivery.delivery_id])) == 1
        bob.logout()
        assert OutboundMessage.select().count() == 0
    finally:
        e.stop()
        database.close()


def test_manual_dispatch_mapping_and_customer(env: Env) -> None:
    env.start()
    raw = message("lead@newco.example", "Inquiry about pumps")
    env.deliver(raw)
    rec = env.record_for(raw)
    assert rec.state == "undistributed"
    manage.dispatch(env.cfg, rec.id, "alice@acme.test", "manager@acme.test", "pumps are hers")
    rec = Distribution.get_by_id(rec.id)
    assert rec.state == "distributed" and rec.step == "manual" and rec.actor == "manager@acme.test"
    assert env.queued_to(rec) == ["alice@acme.test"]
    with pytest.raises(Exception, match="not undistributed"):
        manage.dispatch(env.cfg, rec.id, "bob@acme.test", "manager@acme.test")
    client = env.imap(env.shared)
    client.select_folder("INBOX", readonly=True)
    assert client.search(["KEYWORD", "$Undistributed"]) == []
    client.logout()
    # 'always send this domain to bob', then a customer from another message.
    manage.set_mapping("newco.example", "bob@acme.test", "manager@acme.test")
    again = message("other@newco.example", "More pumps")
    env.deliver(again)
    assert env.queued_to(env.record_for(again)) == ["bob@acme.test"]
    raw3 = message("ceo@bigbuyer.example", "Hello there")
    env.deliver(raw3)
    rec3 = env.record_for(raw3)
    customer = manage.create_customer_from(env.cfg, rec3.id, "Big Buyer", "carol@acme.test", "manager@acme.test")
    assert {c.email for c in customer.contacts} == {"ceo@bigbuyer.example"}
    from gateway import oplog

    actions = [r.action for r in oplog.search(actor="manager@acme.test", limit=10)[0]]
    assert {"distribution.dispatch", "distribution.mapping.set", "distribution.customer.create"} <= set(actions)
    assert oplog.verify() == []


def test_survives_throttling_and_dropped_connections(tmp_path: Path, dovecot) -> None:
    e = Env(tmp_path, dovecot, reconnect_initial=0.05, reconnect_max=0.2)
    real = connector(e.cfg)
    refusals = {"left": 2}

    def throttled(login: str) -> IMAPClient:
        if refusals["left"]:
            refusals["left"] -= 1
            raise IMAPClient.Error("[LIMIT] too many connections, try again later")
        return real(login)

    try:
        e.directory.load()
        e.runner = Runner(e.cfg, e.directory, e.spool, wake=e.wake, connect=throttled)
        e.runner.start()
        watcher = e.runner.watchers[0]
        wait_until(lambda: watcher.sessions >= 1 and watcher.idle, what="watching after two refusals")
        assert refusals["left"] == 0 and "LIMIT" in watcher.last_error
        first = message("buyer@customer.example", "Before the drop")
        e.deliver(first)
        e.record_for(first)
        # the connection breaks under the watcher (as a server restart or a NAT timeout would)
        watcher.client.shutdown()
        wait_until(lambda: watcher.sessions >= 2 and watcher.idle, what="a new session")
        second = message("buyer@customer.example", "After the drop")
        e.deliver(second)
        assert e.queued_to(e.record_for(second)) == ["bob@acme.test"]
        assert Distribution.select().count() == 2 and DistDelivery.select().count() == 2
    finally:
        e.stop()
        database.close()
