"""Approval (审核) end to end through a running gateway and the real Dovecot.

held -> approved (CLI) -> reaches the sink with DKIM that verifies;
held -> rejected -> the sender is told why; held -> expired -> the sender is told.
"""

from __future__ import annotations

import email
import re
import smtplib
import ssl
import subprocess
import sys
from email.header import decode_header, make_header
from pathlib import Path

import dkim
import pytest

from gateway.approval import ApprovalService
from gateway.config import load
from gateway.db import connect
from gateway.db.models import Approval, OutboundMessage, utcnow
from tests.harness.gateway import REPO, GatewayProcess, seeded

pytestmark = pytest.mark.integration

HOLD_RULE = """
rules:
  - name: hold-japan
    description: mail to Japan needs the manager's approval
    priority: 50
    conditions:
      recipient-country: [JP]
    actions:
      - hold_for_approval: {approvers: [manager], reason: "Japan: manager approval"}
"""


def gateway_holding_japan(tmp_path_factory, dovecot, name: str, **overrides) -> GatewayProcess:
    gw = seeded(tmp_path_factory.mktemp(name), dovecot, overrides, rules={"70-hold-japan.yaml": HOLD_RULE})
    gw.start()
    return gw


@pytest.fixture(scope="module")
def approving_gateway(tmp_path_factory, dovecot, sink):
    gw = gateway_holding_japan(tmp_path_factory, dovecot, "approval")
    yield gw
    gw.stop()


def subject_of(raw: bytes) -> str:
    return str(make_header(decode_header(email.message_from_bytes(raw)["Subject"] or "")))


def send(gw, subject: str) -> str:
    """Alice writes to Japan; the reply to her DATA."""
    ctx = ssl.create_default_context(cafile=str(gw.cert_path))
    with smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30) as conn:
        conn.starttls(context=ctx)
        conn.login("alice@acme.test", "alice-pw")
        msg = (f"From: Alice <alice@acme.test>\r\nTo: tanaka@osaka-machinery.jp\r\nSubject: {subject}\r\n"
               "Message-ID: <" + subject.replace(" ", "-") + "@acme.test>\r\n\r\nご確認ください。\r\n").encode()
        conn.mail("alice@acme.test")
        conn.rcpt("tanaka@osaka-machinery.jp")
        code, reply = conn.data(msg)
        assert code == 250, reply
        return reply.decode()


def text_of(raw: bytes) -> str:
    part = next(p for p in email.message_from_bytes(raw).walk() if p.get_content_type() == "text/plain")
    return part.get_payload(decode=True).decode(part.get_content_charset() or "utf-8")


def arrivals(sink, count: int) -> list:
    return sink.wait_for(count, timeout=30)


def mailgate(gw, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "-c", str(gw.config_path), *args],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def approval_for(subject: str) -> Approval:
    return Approval.get(Approval.subject == subject)


def dns_stub(gw):
    records = {}
    for line in (gw.base_dir / "certs" / "dkim" / "mailgate.dns").read_text().splitlines():
        name, _, _, txt = line.split(" ", 3)
        records[name.encode()] = txt.strip('"').encode()

    def dnsfunc(name, timeout=5):
        return records.get(name if name.endswith(b".") else name + b".")

    return dnsfunc


def test_held_then_approved_reaches_the_sink_signed(approving_gateway, sink):
    gw = approving_gateway
    sink.clear()
    assert re.fullmatch(r"2\.0\.0 Ok: queued as \w+, held for approval", send(gw, "Quote JP-1"))
    # The approver (Alice's manager, Carol) gets a request with links; Alice gets a notice.
    mails = arrivals(sink, 2)
    by_rcpt = {m.rcpt_tos[0]: m for m in mails}
    assert set(by_rcpt) == {"carol@acme.test", "alice@acme.test"}
    request = text_of(by_rcpt["carol@acme.test"].data)
    assert re.search(r"/approve\?t=[\w.-]+", request) and re.search(r"/reject\?t=[\w.-]+", request)
    assert "待审核" in subject_of(by_rcpt["alice@acme.test"].data)
    row = OutboundMessage.get(OutboundMessage.message_id == "<Quote-JP-1@acme.test>")
    assert row.state == "held"

    mailgate(gw, "approvals", "approve", str(approval_for("Quote JP-1").id), "--actor", "carol@acme.test")
    released = [m for m in arrivals(sink, 3) if m.rcpt_tos == ["tanaka@osaka-machinery.jp"]]
    assert len(released) == 1
    data = released[0].data
    assert b"Subject: Quote JP-1" in data
    # Dovecot's submission adds its own Received above; DKIM still verifies (d=acme.test).
    assert dkim.verify(data, dnsfunc=dns_stub(gw))
    assert approval_for("Quote JP-1").state == "approved"


