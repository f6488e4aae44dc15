"""Every rule action: the verdict it shapes or the mutation it adds (and its stage)."""

from __future__ import annotations

import pytest

from gateway.mutate import STAGES, apply_mutations
from gateway.policy.context import HOLD, REJECT, Verdict
from gateway.rules import actions as amod
from gateway.rules.actions import ACTIONS
from gateway.rules.headerblock import HeaderBlock


def build(world, name, value):
    return ACTIONS[name](value, world.env)


def run(world, ctx, *actions):
    verdict = Verdict(rule="r")
    for a in actions:
        a.contribute(verdict, ctx, "r")
    return verdict


def test_registry():
    assert set(ACTIONS) == {"reject", "hold_for_approval", "rewrite_sender", "add_header", "prepend_subject",
                            "add_bcc", "notify"}


def test_reject(world, ctx_factory):
    v = run(world, ctx_factory(), build(world, "reject", "No."))
    assert (v.action, v.smtp_code, v.enhanced, v.reason, v.rule) == (REJECT, 550, "5.7.1", "No.", "r")
    v = run(world, ctx_factory(), build(world, "reject", {"reason": "later", "code": 451, "enhanced": "4.7.1"}))
    assert (v.smtp_code, v.enhanced) == (451, "4.7.1")
    for bad in ({"reason": ""}, {"reason": "x", "code": 250}, {"reason": "x", "code": 550, "enhanced": "4.7.1"},
                {"why": "x"}, False):
        with pytest.raises(ValueError):
            build(world, "reject", bad)


def test_hold_for_approval(world, ctx_factory):
    a = build(world, "hold_for_approval", {"approvers": ["manager", "role:crm_admin", "boss@acme.test"],
                                           "reason": "new market"})
    v = run(world, ctx_factory(), a)
    assert v.action == HOLD and v.approvers == ["manager", "role:crm_admin", "boss@acme.test"]
    assert v.reason == "new market"
    assert build(world, "hold_for_approval", ["department_head"]).approvers == ["department_head"]
    with pytest.raises(ValueError):
        build(world, "hold_for_approval", {"approvers": ["the boss"]})


def test_hold_is_skipped_once_approved(world, ctx_factory):
    ctx = ctx_factory()
    ctx.approved = True
    a = build(world, "hold_for_approval", ["manager"])
    verdict = Verdict(rule="r")
    note = a.contribute(verdict, ctx, "r")
    assert verdict.action == "accept" and "already approved" in note


def test_reject_wins_over_hold(world, ctx_factory):
    v = run(world, ctx_factory(), build(world, "reject", "no"), build(world, "hold_for_approval", ["manager"]))
    assert v.action == REJECT


def _apply(world, ctx, *actions, cfg=None):
    from gateway.config import Config

    v = run(world, ctx, *actions)
    return apply_mutations(ctx, v, cfg or Config())


def test_prepend_subject_once(world, ctx_factory):
    a = build(world, "prepend_subject", "[Export] ")
    assert a.mutation.stage == "tag"
    out = _apply(world, ctx_factory(subject="Offer"), a)
    assert HeaderBlock(out.data).get("Subject") == "[Export] Offer"
    out = _apply(world, ctx_factory(subject="Re: [Export] Offer"), a)
    assert HeaderBlock(out.data).get("Subject") == "[Export] Re: [Export] Offer"
    out = _apply(world, ctx_factory(subject="[Export] Offer"), a)
    assert HeaderBlock(out.data).get("Subject") == "[Export] Offer"


def test_prepend_subject_non_ascii_is_encoded(world, ctx_factory):
    out = _apply(world, ctx_factory(subject="报价"), build(world, "prepend_subject", "[外贸] "))
    raw = out.data.split(b"\r\n\r\n")[0]
    assert raw.isascii()
    assert HeaderBlock(out.data).get("Subject") == "[外贸] 报价"


def test_add_header(world, ctx_factory):
    a = build(world, "add_header", {"name": "X-Policy", "value": "export"})
    assert a.mutation.stage == "headers"
    out = _apply(world, ctx_factory(), a)
    assert HeaderBlock(out.data).get("X-Policy") == "export"
    assert out.data.endswith(ctx_factory().raw.split(b"\r\n\r\n", 1)[1])  # body untouched
    for bad in ({"name": "From", "value": "x"}, {"name": "DKIM-Signature", "value": "x"},
                {"name": "X Bad", "value": "x"}, {"name": "X-A", "value": "a\nb"}):
        with pytest.raises(ValueError):
            build(world, "add_header", bad)


def test_add_bcc_is_envelope_only(world, ctx_factory):
    a = build(world, "add_bcc", ["Archive@acme.test", "audit@acme.test"])
    out = _apply(world, ctx_factory(), a)
    assert out.recipients == ["buyer@own.example", "archive@acme.test", "audit@acme.test"]
    assert b"archive@acme.test" not in out.data
    with pytest.raises(ValueError):
        build(world, "add_bcc", "not an address")


def test_notify(world, ctx_factory, monkeypatch):
    sent = []
    monkeypatch.setattr(amod, "NOTIFIER", lambda to, subject, text, ctx: sent.append((to, subject, text)))
    a = build(world, "notify", {"to": ["manager", "it@acme.test"], "subject": "{rule}: {sender_name}",
                                "text": "{subject} to {recipients}"})
    _apply(world, ctx_factory(subject="Hi"), a)
    assert sent == [(["manager", "it@acme.test"], "r: Alice Wang", "Hi to buyer@own.example")]
    with pytest.raises(ValueError, match="unknown field"):
        build(world, "notify", {"to": ["manager"], "subject": "{password}"})
    with pytest.raises(ValueError):
        build(world, "notify", {"to": ["nobody in particular"]})


def test_notify_without_notifier_only_logs(world, ctx_factory, monkeypatch, caplog):
    monkeypatch.setattr(amod, "NOTIFIER", None)
    _apply(world, ctx_factory(), build(world, "notify", {"to": ["manager"]}))
    assert "no notifier" in caplog.text


def test_rewrite_sender_action(world, ctx_factory):
    a = build(world, "rewrite_sender", {"address": "sales@{company_domain}", "display_name": "{name} | {company}",
                                        "reply_to": "employee"})
    assert a.mutation.stage == "rewrite_sender"
    a.mutation.recorder = None
    out = _apply(world, ctx_factory(), a)
    hb = HeaderBlock(out.data)
    assert out.mail_from == "sales@acme.test"
    assert hb.get("From") == "Alice Wang | ACME Trading <sales@acme.test>"
    assert hb.get("Reply-To") == "Alice Wang <alice@acme.test>"
    for bad in ({"address": "sales"}, {"address": "x@y.z", "reply_to": "boss"}, {"address": "{oops}@a.b"}):
        with pytest.raises(ValueError):
            build(world, "rewrite_sender", bad)


def test_every_mutation_stage_is_known(world):
    values = {
        "prepend_subject": "[x] ", "add_header": {"name": "X-A", "value": "1"}, "add_bcc": "a@b.cd",
        "notify": {"to": ["manager"]}, "rewrite_sender": {"address": "s@acme.test"},
    }
    for name, value in values.items():
        assert build(world, name, value).mutation.stage in STAGES
