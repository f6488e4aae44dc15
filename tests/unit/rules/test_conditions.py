"""Every rule condition: a hit, a miss, and its bad values."""

from __future__ import annotations

import base64
import datetime as dt

import pytest

from gateway.rules import conditions as cmod
from gateway.rules.conditions import CONDITIONS
from gateway.rules.facts import facts_for

EXE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + b"\x00" * 48 + b"PE\x00\x00" + b"\x00" * 200
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n"


def check(world, name, value, ctx):
    cond = CONDITIONS[name](value, world.env)
    return cond.test(facts_for(ctx, world.directory, world.env))


def test_registry_names_are_kebab_case():
    assert all(n == n.lower() and "_" not in n for n in CONDITIONS)
    expected = {
        "sender", "sender-department", "sender-role", "sender-group", "recipient-relationship",
        "recipient-stage", "recipient-tag", "recipient-country", "recipient-domain", "recipient",
        "subject-contains", "body-contains", "subject-regex", "body-regex", "attachment-type",
        "attachment-name", "attachment-count", "attachment-size", "message-size", "first-contact",
        "time-of-day", "day-of-week",
    }
    assert expected <= set(CONDITIONS)


def test_sender(world, ctx_factory):
    assert check(world, "sender", "alice@acme.test", ctx_factory())[0]
    assert check(world, "sender", ["*@acme.test"], ctx_factory())[0]
    hit, why = check(world, "sender", "bob@acme.test", ctx_factory())
    assert not hit and "alice@acme.test" in why


def test_sender_department_includes_sub_departments(world, ctx_factory):
    assert check(world, "sender-department", "Sales", ctx_factory())[0]  # Alice is in Sales/Europe
    assert check(world, "sender-department", "europe", ctx_factory())[0]
    assert not check(world, "sender-department", "Management", ctx_factory())[0]
    assert not check(world, "sender-department", "Europe", ctx_factory(sender="carol@acme.test"))[0]


def test_sender_role(world, ctx_factory):
    assert check(world, "sender-role", "dept_head", ctx_factory(sender="bob@acme.test"))[0]
    hit, why = check(world, "sender-role", ["dept_head", "crm_admin"], ctx_factory())
    assert not hit and "salesperson" in why


def test_sender_group(world, ctx_factory):
    world.env.groups["eu"] = frozenset({"alice@acme.test"})
    assert check(world, "sender-group", "eu", ctx_factory())[0]
    assert not check(world, "sender-group", "eu", ctx_factory(sender="carol@acme.test"))[0]
    with pytest.raises(ValueError, match="unknown group"):
        CONDITIONS["sender-group"]("nope", world.env)


@pytest.mark.parametrize("to,value", [
    ("buyer@own.example", "own_customer"),
    ("x@col.example", "colleague"),
    ("x@unowned.example", "unowned"),
    ("x@pool.example", "public-pool"),
    ("someone@elsewhere.example", "unknown_external"),
    ("carol@acme.test", "internal"),
])
def test_recipient_relationship(world, ctx_factory, to, value):
    hit, why = check(world, "recipient-relationship", value, ctx_factory(to=(to,)))
    assert hit, why
    assert to in why


def test_recipient_relationship_any_recipient_and_header_recipients(world, ctx_factory):
    ctx = ctx_factory(to=("buyer@own.example", "x@col.example"))
    assert check(world, "recipient-relationship", "colleague_customer", ctx)[0]
    hit, why = check(world, "recipient-relationship", "public_pool_customer", ctx)
    assert not hit and "x@col.example: colleague_customer" in why
    with pytest.raises(ValueError, match="unknown relationship"):
        CONDITIONS["recipient-relationship"]("friend", world.env)


