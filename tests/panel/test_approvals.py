"""Approvals (审核) pages over HTTP against the real panel process and DB: the queue,
the safe preview, decisions, who may do what (403 for everyone else), and the
e-mailed approve/reject links (a GET never changes state)."""

from __future__ import annotations

import datetime as dt
import json
import re
from email.message import EmailMessage
from urllib.parse import urlsplit

import pytest

from gateway.approval import ApprovalService, make_token, verify_token
from gateway.config import load
from gateway.db.models import Approval, AuditLog, OutboundMessage, UsedApprovalToken
from gateway.directory import Directory
from gateway.policy.context import HOLD, Verdict
from gateway.rules.dryrun import make_context
from gateway.spool import Spool, new_queue_id
from tests.panel.conftest import PanelClient

pytestmark = pytest.mark.integration

HOSTILE_HTML = ("<p onclick=\"steal()\">报价 <b>Quote</b></p><script>alert('x')</script>"
                "<img src=\"http://tracker.example/pixel.gif\"><a href=\"http://phish.example/login\">pay here</a>")


def service_for(panel_server) -> ApprovalService:
    cfg = load(panel_server.config_path)
    directory = Directory(cfg.company.domains, cfg.public_mail_domains)
    directory.load()
    return ApprovalService(cfg, directory, Spool(cfg.spool_dir, node=cfg.node.name))


def hold(panel_server, subject: str, approvers=("manager",), sender="alice@acme.test",
         to="tanaka@osaka-machinery.jp") -> Approval:
    """A held message exactly as the SMTP handler leaves it (queue row `held`, original, approval)."""
    msg = EmailMessage()
    msg["From"] = f"Alice <{sender}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content("请审核这封报价邮件。\n")
    msg.add_alternative(HOSTILE_HTML, subtype="html")
    msg.add_attachment(b"%PDF-1.4 test", maintype="application", subtype="pdf", filename="报价单.pdf")
    raw = msg.as_bytes().replace(b"\n", b"\r\n")
    service = service_for(panel_server)
    ctx = make_context(raw, sender, [to], service.directory, "zh-CN")
    queue_id = new_queue_id()
    service.spool.write(queue_id, raw)
    service.spool.insert(queue_id, sender, [to], len(raw), employee_id=ctx.employee.id if ctx.employee else None,
                         state="held")
    verdict = Verdict(action=HOLD, approvers=list(approvers), rule="test-hold", reason="测试：需要审核")
    return service.record_hold(ctx, verdict, queue_id)


def fresh(a: Approval) -> Approval:
    return Approval.get_by_id(a.id)


def decisions(a: Approval) -> list[AuditLog]:
    return list(AuditLog.select().where(AuditLog.target == f"approval:{a.id}"))


def link_path(panel_server, a: Approval, action: str) -> str:
    url = service_for(panel_server).links(a)[action]
    parts = urlsplit(url)
    return parts.path + "?" + parts.query


# -- the queue --------------------------------------------------------------------------------


def test_approver_sees_queue_preview_and_approves(panel_server, panel_db, http_as):
    a = hold(panel_server, "Queue approve 1")
    carol = http_as("dept_head")
    page = carol.get("/approvals")
    assert page.status == 200 and "Queue approve 1" in page.text and f'href="/approvals/{a.id}"' in page.text
    detail = carol.get(f"/approvals/{a.id}")
    assert detail.status == 200
    text = detail.text
    assert "报价单.pdf" in text and "application/pdf" in text  # attachment list
    assert "请审核这封报价邮件" in text  # text part
    assert "http://phish.example/login" in text  # listed as text ...
    assert 'href="http://phish.example' not in text and "<script>alert" not in text  # ... never live
    assert f'src="/approvals/{a.id}/message.html"' in text and 'sandbox=""' in text
    html = carol.get(f"/approvals/{a.id}/message.html")
    assert html.status == 200
    csp = html.header("Content-Security-Policy")
    assert "default-src 'none'" in csp and "script" not in csp
    assert "<b>Quote</b>" in html.text
    for bad in ("<script", "onclick", "tracker.example", "phish.example"):
        assert bad not in html.text

    r = carol.post(f"/approvals/{a.id}/decide", {"action": "approve"})
    assert r.status == 303 and r.header("location").endswith("/approvals")
    a = fresh(a)
    assert a.state == "approved" and a.decided_by == "carol@acme.test"
    assert OutboundMessage.get(OutboundMessage.queue_id == a.queue_id).state == "queued"
    logged = decisions(a)  # exactly one entry: the service logs it, the panel does not log it again
    assert [(e.actor, e.action) for e in logged] == [("carol@acme.test", "approval.approved")]
    history = carol.get("/approvals?view=history")
    assert "Queue approve 1" in history.text and "carol@acme.test" in history.text
    assert "Queue approve 1" not in carol.get("/approvals").text
    # decided: no second decision
    again = carol.post(f"/approvals/{a.id}/decide", {"action": "reject", "reason": "late"}, follow=True)
    assert fresh(a).state == "approved" and "approved" in again.text


