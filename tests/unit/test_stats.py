"""panel/stats.py: dashboard numbers from the gateway tables, scoped (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest

from gateway.customers import create_customer, create_department, create_employee
from gateway.db.models import Approval, ArchiveRecord, Customer
from panel import stats
from tests.harness.pgdb import fresh_database

SEQ = itertools.count()
NOW = dt.datetime(2026, 11, 20, 1, 30)  # 09:30 in UTC+8


def archive(emp, when, direction="outbound", verdict="accepted", subject="s", reason=""):
    return ArchiveRecord.create(created_at=when, direction=direction, sha256=f"{next(SEQ):064x}", blob_path="x", size=1,
                                employee=emp, verdict=verdict, subject=subject, reason=reason,
                                mail_from=emp.email if emp else "", recipients='["x@example.com"]')


def approval(emp, state, decided_at=None, queue="q"):
    return Approval.create(queue_id=f"{queue}{Approval.select().count()}", employee=emp, mail_from=emp.email,
                           state=state, expires_at=NOW + dt.timedelta(days=1), decided_at=decided_at)


def world():
    sales, other = create_department("Sales"), create_department("Export")
    carol = create_employee("carol@acme.test", "Carol", sales, roles=("dept_head",))
    alice = create_employee("alice@acme.test", "Alice", sales, manager=carol)
    bob = create_employee("bob@acme.test", "Bob", sales, manager=carol)
    dave = create_employee("dave@acme.test", "Dave", other)
    day0 = NOW - dt.timedelta(hours=1)  # local 2026-11-20 08:30
    yesterday = NOW - dt.timedelta(days=1)
    for _ in range(3):
        archive(alice, day0)
    archive(alice, yesterday)
    archive(alice, day0, direction="inbound", verdict="accepted")
    archive(alice, day0, verdict="refused", subject="to a colleague's customer", reason="send-conflict")
    archive(alice, day0, verdict="held")
    archive(bob, day0)
    archive(dave, day0)
    archive(dave, day0, verdict="refused")
    archive(None, day0)  # a notice, no employee
    archive(alice, NOW - dt.timedelta(days=40))  # outside the window
    # local-day boundary: 2026-11-19 15:59 UTC is 23:59 on the 19th in UTC+8; 16:01 is the 20th
    archive(bob, dt.datetime(2026, 11, 19, 15, 59))
    archive(bob, dt.datetime(2026, 11, 19, 16, 1))
    approval(alice, "approved", decided_at=day0)
    approval(alice, "pending")
    approval(dave, "pending")
    approval(bob, "rejected", decided_at=day0)
    hamburg = create_customer("Hamburg", domains=["hamburg.de"], owners=[alice])
    lagos = create_customer("Lagos", domains=["lagos.ng"], owners=[bob])
    create_customer("Lima", domains=["lima.pe"], owners=[dave])
    fresh = create_customer("Fresh", domains=["fresh.de"], owners=[alice])
    create_customer("Pool", domains=["pool.pe"], owners=[])
    Customer.update(last_contact_at=NOW - dt.timedelta(days=45)).where(Customer.id == hamburg.id).execute()
    Customer.update(last_contact_at=NOW - dt.timedelta(days=2)).where(Customer.id == lagos.id).execute()
    Customer.update(created_at=NOW - dt.timedelta(days=100)).execute()
    Customer.update(last_contact_at=NOW).where(Customer.id == fresh.id).execute()
    return carol, alice, bob, dave


def check_world(carol, alice, bob, dave):
    s = stats.summary({carol.id, alice.id, bob.id}, days=7, stale_days=30, now=NOW, utc_offset_minutes=480)
    assert s.days[-1] == dt.date(2026, 11, 20) and len(s.days) == 7
    person = {p.email: p for p in s.people}
    assert set(person) == {"carol@acme.test", "alice@acme.test", "bob@acme.test"}  # Dave is out of scope
    a = person["alice@acme.test"]
    # 3 accepted today + 1 approved today; 1 yesterday; the 40-day-old one is outside the window
    assert a.by_day[dt.date(2026, 11, 20)].sent == 4
    assert a.by_day[dt.date(2026, 11, 19)].sent == 1
    assert (a.total.sent, a.total.received, a.total.blocked, a.total.held) == (5, 1, 1, 1)
    b = person["bob@acme.test"]
    assert b.by_day[dt.date(2026, 11, 19)].sent == 1 and b.by_day[dt.date(2026, 11, 20)].sent == 2
    assert s.total.sent == 8 and s.total.blocked == 1
    assert s.pending_approvals == 1
    assert [c.name for c in s.stale_customers] == ["Hamburg"]
    assert s.stale_customers[0].owners == ["Alice"] and s.stale_customers[0].days_since == 45
    assert [b.subject for b in s.recent_blocked] == ["to a colleague's customer"]

    everyone = stats.summary(None, days=7, now=NOW, utc_offset_minutes=480)
    assert everyone.pending_approvals == 2 and everyone.total.blocked == 2
    assert everyone.total.sent == 10  # Dave's and the employee-less notice count too
    assert {c.name for c in everyone.stale_customers} == {"Hamburg", "Lima"}  # never the public pool

    own = stats.summary({alice.id}, days=7, now=NOW, utc_offset_minutes=480)
    assert [p.email for p in own.people] == ["alice@acme.test"] and own.pending_approvals == 1

    nobody = stats.summary(set(), days=7, now=NOW, utc_offset_minutes=480)
    assert nobody.people == [] and nobody.total.sent == 0 and nobody.stale_customers == []

    utc = stats.summary({bob.id}, days=7, now=NOW, utc_offset_minutes=0)
    assert utc.people[0].by_day[dt.date(2026, 11, 19)].sent == 2  # both on the 19th in UTC


def test_summary_on_sqlite(db):
    check_world(*world())


def test_window_is_bounded(db):
    s = stats.summary(None, days=100000, now=NOW, utc_offset_minutes=0)
    assert len(s.days) == stats.MAX_DAYS
    assert len(stats.summary(None, days=0, now=NOW, utc_offset_minutes=0).days) == 1


@pytest.mark.integration
def test_summary_on_postgres(postgres):
    with fresh_database(postgres, "t_panel_stats"):
        check_world(*world())
