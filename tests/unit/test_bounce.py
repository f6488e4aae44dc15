"""DSN building: RFC 3464 / RFC 6522 structure, CRLF only, bounded size, zh-CN and en."""

from __future__ import annotations

import email
import re

import pytest

from gateway.bounce import MAX_HEADERS, Failure, build_dsn

ORIGINAL = (
    b"From: Alice <alice@acme.test>\r\n"
    b"To: bob@example.com, carol@example.com\r\n"
    b"Subject: Quotation 2024\r\n"
    b"Message-ID: <q1@acme.test>\r\n"
    b"\r\n"
    b"Dear Bob,\r\nplease find our offer.\r\n"
)
FAILURES = [
    Failure("bob@example.com", "5.1.1", "550 5.1.1 <bob@example.com>: User unknown", "mx.example.com"),
    Failure("carol@example.com", "4.4.7", "delivery time expired; last reply: 451 4.3.0 try later", ""),
]


def dsn(language: str = "zh-CN", original: bytes = ORIGINAL, failures=FAILURES, **kw) -> bytes:
    return build_dsn(
        original, "alice@acme.test", failures,
        hostname="mail.acme.test", company_domain="acme.test", language=language, **kw,
    )


def check_lines(raw: bytes) -> None:
    assert raw.endswith(b"\r\n")
    for line in raw.split(b"\r\n"):
        assert b"\r" not in line and b"\n" not in line
        assert len(line) <= 998


def parts(raw: bytes):
    msg = email.message_from_bytes(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    return msg, msg.get_payload()


def test_structure_and_headers():
    raw = dsn()
    check_lines(raw)
    msg, (text, status, headers) = parts(raw)
    assert [p.get_content_type() for p in (text, status, headers)] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers",
    ]
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@acme.test>"
    assert msg["To"] == "<alice@acme.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert re.fullmatch(r"<[^<>@\s]+@mail\.acme\.test>", msg["Message-ID"])
    assert msg["Date"]


def test_delivery_status_fields():
    _, (_, status, _) = parts(dsn())
    per_message, bob, carol = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mail.acme.test"
    assert per_message["Arrival-Date"]
    assert bob["Final-Recipient"] == "rfc822;bob@example.com"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.example.com"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.com>: User unknown"
    assert carol["Status"] == "4.4.7"
    assert carol["Remote-MTA"] is None


def test_original_headers_part_has_headers_only():
    _, (_, _, headers) = parts(dsn())
    text = headers.get_payload()
    assert "Subject: Quotation 2024" in text
    assert "Dear Bob" not in text


def test_chinese_text_by_default():
    _, (text, _, _) = parts(dsn())
    body = text.get_payload(decode=True).decode("utf-8")
    assert "未能送达" in body
    assert "bob@example.com" in body and "550 5.1.1" in body
    assert "建议" in body
    subject = str(email.header.make_header(email.header.decode_header(email.message_from_bytes(dsn())["Subject"])))
    assert "退信" in subject


def test_english_text():
    raw = dsn("en")
    msg, (text, _, _) = parts(raw)
    body = text.get_payload(decode=True).decode("utf-8")
    assert "could not be delivered" in body
    assert "What to do" in body
    assert "User unknown" in body
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"


def test_delayed_action():
    raw = dsn("en", failures=[Failure("bob@example.com", "4.2.0", "452 4.2.0 busy", "mx")], action="delayed")
    _, (text, status, _) = parts(raw)
    assert status.get_payload()[1]["Action"] == "delayed"
    assert "still" in email.message_from_bytes(raw)["Subject"]
    with pytest.raises(ValueError):
        dsn(action="relayed")


def test_long_header_is_bounded_and_lines_stay_short():
    huge = b"X-Long: " + b"a" * 5000 + b"\r\n"
    many = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"b" * 100) for i in range(2000))
    raw = dsn(original=b"Subject: big\r\n" + huge + many + b"\r\nbody\r\n")
    check_lines(raw)
    _, (_, _, headers) = parts(raw)
    block = headers.get_payload().encode()
    assert len(block) <= MAX_HEADERS
    assert b"Subject: big" in block
    assert b"X-Filler-01999" not in block  # cut at a field boundary
    assert len(raw) < MAX_HEADERS + 20_000


def test_bare_cr_lf_in_original_and_replies_do_not_leak():
    original = b"Subject: a\rX-Bad: b\nX-Ok: c\r\n\r\nbody"
    bad = Failure("bob@example.com\r\nBcc: evil@x", "5.7.1", "550 5.7.1 no\r\nInjected: yes", "mx\r\nX: y")
    raw = dsn(original=original, failures=[bad])
    check_lines(raw)
    msg, (_, status, headers) = parts(raw)
    assert msg["Bcc"] is None
    fields = status.get_payload()[1]
    assert fields["Injected"] is None and fields["X"] is None
    assert "X-Bad: b" in headers.get_payload()


def test_bad_status_is_normalised_and_non_ascii_recipient_encoded():
    raw = dsn(failures=[Failure("müller@beispiel.de", "bogus", "550 nein", "mx")])
    _, (_, status, _) = parts(raw)
    rcpt = status.get_payload()[1]
    assert rcpt["Status"] == "5.0.0"
    assert rcpt["Final-Recipient"] == "utf-8;m\\x{FC}ller@beispiel.de"


def test_eight_bit_original_headers_are_marked():
    raw = dsn(original="Subject: 报价单\r\n\r\nbody".encode())
    check_lines(raw)
    _, (_, _, headers) = parts(raw)
    assert headers["Content-Transfer-Encoding"] == "8bit"
