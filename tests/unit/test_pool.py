"""The public pool's automatic return (panel/pool.py): rules, exemptions, the clock, config checks."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import pytest

from gateway.config import PUBLIC_MAIL_DOMAINS
from gateway.customers import claim, create_department, create_employee, new_customer, record_contact, transfer
from gateway.db.models import AuditLog, Customer
from panel.pool import PoolRules, check_rules, due, last_sweep, run_daily, sweep
from panel.settings import PanelConfig

NOW = dt.datetime(2026, 11, 30, 12, 0)


@pytest.fixture
def people(db):
    dept = create_department("Sales")
    return create_employee("a@acme.test", "A", dept), create_employee("b@acme.test", "B", dept)


def customer(name: str, owner, *, assigned_days_ago: int | None, contact_days_ago: int | None,  # noqa: ANN001
             stage: str = "lead", created_days_ago: int = 400) -> Customer:
    c = new_customer(name, contacts=[f"x@{name.lower()}.example"], owners=[owner] if owner else [],
                     public_domains=PUBLIC_MAIL_DOMAINS, stage=stage)
    Customer.update(
        created_at=NOW - dt.timedelta(days=created_days_ago),
        assigned_at=None if assigned_days_ago is None else NOW - dt.timedelta(days=assigned_days_ago),
        last_contact_at=None if contact_days_ago is None else NOW - dt.timedelta(days=contact_days_ago),
    ).where(Customer.id == c.id).execute()
    return Customer.get_by_id(c.id)


def test_off_unless_enabled(people) -> None:
    a, _ = people
    customer("old", a, assigned_days_ago=300, contact_days_ago=300)
    assert due(PoolRules(enabled=False, days_without_contact=30), NOW) == []
    assert due(PoolRules(enabled=True), NOW) == []  # enabled without any rule does nothing
    assert sweep(PoolRules(enabled=False, days_without_contact=30), NOW) == 0
    assert Customer.get(Customer.name == "old").pool == "owned"


def test_days_without_contact(people) -> None:
    a, _ = people
    stale = customer("stale", a, assigned_days_ago=100, contact_days_ago=40)
    fresh = customer("fresh", a, assigned_days_ago=100, contact_days_ago=5)
    just_assigned = customer("newowner", a, assigned_days_ago=3, contact_days_ago=90)  # new owner gets N days
    never = customer("never", a, assigned_days_ago=45, contact_days_ago=None)
    won = customer("won", a, assigned_days_ago=100, contact_days_ago=100, stage="won")
    rules = PoolRules(enabled=True, days_without_contact=30, exempt_stages=("won",))
    ids = [cid for cid, _ in due(rules, NOW)]
    assert ids == sorted([stale.id, never.id])
    assert fresh.id not in ids and just_assigned.id not in ids and won.id not in ids
    assert sweep(rules, NOW) == 2
    for c in (stale, never):
        row = Customer.get_by_id(c.id)
        assert row.pool == "public" and row.assigned_at is None and list(row.ownerships) == []
        assert row.pool_reason == "auto: no mail contact for 30 days"
    assert Customer.get_by_id(won.id).pool == "owned"
    entries = list(AuditLog.select().where(AuditLog.action == "pool.auto_return").order_by(AuditLog.id))
    assert [e.actor for e in entries] == ["system", "system"]
    assert json.loads(entries[0].details)["owners"] == [a.id]
    assert last_sweep() == (NOW, 2)
    assert sweep(rules, NOW) == 0  # idempotent
    assert last_sweep() == (NOW, 0)


def test_days_after_assignment(people) -> None:
    a, b = people
    untouched = customer("untouched", a, assigned_days_ago=20, contact_days_ago=None)
    old_contact = customer("oldcontact", a, assigned_days_ago=20, contact_days_ago=25)  # contact before assignment
    followed = customer("followed", a, assigned_days_ago=20, contact_days_ago=10)
    recent = customer("recent", a, assigned_days_ago=5, contact_days_ago=None)
    rules = PoolRules(enabled=True, days_after_assignment=14, exempt_stages=())
    ids = {cid for cid, _ in due(rules, NOW)}
    assert ids == {untouched.id, old_contact.id}
    assert followed.id not in ids and recent.id not in ids
    # a transfer restarts the clock
    transfer(Customer.get_by_id(untouched.id), b)
    assert untouched.id not in {cid for cid, _ in due(rules, dt.datetime.now(dt.UTC).replace(tzinfo=None))}


def test_mail_contact_keeps_a_customer(people) -> None:
    a, _ = people
    c = customer("mailed", a, assigned_days_ago=100, contact_days_ago=100)
    rules = PoolRules(enabled=True, days_without_contact=30)
    assert [cid for cid, _ in due(rules, NOW)] == [c.id]
    assert record_contact(["X@Mailed.example"], NOW - dt.timedelta(days=1)) == 1
    assert due(rules, NOW) == []


def test_claimed_from_pool_then_returned_again(people) -> None:
    a, _ = people
    c = customer("cycle", None, assigned_days_ago=None, contact_days_ago=None)
    assert c.pool == "public"
    claim(c, a)
    rules = PoolRules(enabled=True, days_after_assignment=7)
    later = Customer.get_by_id(c.id).assigned_at + dt.timedelta(days=8)
    assert sweep(rules, later) == 1
    assert Customer.get_by_id(c.id).pool == "public"


def test_config_checks() -> None:
    assert check_rules(PanelConfig()) == []
    problems = check_rules(PanelConfig(pool_auto_return=True))
    assert problems and "pool_days_without_contact" in problems[0]
    assert check_rules(PanelConfig(pool_days_without_contact=-1))
    assert "bogus" in check_rules(PanelConfig(pool_exempt_stages=["won", "bogus"]))[0]
    rules = PoolRules.from_config(PanelConfig(pool_auto_return=True, pool_days_without_contact=9))
    assert rules.active and rules.days_without_contact == 9 and rules.exempt_stages == ("won",)


def test_run_daily_sweeps_then_stops(people) -> None:
    a, _ = people
    customer("daily", a, assigned_days_ago=100, contact_days_ago=100)

    async def scenario() -> None:
        stopping = asyncio.Event()
        task = asyncio.create_task(run_daily(PoolRules(enabled=True, days_without_contact=30), stopping, 0.01))
        while Customer.get(Customer.name == "daily").pool != "public":
            await asyncio.sleep(0.01)
        stopping.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert last_sweep()[1] == 1


def test_cli_pool_sweep(tmp_path, capsys) -> None:
    from gateway.cli import main
    from gateway.db import connect

    db_path = tmp_path / "cli.db"
    base = ('[database]\nurl = "sqlite:///' + str(db_path) + '"\n'
            '[relay]\nmode = "relay_account"\nusername = "r@acme.test"\npassword = "x"\n')
    off = tmp_path / "off.toml"
    off.write_text(base)
    on = tmp_path / "on.toml"
    on.write_text(base + "[panel]\npool_auto_return = true\npool_days_without_contact = 30\n"
                  'pool_exempt_stages = ["won", "negotiating"]\n')
    bad = tmp_path / "bad.toml"
    bad.write_text(base + '[panel]\npool_exempt_stages = ["nope"]\n')
    db = connect("sqlite:///" + str(db_path))
    a = create_employee("a@acme.test", "A", create_department("Sales"))
    stale = customer("clistale", a, assigned_days_ago=100, contact_days_ago=100)
    kept = customer("clikept", a, assigned_days_ago=100, contact_days_ago=100, stage="negotiating")
    db.close()
    assert main(["-c", str(off), "panel", "pool-sweep"]) == 0
    assert "off" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["-c", str(bad), "panel", "pool-sweep"])
    assert "pool_exempt_stages" in capsys.readouterr().err
    assert main(["-c", str(on), "panel", "pool-sweep", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith(f"customer:{stale.id}\t")
    assert main(["-c", str(on), "panel", "pool-sweep"]) == 0
    assert "1 customers returned" in capsys.readouterr().out
    connect("sqlite:///" + str(db_path))
    assert Customer.get_by_id(stale.id).pool == "public" and Customer.get_by_id(kept.id).pool == "owned"


def test_service_hook_starts_and_stops_the_sweeper(db) -> None:
    from types import SimpleNamespace

    from gateway.config import Config
    from panel import service

    async def scenario(rules_on: bool) -> object:
        cfg = Config()
        cfg.panel = PanelConfig(enabled=False, pool_auto_return=rules_on, pool_days_without_contact=30)
        node = SimpleNamespace(cfg=cfg, stopping=asyncio.Event())
        stop = await service.start(node, None)
        tasks = [t.get_name() for t in asyncio.all_tasks()]
        if stop is not None:
            await stop()
        return stop, tasks

    stop, tasks = asyncio.run(scenario(True))
    assert stop is not None and "pool-sweep" in tasks
    stop, tasks = asyncio.run(scenario(False))
    assert stop is None and "pool-sweep" not in tasks