def test_reject_needs_a_reason(panel_server, panel_db, http_as):
    a = hold(panel_server, "Queue reject 1")
    carol = http_as("dept_head")
    carol.get(f"/approvals/{a.id}")
    r = carol.post(f"/approvals/{a.id}/decide", {"action": "reject", "reason": "  "})
    assert r.status == 400 and fresh(a).state == "pending"
    r = carol.post(f"/approvals/{a.id}/decide", {"action": "reject", "reason": "价格太低"})
    assert r.status == 303
    a = fresh(a)
    assert (a.state, a.decision_reason, a.decided_by) == ("rejected", "价格太低", "carol@acme.test")
    assert OutboundMessage.get(OutboundMessage.queue_id == a.queue_id).state == "rejected"


def test_csrf_is_required(panel_server, panel_db, http_as):
    a = hold(panel_server, "Queue csrf 1")
    carol = http_as("dept_head")
    r = carol.post(f"/approvals/{a.id}/decide", {"action": "approve"}, csrf="forged-token-value-xxxxxxxx")
    assert r.status == 403 and fresh(a).state == "pending"


@pytest.mark.parametrize("role", ["salesperson", "auditor", "it_admin"])
def test_lower_roles_get_403(panel_server, panel_db, http_as, role):
    a = hold(panel_server, f"Queue deny {role}")
    client = http_as(role)
    assert f"Queue deny {role}" not in client.get("/approvals").text
    assert client.get(f"/approvals/{a.id}").status == 403
    assert client.get(f"/approvals/{a.id}/message.html").status == 403
    client.get("/approvals")
    assert client.post(f"/approvals/{a.id}/decide", {"action": "approve"}).status == 403
    assert fresh(a).state == "pending"


def test_signed_out_goes_to_login(panel_server, panel_db, anon_client):
    a = hold(panel_server, "Queue anon 1")
    for path in ("/approvals", f"/approvals/{a.id}", f"/approvals/{a.id}/message.html"):
        r = anon_client.get(path)
        assert r.status == 303 and "/login" in r.header("location")


def test_named_approver_and_crm_admin(panel_server, panel_db, http_as, panel_url):
    """Bob (a salesperson) decides when named as approver; crm_admin sees everything."""
    a = hold(panel_server, "Queue named 1", approvers=("employee:bob@acme.test",))
    b = hold(panel_server, "Queue named 2", approvers=("employee:bob@acme.test",))
    bob = PanelClient(panel_url)
    assert bob.login("bob@acme.test", "bob-pw").status == 303
    assert "Queue named 1" in bob.get("/approvals").text
    assert bob.post(f"/approvals/{a.id}/decide", {"action": "approve"}).status == 303
    assert fresh(a).decided_by == "bob@acme.test"
    crm = http_as("crm_admin")
    assert "Queue named 2" in crm.get("/approvals").text
    assert crm.post(f"/approvals/{b.id}/decide", {"action": "reject", "reason": "no"}).status == 303
    assert fresh(b).decided_by == "local:crm"


def test_nobody_decides_their_own_message(panel_server, panel_db, http_as):
    a = hold(panel_server, "Queue own 1", approvers=("sender",))  # only the sender could be found
    alice = http_as("salesperson")
    page = alice.get(f"/approvals/{a.id}")
    assert page.status == 200 and 'id="approve"' not in page.text
    assert alice.post(f"/approvals/{a.id}/decide", {"action": "approve"}).status == 403
    assert fresh(a).state == "pending"


def test_unknown_approval_is_404(http_as):
    assert http_as("dept_head").get("/approvals/999999").status == 404


