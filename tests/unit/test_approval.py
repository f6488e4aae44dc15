"""Approval: hold -> approve | reject | expire, approvers, notices, link tokens."""

from __future__ import annotations

import datetime as dt
import json
from email.parser import BytesHeaderParser
from types import SimpleNamespace

import pytest

from gateway.approval import (
    ApprovalError,
    ApprovalService,
    consume_token,
    describe,
    list_approvals,
    make_token,
    verify_token,
)
from gateway.config import PUBLIC_MAIL_DOMAINS, Config
from gateway.db import connect
from gateway.db.models import Approval, Department, Employee, OutboundMessage
from gateway.directory import Directory
from gateway.dkim import DkimSigner, load_keys
from gateway.keys import make_dkim_keys
from gateway.mutate import apply_mutations
from gateway.policy import Policy
from gateway.policy.context import Context
from gateway.rules.loader import load_rules
from gateway.spool import Spool

RULES = """
rules:
  - name: hold-new-markets
    conditions:
      recipient-domain: new.example
    actions:
      - hold_for_approval: {approvers: [manager, department_head], reason: new market}
      - prepend_subject: "[EXT] "
"""

RAW = (b"From: Alice <alice@acme.test>\r\nTo: buyer@new.example\r\nSubject: Offer\r\n"
       b"Message-ID: <q1@acme.test>\r\n\r\nPrices inside.\r\n")


@pytest.fixture
def env(tmp_path):
    connect("sqlite:///" + str(tmp_path / "t.db"))
    sales = Department.create(name="Sales")
    boss = Employee.create(email="boss@acme.test", name="Boss", department=sales, roles="dept_head")
    bob = Employee.create(email="bob@acme.test", name="Bob", department=sales, manager=boss)
    alice = Employee.create(email="alice@acme.test", name="Alice", department=sales, manager=bob)
    sales.head_id = boss.id
    sales.save()
    directory = Directory(["acme.test"], PUBLIC_MAIL_DOMAINS)
    directory.load()
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "10.yaml").write_text(RULES)
    rules, errors = load_rules(tmp_path / "rules")
    assert not errors
    policy = Policy(directory, rules)
    cfg = Config()
    cfg.approval.key_file = tmp_path / "approval.key"
    cfg.company.language = "en"
    records = make_dkim_keys(tmp_path, "s", "acme.test")
    signer = DkimSigner({"acme.test": load_keys(tmp_path, "s", ["rsa"])})
    spool = Spool(tmp_path / "spool")
    clock = SimpleNamespace(now=dt.datetime(2025, 3, 5, 10, 0))
    released = []
    service = ApprovalService(cfg, directory, spool, policy=policy, signer=signer, clock=lambda: clock.now,
                              on_released=lambda: released.append(1))
    return SimpleNamespace(service=service, policy=policy, spool=spool, directory=directory, clock=clock,
                           alice=alice, bob=bob, boss=boss, records=records, released=released)


def submit(env, raw=RAW, queue_id="Q1"):
    """What the SMTP handler does for a HOLD verdict, plus the record_hold call."""
    end = raw.find(b"\r\n\r\n")
    ctx = Context("alice@acme.test", ["buyer@new.example"],
                  BytesHeaderParser().parsebytes(raw[: end + 2]), raw,
                  env.directory.employee_for_address("alice@acme.test"))
    verdict = env.policy.decide(ctx)
    assert verdict.action == "hold"
    out = apply_mutations(ctx, verdict, env.service.cfg)
    env.spool.enqueue(out.mail_from, out.recipients, out.data, state="held", queue_id=queue_id)
    return env.service.record_hold(ctx, verdict, queue_id)


def notices(exclude="Q1"):
    rows = OutboundMessage.select().where(OutboundMessage.queue_id != exclude)
    return {json.loads(r.recipients)[0]: r for r in rows}


def test_hold_records_approvers_and_notifies(env):
    a = submit(env)
    assert a.state == "pending" and json.loads(a.approvers) == ["bob@acme.test", "boss@acme.test"]
    assert a.expires_at == env.clock.now + dt.timedelta(hours=72)
    sent = notices()
    assert set(sent) == {"bob@acme.test", "boss@acme.test", "alice@acme.test"}
    request = env.spool.read(sent["bob@acme.test"]).decode()
    assert "/approve?t=" in request and "/reject?t=" in request and "new market" in request
    assert "Held for approval" in env.spool.read(sent["alice@acme.test"]).decode()
    assert OutboundMessage.get(OutboundMessage.queue_id == "Q1").state == "held"
    assert [x.id for x in list_approvals()] == [a.id]
    assert "hold-new-markets" in describe(a.id)


