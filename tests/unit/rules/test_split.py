"""approval.split_recipients: who waits for approval and who receives at once."""

from __future__ import annotations

from gateway.policy.split import split_hold
from tests.unit.rules.test_trace import policy_for

HOLD_FR = """
rules:
  - name: hold-france
    priority: 40
    conditions:
      recipient-country: FR
    actions:
      - hold_for_approval: {approvers: [manager], reason: France}
      - add_header: {name: X-Checked, value: "yes"}
  - name: hold-secret
    priority: 50
    conditions:
      subject-contains: SECRET
    actions:
      - hold_for_approval: {approvers: [manager], reason: secret}
"""


def test_recipients_not_held_alone_are_split_off(tmp_path, world, ctx_factory):
    policy = policy_for(tmp_path, world, HOLD_FR)
    ctx = ctx_factory(to=("buyer@own.example", "buyer@col.example", "x@new.example"))
    verdict = policy.decide(ctx)
    assert verdict.action == "hold"
    free, held = split_hold(policy, ctx, verdict)
    assert free.ctx.rcpt_tos == ["buyer@own.example", "x@new.example"] and free.verdict.action == "accept"
    assert held.ctx.rcpt_tos == ["buyer@col.example"] and held.verdict.action == "hold"
    assert held.verdict.reason == "France"
    # Each part's trace explains its own decision.
    assert any(s.rule == "hold-france" and s.hit for s in held.ctx.trace)
    assert all(not (s.rule == "hold-france" and s.hit) for s in free.ctx.trace)


def test_content_holds_hold_everyone(tmp_path, world, ctx_factory):
    policy = policy_for(tmp_path, world, HOLD_FR)
    ctx = ctx_factory(to=("buyer@own.example", "buyer@col.example"), subject="SECRET prices")
    verdict = policy.decide(ctx)
    assert verdict.action == "hold"
    assert split_hold(policy, ctx, verdict) is None


def test_nothing_to_split(tmp_path, world, ctx_factory):
    policy = policy_for(tmp_path, world, HOLD_FR)
    one = ctx_factory(to=("buyer@col.example",))
    assert split_hold(policy, one, policy.decide(one)) is None
    accepted = ctx_factory(to=("buyer@own.example", "x@new.example"))
    assert split_hold(policy, accepted, policy.decide(accepted)) is None
