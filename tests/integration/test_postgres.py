"""The DB layer and the queue on a real PostgreSQL: scale-out is a config change."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from gateway import customers
from gateway.config import PUBLIC_MAIL_DOMAINS
from gateway.db.migrations import current_version, latest_version, upgrade
from gateway.db.models import OutboundMessage
from gateway.directory import COLLEAGUE, OWN, Directory
from gateway.relay import claim_batch
from gateway.spool import Spool
from tests.harness.pgdb import pg_db

pytestmark = pytest.mark.integration


pg = pg_db("t_", name="pg")


def test_migrations_are_versioned_and_idempotent(pg):
    assert current_version(pg) == latest_version()
    assert upgrade(pg) == []


def test_directory_on_postgres(pg):
    alice = customers.create_employee("alice@acme.test", "Alice")
    bob = customers.create_employee("bob@acme.test", "Bob")
    customers.create_customer("Hamburg", domains=["hamburg.de"], owners=[alice])
    d = Directory(["acme.test"], PUBLIC_MAIL_DOMAINS)
    d.load()
    assert d.relationship("x@hamburg.de", alice.id) == OWN
    assert d.relationship("x@hamburg.de", bob.id) == COLLEAGUE
    customers.create_customer("Lagos", contacts=["l@gmail.com"], owners=[bob], public_domains=PUBLIC_MAIL_DOMAINS)
    d.refresh()
    assert d.relationship("l@gmail.com", alice.id) == COLLEAGUE


def test_spool_and_concurrent_claims_on_postgres(pg, tmp_path):
    spool = Spool(tmp_path / "spool")
    for i in range(120):
        spool.enqueue("a@acme.test", [f"r{i}@x.example"], b"Subject: x\r\n\r\nbody\r\n")
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(seconds=1)
    claimed: dict[str, list[int]] = {}
    barrier = threading.Barrier(4)

    def worker(name: str) -> None:
        mine = claimed.setdefault(name, [])
        barrier.wait()
        while rows := claim_batch(name, now, 600, limit=7):
            mine.extend(r.id for r in rows)
        pg.close()

    threads = [threading.Thread(target=worker, args=(f"node{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_ids = [i for ids in claimed.values() for i in ids]
    assert len(all_ids) == 120 and len(set(all_ids)) == 120  # each exactly once
    assert OutboundMessage.select().where(OutboundMessage.claimed_by.is_null()).count() == 0
