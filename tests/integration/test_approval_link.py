"""Approval by the e-mailed link, end to end (issue 4): a real gateway (`mailgate run` with
the panel inside), the real Dovecot upstream and the SMTP sink.

held → the approver's e-mail → its approve link → GET shows the message and a confirm
form and changes nothing → POST confirms → the message reaches the sink with a DKIM
signature that verifies (dkimpy, DNS stub).  The reject link asks for a reason and the
sender is told it.  Links are single-use, bound to their action, and tamper-proof.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import dkim
import pytest

from gateway.approval import make_token
from gateway.db.models import Approval, AuditLog
from tests.integration.test_approval_flow import (
    approval_for,
    dns_stub,
    gateway_holding_japan,
    send,
    subject_of,
    text_of,
)
from tests.panel.conftest import PanelClient, wait_until

pytestmark = pytest.mark.integration

CUSTOMER = "tanaka@osaka-machinery.jp"


@pytest.fixture(scope="module")
def gw(tmp_path_factory, dovecot, sink):
    process = gateway_holding_japan(tmp_path_factory, dovecot, "approval-link")
    yield process
    process.stop()


def request_mail(sink, subject: str):  # noqa: ANN201
    """The approval request the approver (Carol, Alice's manager) receives for ``subject``."""
    return wait_until(lambda: next((m for m in sink.messages() if m.rcpt_tos == ["carol@acme.test"]
                                    and subject in text_of(m.data)), None), timeout=30)


def link_from(mail, action: str) -> str:
    """The path and query of the ``action`` link in the approval e-mail."""
    url = re.search(rf"https?://\S+/{action}\?t=[\w.-]+", text_of(mail.data)).group(0)
    parts = urlsplit(url)
    return parts.path + "?" + parts.query


def released(sink, subject: str) -> list:
    return [m for m in sink.messages() if m.rcpt_tos == [CUSTOMER] and f"Subject: {subject}".encode() in m.data]


def decisions(a: Approval) -> list[AuditLog]:
    return list(AuditLog.select().where(AuditLog.target == f"approval:{a.id}"))


def test_approve_link_get_shows_post_confirms_and_mail_arrives_signed(gw, sink):
    sink.clear()
    send(gw, "Link JP-1")
    path = link_from(request_mail(sink, "Link JP-1"), "approve")
    a = approval_for("Link JP-1")
    client = PanelClient(f"http://127.0.0.1:{gw.panel_port}")  # not signed in: the link is the credential

    page = client.get(path)
    assert page.status == 200 and "Link JP-1" in page.text and 'id="confirm"' in page.text
    assert 'id="link-form"' in page.text and "alice@acme.test" in page.text
    assert client.get(path).status == 200  # a GET (twice, as a mail scanner would) changes nothing
    assert Approval.get_by_id(a.id).state == "pending" and not released(sink, "Link JP-1")

    token = path.split("t=", 1)[1]
    refused = client.post(path.split("?")[0], {"t": token}, csrf=False)  # a cross-site POST has no token
    assert refused.status == 403 and Approval.get_by_id(a.id).state == "pending"

    done = client.post(path.split("?")[0], {"t": token})
    assert done.status == 200 and 'id="link-done"' in done.text
    decided = Approval.get_by_id(a.id)
    assert decided.state == "approved" and decided.decided_by == "carol@acme.test"
    # one decision, logged once (by the approval service)
    assert [e.action for e in decisions(a)] == ["approval.approved"]

    mails = wait_until(lambda: released(sink, "Link JP-1"), timeout=30)
    assert len(mails) == 1
    assert dkim.verify(mails[0].data, dnsfunc=dns_stub(gw))
    assert b"d=acme.test" in mails[0].data

    again = client.get(path)  # single use
    assert again.status == 410 and 'id="link-error"' in again.text
    assert client.post(path.split("?")[0], {"t": token}).status == 410
    assert len(released(sink, "Link JP-1")) == 1


def test_reject_link_needs_a_reason_and_tells_the_sender(gw, sink):
    sink.clear()
    send(gw, "Link JP-2")
    mail = request_mail(sink, "Link JP-2")
    path = link_from(mail, "reject")
    a = approval_for("Link JP-2")
    client = PanelClient(f"http://127.0.0.1:{gw.panel_port}")
    page = client.get(path)
    assert page.status == 200 and 'name="reason"' in page.text and Approval.get_by_id(a.id).state == "pending"
    token = path.split("t=", 1)[1]
    r = client.post(path.split("?")[0], {"t": token, "reason": ""})
    assert r.status == 400 and Approval.get_by_id(a.id).state == "pending"
    r = client.post(path.split("?")[0], {"t": token, "reason": "价格需要重新核算"})
    assert r.status == 200 and 'id="link-done"' in r.text
    assert Approval.get_by_id(a.id).state == "rejected"
    assert Approval.get_by_id(a.id).decision_reason == "价格需要重新核算"
    notice = wait_until(lambda: next((m for m in sink.messages() if m.rcpt_tos == ["alice@acme.test"]
                                      and "未通过审核" in subject_of(m.data)), None), timeout=30)
    assert "价格需要重新核算" in text_of(notice.data)
    # the approve link of the same mail is dead now too
    assert client.get(link_from(mail, "approve")).status == 410
    assert not released(sink, "Link JP-2")


def test_links_are_bound_to_their_action_and_tamper_proof(gw, sink):
    sink.clear()
    send(gw, "Link JP-3")
    mail = request_mail(sink, "Link JP-3")
    a = approval_for("Link JP-3")
    client = PanelClient(f"http://127.0.0.1:{gw.panel_port}")
    approve = link_from(mail, "approve")
    token = approve.split("t=", 1)[1]
    # the approve token on the reject page
    assert client.get("/approvals/reject?t=" + token).status == 400
    # a changed token, a token signed with another key, no token
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    assert client.get("/approvals/approve?t=" + tampered).status == 400
    forged = make_token(b"not-the-gateway-key-" * 2, a.id, "approve", 4102444800)
    assert client.get("/approvals/approve?t=" + forged).status == 400
    assert client.get(approve).status == 200  # picks up the form's CSRF token
    assert client.post("/approvals/approve", {"t": forged}).status == 400
    assert client.get("/approvals/approve").status == 400
    assert Approval.get_by_id(a.id).state == "pending" and not released(sink, "Link JP-3")