def test_recipient_customer_attributes(world, ctx_factory):
    ctx = ctx_factory(to=("buyer@own.example",))
    assert check(world, "recipient-stage", "Deal", ctx)[0]
    assert check(world, "recipient-tag", ["vip"], ctx)[0]
    assert check(world, "recipient-country", "de", ctx)[0]
    assert not check(world, "recipient-country", "FR", ctx)[0]
    hit, why = check(world, "recipient-tag", "VIP", ctx_factory(to=("a@nowhere.example",)))
    assert not hit and "no recipient is a known customer" in why


def test_recipient_domain_and_address(world, ctx_factory):
    ctx = ctx_factory(to=("x@mail.own.example",))
    assert check(world, "recipient-domain", "own.example", ctx)[0]  # subdomains count
    assert check(world, "recipient-domain", "*.example", ctx)[0]
    assert not check(world, "recipient-domain", "example.org", ctx)[0]
    assert check(world, "recipient", "*@mail.own.example", ctx)[0]
    assert not check(world, "recipient", "boss@*", ctx)[0]


def test_subject_and_body_contains(world, ctx_factory):
    ctx = ctx_factory(subject="Price LIST 2025", body="我们的报价如下")
    assert check(world, "subject-contains", "price list", ctx)[0]
    assert check(world, "body-contains", ["报价"], ctx)[0]
    assert not check(world, "body-contains", "invoice", ctx)[0]


def test_chinese_subject_matches_whether_encoded_or_raw(world, ctx_factory):
    """Outlook and Foxmail send Chinese subjects as RFC 2047 words; some clients send raw UTF-8."""
    encoded = ctx_factory(subject="回复：最新报价单 PI-2026")  # EmailMessage encodes it on the wire
    assert b"=?utf-8?" in encoded.raw
    assert encoded.subject == "回复：最新报价单 PI-2026"
    assert check(world, "subject-contains", "报价", encoded)[0]
    assert check(world, "subject-regex", r"报价单\s*PI-\d+", encoded)[0]
    raw = ("From: alice@acme.test\r\nTo: buyer@own.example\r\nSubject: 报价单 PI\r\n\r\nhi\r\n").encode()
    raw_ctx = ctx_factory(raw=raw)
    assert raw_ctx.subject == "报价单 PI"
    assert check(world, "subject-contains", "报价", raw_ctx)[0]


def test_html_body_is_scanned_without_tags(world, ctx_factory):
    from email.message import EmailMessage
    from email.policy import SMTP

    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "alice@acme.test", "buyer@own.example", "x"
    msg.set_content("<p>bank <b>account</b> number</p>", subtype="html")
    ctx = ctx_factory(raw=msg.as_bytes(policy=SMTP))
    assert check(world, "body-contains", "bank account number", ctx)[0] is False  # tags become spaces
    assert check(world, "body-regex", r"bank\s+account\s+number", ctx)[0]


def test_regex_conditions(world, ctx_factory):
    ctx = ctx_factory(subject="PO #12345", body="IBAN DE89370400440532013000")
    assert check(world, "subject-regex", r"PO\s*#\d+", ctx)[0]
    assert check(world, "body-regex", r"\bDE\d{20}\b", ctx)[0]
    assert not check(world, "subject-regex", r"^invoice", ctx)[0]
    with pytest.raises(ValueError, match="bad regular expression"):
        CONDITIONS["subject-regex"]("(unclosed", world.env)
    with pytest.raises(ValueError, match="longer than"):
        CONDITIONS["body-regex"]("a" * 2000, world.env)


def test_regex_time_budget(world, ctx_factory, monkeypatch):
    monkeypatch.setattr(cmod, "REGEX_TIMEOUT", 0.01)
    ctx = ctx_factory(body="a" * 30 + "x" * 3000)
    hit, why = check(world, "body-regex", r"(x+x+)+y", ctx)
    assert not hit and "ran out of time" in why


def test_body_scan_is_bounded(world, ctx_factory, monkeypatch):
    monkeypatch.setattr("gateway.rules.content.BODY_SCAN_LIMIT", 100)
    ctx = ctx_factory(body="x" * 500 + "SECRET")
    assert not check(world, "body-contains", "SECRET", ctx)[0]