def test_rejected_tells_the_sender_why(approving_gateway, sink):
    gw = approving_gateway
    sink.clear()
    send(gw, "Quote JP-2")
    arrivals(sink, 2)
    mailgate(gw, "approvals", "reject", str(approval_for("Quote JP-2").id), "--reason", "价格太低",
             "--actor", "carol@acme.test")
    notices = [m for m in arrivals(sink, 3)[2:] if m.rcpt_tos == ["alice@acme.test"]]
    assert notices and "未通过审核" in subject_of(notices[0].data)
    assert "价格太低" in text_of(notices[0].data)
    assert not any(m.rcpt_tos == ["tanaka@osaka-machinery.jp"] for m in sink.messages())


def test_expired_tells_the_sender(approving_gateway, sink):
    gw = approving_gateway
    sink.clear()
    send(gw, "Quote JP-3")
    arrivals(sink, 2)
    a = approval_for("Quote JP-3")
    Approval.update(expires_at=utcnow()).where(Approval.id == a.id).execute()
    service = ApprovalService.from_config(load(gw.config_path))
    assert service.expire_due() == 1
    connect(gw.db_url)
    assert approval_for("Quote JP-3").state == "expired"
    notices = [m for m in arrivals(sink, 3)[2:] if m.rcpt_tos == ["alice@acme.test"]]
    assert notices and "超时" in subject_of(notices[0].data)
    assert Path(gw.base_dir).exists()


def test_hot_reload_refuses_a_broken_edit_and_keeps_enforcing(approving_gateway, sink):
    gw = approving_gateway
    rules = Path(load(gw.config_path).rules.dir)
    mark = len(gw.log_lines)
    (rules / "80-new.yaml").write_text(
        "rules:\n  - name: no-forbidden\n    priority: 20\n    conditions:\n"
        "      subject-contains: [forbidden]\n    actions:\n      - reject: \"subject not allowed\"\n"
    )
    (rules / "81-broken.yaml").write_text("rules:\n  - name: broken\n    conditions: {nonsense-condition: 1}\n")
    line = gw.wait_for_log("rules not reloaded", after=mark)
    assert "81-broken.yaml:" in line  # file:line in the log
    sink.clear()
    send(gw, "Quote JP-4")  # the old rules still hold mail to Japan
    arrivals(sink, 2)
    assert approval_for("Quote JP-4").state == "pending"
    ctx = ssl.create_default_context(cafile=str(gw.cert_path))
    with smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30) as conn:
        conn.starttls(context=ctx)
        conn.login("alice@acme.test", "alice-pw")
        conn.sendmail("alice@acme.test", ["x@unknown-buyer.com"], b"Subject: forbidden\r\n\r\nx\r\n")  # not yet
        mark = len(gw.log_lines)
        (rules / "81-broken.yaml").unlink()
        gw.wait_for_log("rules loaded", after=mark)
        with pytest.raises(smtplib.SMTPDataError) as err:
            conn.sendmail("alice@acme.test", ["x@unknown-buyer.com"], b"Subject: forbidden\r\n\r\nx\r\n")
        assert err.value.smtp_code == 550 and b"subject not allowed" in err.value.smtp_error


@pytest.fixture(scope="module")
def splitting_gateway(tmp_path_factory, dovecot, sink):
    gw = gateway_holding_japan(tmp_path_factory, dovecot, "approval-split", approval={"split_recipients": True})
    yield gw
    gw.stop()


def test_split_recipients_not_needing_approval_receive_at_once(splitting_gateway, sink):
    gw = splitting_gateway
    connect(gw.db_url)
    sink.clear()
    ctx = ssl.create_default_context(cafile=str(gw.cert_path))
    msg = (b"From: Alice <alice@acme.test>\r\nTo: tanaka@osaka-machinery.jp, buyer@unknown-buyer.com\r\n"
           b"Subject: Quote SPLIT\r\nMessage-ID: <Quote-SPLIT@acme.test>\r\n\r\nprices\r\n")
    with smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30) as conn:
        conn.starttls(context=ctx)
        conn.login("alice@acme.test", "alice-pw")
        conn.sendmail("alice@acme.test", ["tanaka@osaka-machinery.jp", "buyer@unknown-buyer.com"], msg)
        reply = conn.noop()
    assert reply[0] == 250
    # The free recipient gets it at once; the approver and the sender are told about the held part.
    mails = arrivals(sink, 3)
    by_rcpt = {m.rcpt_tos[0]: m for m in mails}
    assert set(by_rcpt) == {"buyer@unknown-buyer.com", "carol@acme.test", "alice@acme.test"}
    assert by_rcpt["buyer@unknown-buyer.com"].rcpt_tos == ["buyer@unknown-buyer.com"]
    assert b"Subject: Quote SPLIT" in by_rcpt["buyer@unknown-buyer.com"].data
    a = approval_for("Quote SPLIT")
    assert a.state == "pending" and a.recipients == '["tanaka@osaka-machinery.jp"]'
    assert "split-from=" in gw.wait_for_log("split-from=")

    mailgate(gw, "approvals", "approve", str(a.id), "--actor", "carol@acme.test")
    released = [m for m in arrivals(sink, 4) if m.rcpt_tos == ["tanaka@osaka-machinery.jp"]]
    assert len(released) == 1 and b"Subject: Quote SPLIT" in released[0].data
    assert sum("buyer@unknown-buyer.com" in m.rcpt_tos for m in sink.messages()) == 1  # never twice