def test_approve_continues_marked_approved_and_signs(env):
    import dkim

    a = submit(env)
    env.service.approve(a.id, actor="bob@acme.test")
    row = OutboundMessage.get(OutboundMessage.queue_id == "Q1")
    assert row.state == "queued" and env.released
    data = env.spool.read(row)
    assert b"Subject: [EXT] Offer" in data and data.count(b"[EXT]") == 1
    dnsfunc = lambda name, timeout=5: env.records["rsa"].encode()  # noqa: E731
    assert dkim.verify(data, dnsfunc=dnsfunc)
    assert Approval.get_by_id(a.id).state == "approved"
    assert not (env.spool.directory / "Q1.orig.eml").exists()
    with pytest.raises(ApprovalError, match="already approved"):
        env.service.approve(a.id, actor="boss@acme.test")


def test_reject_tells_the_sender_why(env):
    a = submit(env)
    env.service.reject(a.id, actor="bob@acme.test", reason="wrong price list")
    assert Approval.get_by_id(a.id).state == "rejected"
    row = OutboundMessage.get(OutboundMessage.queue_id == "Q1")
    assert row.state == "rejected" and not (env.spool.directory / row.spool_path).exists()
    texts = [env.spool.read(r).decode() for r in OutboundMessage.select()
             if (env.spool.directory / r.spool_path).exists()]
    notice = [t for t in texts if "Not approved" in t]
    assert len(notice) == 1 and "wrong price list" in notice[0]


def test_expiry(env):
    a = submit(env)
    env.clock.now += dt.timedelta(hours=71)
    assert env.service.expire_due() == 0
    env.clock.now += dt.timedelta(hours=2)
    assert env.service.expire_due() == 1
    assert Approval.get_by_id(a.id).state == "expired"
    assert OutboundMessage.get(OutboundMessage.queue_id == "Q1").state == "expired"
    texts = [env.spool.read(r).decode() for r in OutboundMessage.select()
             if (env.spool.directory / r.spool_path).exists()]
    assert any("Approval expired" in t for t in texts)
    with pytest.raises(ApprovalError):
        env.service.approve(a.id, actor="bob@acme.test")


def test_tokens_are_signed_expiring_single_use(env):
    key = b"k" * 32
    token = make_token(key, 7, "approve", expires=1000)
    claims = verify_token(key, token, now=999)
    assert (claims.approval_id, claims.action) == (7, "approve")
    with pytest.raises(ApprovalError, match="expired"):
        verify_token(key, token, now=1001)
    with pytest.raises(ApprovalError, match="invalid"):
        verify_token(b"x" * 32, token, now=0)
    forged = make_token(b"x" * 32, 7, "approve", 1000).split(".")[0] + "." + token.split(".")[1]
    with pytest.raises(ApprovalError):
        verify_token(key, forged, now=0)
    with pytest.raises(ApprovalError):
        verify_token(key, "garbage", now=0)
    consume_token(claims)
    with pytest.raises(ApprovalError, match="already used"):
        consume_token(claims)


def test_link_approves_once(env):
    a = submit(env)
    links = env.service.links(a)
    token = links["approve"].split("?t=")[1]
    assert env.service.cfg.approval.link_base_url in links["approve"]
    env.service.act_on_token(token, actor="bob@acme.test")
    assert Approval.get_by_id(a.id).state == "approved"
    with pytest.raises(ApprovalError):
        env.service.act_on_token(token)


def test_reject_link(env):
    a = submit(env)
    token = env.service.links(a)["reject"].split("?t=")[1]
    env.service.act_on_token(token, actor="boss@acme.test", reason="no")
    assert Approval.get_by_id(a.id).state == "rejected"


def test_role_and_named_approvers(env):
    from gateway.rules.parties import resolve_parties

    sender = env.directory.employee_for_address("alice@acme.test")
    resolved, problems = resolve_parties(["role:dept_head", "employee:bob@acme.test", "ext@partner.example"],
                                         sender, env.directory)
    assert [getattr(r, "email", r) for r in resolved] == ["boss@acme.test", "bob@acme.test", "ext@partner.example"]
    resolved, problems = resolve_parties(["role:auditor", "manager"], None, env.directory)
    assert resolved == [] and len(problems) == 2


def test_every_decision_is_in_the_operation_log(env):
    from gateway import oplog

    a = submit(env)
    env.service.reject(a.id, actor="bob@acme.test", reason="wrong price list")
    rows, total = oplog.search(action="approval.")
    assert total == 1 and rows[0].actor == "bob@acme.test" and rows[0].action == "approval.rejected"
    assert rows[0].target == f"approval:{a.id}" and "wrong price list" in rows[0].details
    assert oplog.verify() == []