def test_attachment_type_by_content_not_name(world, ctx_factory):
    ctx = ctx_factory(attachments=(("invoice.pdf", EXE, "application/pdf"),))
    hit, why = check(world, "attachment-type", "executable", ctx)
    assert hit and "invoice.pdf" in why
    ctx = ctx_factory(attachments=(("setup.exe", PDF, "application/octet-stream"),))
    assert not check(world, "attachment-type", "executable", ctx)[0]
    assert check(world, "attachment-type", "application/pdf", ctx)[0]
    assert not check(world, "attachment-type", "pdf", ctx_factory())[0]
    with pytest.raises(ValueError):
        CONDITIONS["attachment-type"]("exe", world.env)


def test_magic_is_one_instance_per_thread():
    import threading

    from gateway.rules import content

    seen = []

    def work():
        content.sniff_type(PDF)
        seen.append(content._local.magic)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(m) for m in seen}) == 3


def test_attachment_name_count_size(world, ctx_factory):
    ctx = ctx_factory(attachments=(("报价单 2025.XLSX", b"x" * 3000, "application/octet-stream"),
                                   ("photo.jpg", b"y" * 10, "image/jpeg")))
    assert check(world, "attachment-name", "*.xlsx", ctx)[0]
    assert check(world, "attachment-name", "报价*", ctx)[0]
    assert not check(world, "attachment-name", "*.exe", ctx)[0]
    assert check(world, "attachment-count", ">= 2", ctx)[0]
    assert not check(world, "attachment-count", "> 2", ctx)[0]
    assert check(world, "attachment-size", "> 2KB", ctx)[0]
    assert not check(world, "attachment-size", "> 1MB", ctx)[0]
    with pytest.raises(ValueError):
        CONDITIONS["attachment-count"]("> 2MB", world.env)


def test_attachment_conditions_skip_the_mime_parse_only_for_single_part_mail(world, ctx_factory):
    """A plain-text message: no attachments, and the body is never parsed for them.  A
    single-part message that is an attachment itself, and multipart mail, are parsed."""
    from gateway.rules.content import may_have_attachments

    text = ctx_factory()
    facts = facts_for(text, world.directory, world.env)
    assert not may_have_attachments(text.headers)
    assert not check(world, "attachment-name", "*", text)[0]
    assert not check(world, "attachment-count", "> 0", text)[0]
    assert "content" not in facts.__dict__  # the MIME tree was not parsed

    headers = (b"From: alice@acme.test\r\nTo: buyer@own.example\r\nSubject: x\r\n"
               b"Content-Type: application/octet-stream\r\n"
               b"Content-Disposition: attachment; filename=\"setup.exe\"\r\n"
               b"Content-Transfer-Encoding: base64\r\n\r\n")
    bare = ctx_factory(raw=headers + base64.encodebytes(EXE).replace(b"\n", b"\r\n"))
    assert may_have_attachments(bare.headers)
    hit, why = check(world, "attachment-type", "executable", bare)
    assert hit and "setup.exe" in why

    multi = ctx_factory(attachments=(("a.pdf", PDF, "application/pdf"),))
    assert may_have_attachments(multi.headers)
    assert check(world, "attachment-count", ">= 1", multi)[0]
    # Parsed already (a body condition asked first): the parse is reused.
    facts = facts_for(multi, world.directory, world.env)
    assert facts.attachments is facts.content.attachments


def test_message_size(world, ctx_factory):
    ctx = ctx_factory(body="z" * 5000)
    assert check(world, "message-size", "> 4KB", ctx)[0]
    assert not check(world, "message-size", ["> 1MB", "< 100"], ctx)[0]
    with pytest.raises(ValueError, match="comparison"):
        CONDITIONS["message-size"]("big", world.env)


