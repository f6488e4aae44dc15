"""Claiming queue rows: exactly once under concurrency, expired claims come back, backoff."""

from __future__ import annotations

import datetime as dt
import threading

from gateway.db.models import OutboundMessage, database, utcnow
from gateway.relay import backoff, claim_batch, release
from tests.harness.pgdb import fresh_database


def make_rows(count: int, **fields) -> list[int]:
    rows = [
        dict(queue_id=f"Q{i:06d}", mail_from="alice@acme.test", recipients='["b@x.test"]',
             spool_path=f"Q{i:06d}.eml", size=10, **fields)
        for i in range(count)
    ]
    with database.atomic():
        OutboundMessage.insert_many(rows).execute()
    return [r.id for r in OutboundMessage.select(OutboundMessage.id)]


def test_two_workers_racing_claim_each_row_exactly_once(db):
    race_two_workers()


def test_racing_on_postgresql_too(postgres):
    on_postgresql(postgres, "relay_claim_race", race_two_workers)


def on_postgresql(postgres, name: str, check) -> None:
    """Run ``check`` against a fresh PostgreSQL database ``name``."""
    with fresh_database(postgres, name):
        check()


def race_two_workers() -> None:
    make_rows(200)
    now = utcnow()
    claimed: dict[str, list[int]] = {"w1": [], "w2": []}
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            start.wait()
            while rows := claim_batch(name, now, 600, limit=7):
                claimed[name] += [row.id for row in rows]
                assert all(row.claimed_by == name for row in rows)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            database.close()

    threads = [threading.Thread(target=worker, args=(name,)) for name in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    every = claimed["w1"] + claimed["w2"]
    assert len(every) == 200 and len(set(every)) == 200
    owners = {row.id: row.claimed_by for row in OutboundMessage.select()}
    assert all(owners[i] == "w1" for i in claimed["w1"])
    assert all(owners[i] == "w2" for i in claimed["w2"])


def test_claimed_rows_are_not_claimed_again_until_the_claim_expires(db):
    make_rows(3)
    now = utcnow()
    assert len(claim_batch("w1", now, 600)) == 3
    assert claim_batch("w2", now + dt.timedelta(seconds=599), 600) == []
    # w1 died: after claim_timeout the rows are due again.
    again = claim_batch("w2", now + dt.timedelta(seconds=601), 600)
    assert len(again) == 3 and {r.claimed_by for r in again} == {"w2"}


def test_only_due_queued_rows_are_claimed(db):
    make_rows(1)
    now = utcnow()
    OutboundMessage.create(queue_id="LATER", mail_from="a@acme.test", recipients="[]", spool_path="x",
                           size=1, next_attempt_at=now + dt.timedelta(minutes=5))
    OutboundMessage.create(queue_id="HELD", mail_from="a@acme.test", recipients="[]", spool_path="y",
                           size=1, state="held")
    OutboundMessage.create(queue_id="SENT", mail_from="a@acme.test", recipients="[]", spool_path="z",
                           size=1, state="sent")
    assert [r.queue_id for r in claim_batch("w1", now, 600)] == ["Q000000"]
    later = claim_batch("w1", now + dt.timedelta(minutes=6), 600)
    assert [r.queue_id for r in later] == ["LATER"]


def test_oldest_due_first_and_limit(db):
    ids = make_rows(5)
    now = utcnow()
    OutboundMessage.update(next_attempt_at=now - dt.timedelta(hours=1)).where(OutboundMessage.id == ids[4]).execute()
    rows = claim_batch("w1", now, 600, limit=2)
    assert [r.id for r in rows] == [ids[4], ids[0]]


def test_release_gives_rows_back_to_others_only_if_still_ours(db):
    ids = make_rows(2)
    now = utcnow()
    claim_batch("w1", now, 600)
    assert release(ids, "w2") == 0
    assert release([ids[0]], "w1") == 1
    assert [r.id for r in claim_batch("w2", now, 600)] == [ids[0]]


def test_backoff_doubles_up_to_the_maximum():
    schedule = [backoff(n, 60, 3600) for n in range(1, 9)]
    assert schedule == [60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert backoff(0, 60, 3600) == 0
    assert backoff(500, 60, 3600) == 3600  # no overflow on huge attempt counts


def next_due_checks() -> None:
    """relayqueue.next_due: the earliest queued row that nobody holds, as a datetime."""
    from gateway.relayqueue import next_due

    now = utcnow().replace(microsecond=0)
    assert next_due(now) is None
    [soon, later, held, sent] = make_rows(4)
    m = OutboundMessage
    m.update(next_attempt_at=now + dt.timedelta(seconds=30)).where(m.id == soon).execute()
    m.update(next_attempt_at=now + dt.timedelta(seconds=90)).where(m.id == later).execute()
    m.update(next_attempt_at=now - dt.timedelta(seconds=5), claimed_by="w",
             claimed_until=now + dt.timedelta(seconds=60)).where(m.id == held).execute()
    m.update(next_attempt_at=now - dt.timedelta(seconds=9), state="sent").where(m.id == sent).execute()
    assert next_due(now) == now + dt.timedelta(seconds=30)
    # The held row's claim expires: it is due again (and the earliest).
    assert next_due(now + dt.timedelta(seconds=61)) == now - dt.timedelta(seconds=5)


def test_next_due(db):
    next_due_checks()


def test_next_due_on_postgresql_too(postgres):
    on_postgresql(postgres, "relay_next_due", next_due_checks)


def test_finish_many_records_only_the_rows_still_claimed_by_their_worker(db):
    from gateway.relayqueue import finish_many

    ids = make_rows(3)
    now = utcnow()
    mine = claim_batch("node/w1", now, claim_timeout=60, limit=3)
    assert sorted(r.id for r in mine) == ids
    # Row 2's claim expired and another worker took it meanwhile.
    OutboundMessage.update(claimed_by="node/w2").where(OutboundMessage.id == ids[1]).execute()
    m = OutboundMessage
    sent = {m.state: "sent", m.done_at: now, m.claimed_by: None, m.claimed_until: None}
    later = {m.next_attempt_at: now + dt.timedelta(minutes=5), m.attempts: 1, m.claimed_by: None,
             m.claimed_until: None}
    with database.atomic("IMMEDIATE"):
        stored = finish_many([(ids[0], "node/w1", sent), (ids[1], "node/w1", sent), (ids[2], "node/w1", later)])
    assert stored == [True, False, True]
    rows = {r.id: r for r in OutboundMessage.select()}
    assert rows[ids[0]].state == "sent" and rows[ids[0]].claimed_by is None
    assert rows[ids[1]].state == "queued" and rows[ids[1]].claimed_by == "node/w2"  # untouched
    assert rows[ids[2]].state == "queued" and rows[ids[2]].attempts == 1 and rows[ids[2]].claimed_by is None
