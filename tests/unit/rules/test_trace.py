"""Rules running inside Policy.decide: the trace, audit mode, exceptions, stop."""

from __future__ import annotations

import textwrap

from gateway.policy import Policy
from gateway.rules.dryrun import format_trace
from gateway.rules.loader import load_rules

RULES = """
rules:
  - name: tag-vip
    priority: 20
    conditions:
      recipient-tag: VIP
    actions:
      - prepend_subject: "[VIP] "
  - name: audit-big
    priority: 30
    mode: audit
    conditions:
      recipient-relationship: own
    actions:
      - reject: "would refuse"
  - name: hold-new
    priority: 40
    conditions:
      first-contact: true
    exceptions:
      sender-role: dept_head
    actions:
      - hold_for_approval: {approvers: [manager], reason: first contact}
      - add_header: {name: X-Held, value: "yes"}
  - name: stopper
    priority: 50
    conditions:
      subject-contains: STOP
    actions:
      - add_header: {name: X-Stop, value: "1"}
    stop: true
  - name: after-stop
    priority: 60
    conditions:
      subject-contains: STOP
    actions:
      - reject: "never reached"
"""


def policy_for(tmp_path, world, text=RULES):
    d = tmp_path / "rules"
    d.mkdir()
    (d / "10.yaml").write_text(textwrap.dedent(text))
    rules, errors = load_rules(d, world.env)
    assert errors == []
    return Policy(world.directory, rules)


def steps(ctx):
    return {s.rule: s for s in ctx.trace}


def test_every_rule_is_traced_with_why(tmp_path, world, ctx_factory):
    policy = policy_for(tmp_path, world)
    ctx = ctx_factory(to=("buyer@own.example",))
    verdict = policy.decide(ctx)
    s = steps(ctx)
    assert list(s) == ["tag-vip", "audit-big", "hold-new", "stopper", "after-stop"]
    assert s["tag-vip"].hit and "customer OwnCo has tag vip" in s["tag-vip"].why
    assert s["audit-big"].hit and s["audit-big"].mode == "audit" and "audit only" in s["audit-big"].why
    assert not s["hold-new"].hit and "written to before" in s["hold-new"].why
    assert not s["stopper"].hit
    assert verdict.action == "accept"  # the audit rule did not refuse
    assert [m.describe() for m in verdict.mutations] == ["prepend '[VIP] ' to the subject"]


def test_hold_and_its_mutations(tmp_path, world, ctx_factory):
    policy = policy_for(tmp_path, world)
    ctx = ctx_factory(to=("someone@new.example",))
    verdict = policy.decide(ctx)
    assert verdict.action == "hold" and verdict.approvers == ["manager"] and verdict.rule == "hold-new"
    assert [m.name for m in verdict.mutations] == ["X-Held"]


def test_exception_skips_the_rule(tmp_path, world, ctx_factory):
    policy = policy_for(tmp_path, world)
    ctx = ctx_factory(sender="bob@acme.test", to=("someone@new.example",))
    assert policy.decide(ctx).action == "accept"
    assert "exception sender-role: sender has role dept_head" == steps(ctx)["hold-new"].why


def test_approved_message_is_not_held_again(tmp_path, world, ctx_factory):
    policy = policy_for(tmp_path, world)
    ctx = ctx_factory(to=("someone@new.example",))
    ctx.approved = True
    verdict = policy.decide(ctx)
    assert verdict.action == "accept"
    assert "already approved" in steps(ctx)["hold-new"].why
    assert [m.name for m in verdict.mutations] == ["X-Held"]


def test_stop_ends_evaluation(tmp_path, world, ctx_factory):
    policy = policy_for(tmp_path, world)
    ctx = ctx_factory(subject="STOP here", to=("x@own.example",))
    verdict = policy.decide(ctx)
    assert verdict.action == "accept"
    assert steps(ctx)["after-stop"].why == "not evaluated: rule stopper said stop"


def test_content_is_parsed_once_per_message(tmp_path, world, ctx_factory, monkeypatch):
    calls = []
    import gateway.rules.facts as facts

    real = facts.parse_content
    monkeypatch.setattr(facts, "parse_content", lambda raw: calls.append(1) or real(raw))
    text = "rules:\n" + "".join(
        f"  - name: r{i}\n    conditions: {{body-contains: word{i}}}\n    actions: [{{add_bcc: a@b.cd}}]\n"
        for i in range(5))
    policy_for(tmp_path, world, text).decide(ctx_factory())
    assert calls == [1]


def test_format_trace(tmp_path, world, ctx_factory):
    policy = policy_for(tmp_path, world)
    ctx = ctx_factory(to=("someone@new.example",))
    verdict = policy.decide(ctx)
    text = format_trace(ctx, verdict, policy)
    assert "HIT  hold-new" in text and "miss tag-vip" in text and "10.yaml:" in text
    assert "verdict:   HOLD for approval by manager (rule hold-new)" in text
    assert "[headers] add header X-Held: yes" in text
    assert "dry run" in text