# -- the e-mailed links ------------------------------------------------------------------------


def test_link_get_only_shows_post_decides(panel_server, panel_db, anon_client):
    a = hold(panel_server, "Link approve 1")
    path = link_path(panel_server, a, "approve")
    page = anon_client.get(path)
    assert page.status == 200 and "Link approve 1" in page.text and 'id="confirm"' in page.text
    assert "报价单.pdf" in page.text and "<script>alert" not in page.text
    iframe = re.search(r'<iframe[^>]*src="([^"]+)"', page.text).group(1).replace("&amp;", "&")
    html = anon_client.get(iframe)
    assert html.status == 200 and "default-src 'none'" in html.header("Content-Security-Policy")
    assert "<b>Quote</b>" in html.text and "<script" not in html.text
    anon_client.get(path)  # GETs again: still nothing happened
    token = path.split("t=", 1)[1]
    nonce = verify_token(service_for(panel_server).key, token, dt.datetime.now(dt.UTC).timestamp()).nonce
    assert fresh(a).state == "pending" and not UsedApprovalToken.select().where(UsedApprovalToken.nonce == nonce)
    r = anon_client.post(path, {"t": token})
    assert r.status == 200 and 'id="link-done"' in r.text
    a = fresh(a)
    assert a.state == "approved" and a.decided_by == "carol@acme.test"  # the approver the link was mailed to
    assert [(e.actor, e.action) for e in decisions(a)] == [("carol@acme.test", "approval.approved")]
    again = anon_client.get(path)
    assert again.status == 410 and 'id="link-error"' in again.text
    assert anon_client.post(path, {"t": token}).status == 410


def test_reject_link_asks_for_a_reason(panel_server, panel_db, anon_client):
    a = hold(panel_server, "Link reject 1")
    path = link_path(panel_server, a, "reject")
    token = path.split("t=", 1)[1]
    page = anon_client.get(path)
    assert page.status == 200 and 'name="reason"' in page.text
    assert anon_client.post(path, {"t": token, "reason": ""}).status == 400
    assert fresh(a).state == "pending"
    r = anon_client.post(path, {"t": token, "reason": "客户信用不足"})
    assert r.status == 200
    a = fresh(a)
    assert (a.state, a.decision_reason) == ("rejected", "客户信用不足")


def test_link_needs_csrf(panel_server, panel_db, anon_client):
    a = hold(panel_server, "Link csrf 1")
    path = link_path(panel_server, a, "approve")
    anon_client.get(path)
    r = anon_client.post(path, {"t": path.split("t=", 1)[1]}, csrf="not-the-cookie-token-xxxxxxx")
    assert r.status == 403 and fresh(a).state == "pending"


def test_bad_links_get_a_clear_page(panel_server, panel_db, anon_client):
    a = hold(panel_server, "Link bad 1")
    service = service_for(panel_server)
    approve = link_path(panel_server, a, "approve")
    token = approve.split("t=", 1)[1]
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for path, status in (
        ("/approvals/approve?t=" + forged, 400),
        ("/approvals/approve?t=garbage", 400),
        ("/approvals/approve", 400),
        ("/approvals/reject?t=" + token, 400),  # an approve token on the reject page
        ("/approvals/approve?t=" + make_token(service.key, a.id, "approve",
                                               int(dt.datetime.now(dt.UTC).timestamp()) - 60), 410),
    ):
        r = anon_client.get(path)
        assert r.status == status, path
        assert 'id="link-error"' in r.text
    assert anon_client.get("/approvals/message.html?t=" + forged).status == 403
    assert fresh(a).state == "pending"
    Approval.update(state="expired").where(Approval.id == a.id).execute()
    r = anon_client.get(approve)
    assert r.status == 410 and "已超时" in r.text


def test_subjects_are_decoded_and_escaped(panel_server, panel_db, http_as):
    """Subjects and addresses are escaped everywhere."""
    a = hold(panel_server, "<img src=x onerror=alert(1)> 报价")
    carol = http_as("dept_head")
    for path in ("/approvals", f"/approvals/{a.id}"):
        text = carol.get(path).text
        assert "<img src=x onerror" not in text
        assert "&lt;img src=x onerror=alert(1)&gt; 报价" in text  # the RFC 2047 subject decoded, then escaped
    assert json.loads(a.approvers) == ["carol@acme.test"]
