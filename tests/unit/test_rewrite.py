"""Sender rewriting: envelope + From together, Sender, display name, Reply-To, Message-ID record."""

from __future__ import annotations

from email.parser import BytesHeaderParser
from email.policy import compat32

import pytest

from gateway.db import connect
from gateway.db.models import Employee, SentMessage
from gateway.directory import EmployeeInfo
from gateway.mutate import Outgoing
from gateway.policy.context import Context
from gateway.rewrite import RewriteSender, employee_for_reply
from gateway.rules.headerblock import HeaderBlock

RAW = (b"From: =?utf-8?b?546L5Li9?= <alice@acme.test>\r\nSender: alice@acme.test\r\nTo: buyer@own.example\r\n"
       b"Reply-To: alice.private@gmail.com\r\nSubject: Offer\r\nMessage-ID: <abc@acme.test>\r\n\r\nbody\r\n")


@pytest.fixture
def db(tmp_path):
    connect("sqlite:///" + str(tmp_path / "t.db"))
    return Employee.create(email="alice@acme.test", name="王丽")


def ctx_for(emp_id: int = 1) -> Context:
    emp = EmployeeInfo(emp_id, "alice@acme.test", "王丽", None, None, frozenset(), True)
    return Context("alice@acme.test", ["buyer@own.example"], BytesHeaderParser(policy=compat32).parsebytes(RAW),
                   RAW, emp)


def rewrite(**kw) -> tuple[Outgoing, list]:
    recorded = []
    kw.setdefault("recorder", lambda *a: recorded.append(a))
    m = RewriteSender(**kw)
    out = Outgoing("alice@acme.test", ["buyer@own.example"], RAW)
    m.apply(out, ctx_for())
    return out, recorded


def test_envelope_and_from_together_with_display_template():
    out, recorded = rewrite(address="sales@acme.test", display_name="{name} | {company}", company="ACME Trading")
    hb = HeaderBlock(out.data)
    assert out.mail_from == "sales@acme.test"
    assert hb.get("From") == "王丽 | ACME Trading <sales@acme.test>"
    assert out.data.split(b"\r\n\r\n")[0].isascii()  # RFC 2047 encoded
    assert hb.get("Sender") is None  # the employee's mailbox is not revealed
    assert hb.get("Reply-To") == "alice.private@gmail.com"  # keep
    assert out.data.endswith(b"\r\n\r\nbody\r\n")
    assert recorded == [("<abc@acme.test>", 1, "sales@acme.test")]


@pytest.mark.parametrize("policy,expected", [
    ("keep", "alice.private@gmail.com"),
    ("company", "王丽 <sales@acme.test>"),
    ("employee", "王丽 <alice@acme.test>"),
])
def test_reply_to_policies(policy, expected):
    out, _ = rewrite(address="sales@acme.test", reply_to=policy)
    assert HeaderBlock(out.data).get("Reply-To") == expected


def test_sender_employee_policy_and_address_template():
    out, _ = rewrite(address="{local}.sales@{company_domain}", company_domain="acme.test", sender="employee")
    assert out.mail_from == "alice.sales@acme.test"
    assert HeaderBlock(out.data).get("Sender") == "alice@acme.test"


def test_only_one_from_remains():
    out, _ = rewrite(address="sales@acme.test")
    assert out.data.lower().count(b"\r\nfrom:") + out.data.lower().startswith(b"from:") == 1


def test_bad_settings_are_refused():
    for kw in ({"address": "sales"}, {"address": "a@b.c", "reply_to": "nobody"},
               {"address": "a@b.c", "sender": "keep"}, {"address": "a@b.c", "display_name": "{password}"}):
        with pytest.raises(ValueError):
            RewriteSender(**kw)


def test_message_id_recorded_and_reply_routed_back(db):
    m = RewriteSender(address="sales@acme.test")
    out = Outgoing("alice@acme.test", ["buyer@own.example"], RAW)
    m.apply(out, ctx_for(db.id))
    m.apply(Outgoing("alice@acme.test", [], RAW), ctx_for(db.id))  # recorded once
    assert SentMessage.select().count() == 1
    assert employee_for_reply("<abc@acme.test>") == db.id
    assert employee_for_reply("", "<old@x> <abc@acme.test>") == db.id
    assert employee_for_reply("<unknown@x>") is None


def test_rewrite_then_dkim_aligns(tmp_path):
    import dkim

    from gateway.dkim import DkimSign, DkimSigner, load_keys
    from gateway.keys import make_dkim_keys

    records = make_dkim_keys(tmp_path, "s1", "acme.test")
    out, _ = rewrite(address="sales@acme.test", display_name="{name} | ACME")
    DkimSign(DkimSigner({"acme.test": load_keys(tmp_path, "s1", ["rsa"])})).apply(out, None)

    def dnsfunc(name, timeout=5):
        return records["rsa"].encode() if name == b"s1-rsa._domainkey.acme.test." else None

    assert dkim.verify(out.data, dnsfunc=dnsfunc)
    sig = dkim.DKIM(out.data).headers[0][1]
    assert b"d=acme.test" in sig and out.mail_from.endswith("@acme.test")  # DMARC: From domain == d=