def test_first_contact(world, ctx_factory):
    assert not check(world, "first-contact", True, ctx_factory(to=("x@own.example",)))[0]
    hit, why = check(world, "first-contact", True, ctx_factory(to=("x@own.example", "y@new.example")))
    assert hit and "y@new.example" in why
    assert check(world, "first-contact", False, ctx_factory(to=("x@col.example",)))[0]
    # Internal recipients never count; on public mail domains the address counts, not the domain.
    assert not check(world, "first-contact", True, ctx_factory(to=("carol@acme.test",)))[0]
    world.env.history._known.add("friend@gmail.com")
    assert not check(world, "first-contact", True, ctx_factory(to=("friend@gmail.com",)))[0]
    assert check(world, "first-contact", True, ctx_factory(to=("other@gmail.com",)))[0]
    with pytest.raises(ValueError):
        CONDITIONS["first-contact"]("maybe", world.env)


def test_contact_history_records_in_db(world):
    from gateway.db.models import ContactedDomain
    from gateway.rules.env import DomainHistory

    history = DomainHistory()
    assert not history.seen("new.example")
    history.record(["new.example", "new.example"], employee_id=world.alice.id)
    assert history.seen("new.example")
    assert DomainHistory().seen("new.example")
    assert ContactedDomain.select().count() == 1


def test_time_of_day_and_day_of_week(world, ctx_factory):
    ctx = ctx_factory()
    assert check(world, "time-of-day", "09:00-18:00", ctx)[0]
    assert not check(world, "time-of-day", "22:00-06:00", ctx)[0]
    world.clock.now = dt.datetime(2025, 3, 8, 23, 15, tzinfo=dt.UTC)  # Saturday night
    assert check(world, "time-of-day", "22:00-06:00", ctx)[0]
    assert check(world, "day-of-week", "weekend", ctx)[0]
    assert check(world, "day-of-week", "fri-sun", ctx)[0]
    assert not check(world, "day-of-week", ["mon-fri"], ctx)[0]
    with pytest.raises(ValueError):
        CONDITIONS["time-of-day"]("9 to 5", world.env)
    with pytest.raises(ValueError):
        CONDITIONS["day-of-week"]("funday", world.env)


def test_matches_everything(world):
    assert CONDITIONS["recipient-relationship"](
        ["own", "colleague", "unowned", "public-pool", "unknown", "internal"], world.env).matches_everything()
    assert CONDITIONS["message-size"](">= 0", world.env).matches_everything()
    assert not CONDITIONS["message-size"]("> 1MB", world.env).matches_everything()
    assert CONDITIONS["day-of-week"]("mon-sun", world.env).matches_everything()
    assert CONDITIONS["sender"]("*", world.env).matches_everything()


def test_values_must_be_scalars(world):
    with pytest.raises(ValueError):
        CONDITIONS["sender"]([{"a": 1}], world.env)
    with pytest.raises(ValueError):
        CONDITIONS["sender"]([], world.env)


@pytest.mark.parametrize("codec", ["utf-8", "gbk"])
def test_attachment_names_written_as_bare_8bit_bytes(world, ctx_factory, codec):
    """A client that writes the file name as bare UTF-8 or GBK bytes (no RFC 2231/2047): the
    conditions see the name — the MIME parse used to raise on the header (compat32 answers an
    email.header.Header for it), and the message got a 500, then a 451 forever."""
    raw = ("From: alice@acme.test\r\nTo: buyer@own.example\r\nSubject: Quotation\r\nMIME-Version: 1.0\r\n"
           'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nHello\r\n'
           '--b\r\nContent-Type: application/pdf; name="报价单.pdf"\r\n'
           'Content-Disposition: attachment; filename="报价单.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
           "JVBERi0xLjQK\r\n--b--\r\n").encode(codec)
    ctx = ctx_factory(raw=raw)
    hit, why = check(world, "attachment-name", "*报价*", ctx)
    assert hit and "报价单.pdf" in why
    assert check(world, "attachment-count", "== 1", ctx)[0]
    assert check(world, "attachment-type", "application/pdf", ctx)[0]
