from email.parser import BytesHeaderParser

from gateway import customers
from gateway.config import PUBLIC_MAIL_DOMAINS
from gateway.directory import Directory
from gateway.policy import ACCEPT, REJECT, Context, Policy


def world(db):
    alice = customers.create_employee("alice@acme.test", "Alice Wang")
    bob = customers.create_employee("bob@acme.test", "Bob Li")
    carol = customers.create_employee("carol@acme.test", "Carol Chen")
    customers.create_customer("Lagos", contacts=["lagos@gmail.com"], owners=[bob], public_domains=PUBLIC_MAIL_DOMAINS)
    customers.create_customer("Both", domains=["both.de"], owners=[bob, carol])
    customers.create_customer("Mine", domains=["mine.de"], owners=[alice])
    d = Directory(["acme.test"], PUBLIC_MAIL_DOMAINS)
    d.load()
    return d, alice


def ctx(d, employee, rcpts, headers=b"", language="zh-CN"):
    raw = headers + b"Subject: hi\r\n\r\nbody\r\n"
    return Context(
        mail_from="alice@acme.test", rcpt_tos=rcpts, headers=BytesHeaderParser().parsebytes(raw), raw=raw,
        employee=d.employee(employee.id), language=language,
    )


def test_conflict_names_every_recipient_and_owner(db):
    d, alice = world(db)
    c = ctx(d, alice, ["lagos@gmail.com", "x@mine.de"], b"Cc: Buyer <buyer@both.de>\r\n")
    v = Policy(d).decide(c)
    assert v.action == REJECT and v.smtp_code == 550 and v.enhanced == "5.7.1"
    assert "lagos@gmail.com" in v.reason and "Bob Li <bob@acme.test>" in v.reason
    assert "buyer@both.de" in v.reason and "Carol Chen <carol@acme.test>" in v.reason
    assert "同事" in v.reason
    assert c.trace[0].rule == "send-conflict" and c.trace[0].hit


def test_conflict_in_english(db):
    d, alice = world(db)
    v = Policy(d).decide(ctx(d, alice, ["lagos@gmail.com"], language="en"))
    assert "colleague Bob Li <bob@acme.test>" in v.reason


def test_own_internal_unknown_pass_and_are_traced(db):
    d, alice = world(db)
    c = ctx(d, alice, ["a@mine.de", "bob@acme.test", "who@else.example", "other@gmail.com"])
    assert Policy(d).decide(c).action == ACCEPT
    assert c.trace and not c.trace[0].hit


def test_no_employee_is_not_blocked(db):
    d, _ = world(db)
    c = Context(mail_from="erp@acme.test", rcpt_tos=["lagos@gmail.com"],
                headers=BytesHeaderParser().parsebytes(b"\r\n"), raw=b"\r\n", employee=None)
    assert Policy(d).decide(c).action == ACCEPT
