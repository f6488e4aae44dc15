"""Approvals end to end in Chromium: a real gateway (`mailgate run` with the panel inside),
real Dovecot upstream, real SMTP sink, real DB.  A held message is approved in the
queue (or through the e-mailed link) and reaches the sink; other roles get 403."""

from __future__ import annotations

import email
import re
import smtplib
import ssl
from email.message import EmailMessage
from urllib.parse import urlsplit

import pytest

from gateway.db import connect
from gateway.db.models import Approval
from panel.auth import create_local_account
from tests.harness.gateway import seeded
from tests.integration.test_approval_flow import HOLD_RULE
from tests.panel.conftest import login, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CUSTOMER = "tanaka@osaka-machinery.jp"
HOSTILE_HTML = ("<p>Quote <b id='bold'>JP</b></p><script>document.title='pwned'</script>"
                "<img src='http://tracker.example/pixel.gif' onerror=\"document.title='pwned'\">")


@pytest.fixture(scope="module")
def gw(tmp_path_factory, dovecot, sink):
    process = seeded(tmp_path_factory.mktemp("approval-browser"), dovecot, rules={"70-hold-japan.yaml": HOLD_RULE})
    create_local_account("auditor", "Pruefer-Lesen-42", ("auditor",), name="Auditor")
    process.start()
    process.url = f"http://127.0.0.1:{process.panel_port}"
    yield process
    process.stop()


@pytest.fixture
def db(gw):
    database = connect(gw.db_url, migrate=False)
    yield database
    database.close()


@pytest.fixture
def fresh_page(browser):
    contexts = []

    def make():  # noqa: ANN202
        ctx = browser.new_context(viewport={"width": 390, "height": 844}, locale="zh-CN")  # a phone
        ctx.set_default_timeout(15000)
        contexts.append(ctx)
        page = ctx.new_page()
        page.requests = []
        page.on("request", lambda r: page.requests.append(r.url))
        return page

    yield make
    for ctx in contexts:
        ctx.close()


def send(gw, subject: str) -> None:
    msg = EmailMessage()
    msg["From"] = "Alice <alice@acme.test>"
    msg["To"] = CUSTOMER
    msg["Subject"] = subject
    # a long Message-ID, as mail clients make them: the preview must still fit a phone
    msg["Message-ID"] = "<" + subject.replace(" ", "-") + ".179601242359.26504.580537325474187871@acme.test>"
    msg.set_content("ご確認ください。\n")
    msg.add_alternative(HOSTILE_HTML, subtype="html")
    ctx = ssl.create_default_context(cafile=str(gw.cert_path))
    with smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30) as conn:
        conn.starttls(context=ctx)
        conn.login("alice@acme.test", "alice-pw")
        try:
            conn.sendmail("alice@acme.test", [CUSTOMER], msg.as_bytes())
        except smtplib.SMTPException as exc:
            raise AssertionError(f"{exc}\n" + "\n".join(gw.log_lines[-30:])) from exc


def pending(subject: str) -> Approval:
    return wait_until(lambda: Approval.get_or_none(Approval.subject == subject), timeout=20)


def released(sink, subject: str) -> list:
    return wait_until(lambda: [m for m in sink.messages()
                               if m.rcpt_tos == [CUSTOMER] and f"Subject: {subject}".encode() in m.data], timeout=30)


def only_loopback(page) -> None:  # noqa: ANN001
    outside = [u for u in page.requests if urlsplit(u).hostname not in ("127.0.0.1", None)]
    assert outside == [], outside


def test_approve_in_the_queue_reaches_the_sink(gw, db, sink, fresh_page):
    sink.clear()
    send(gw, "Browser JP-1")
    a = pending("Browser JP-1")
    assert a.state == "pending" and not [m for m in sink.messages() if m.rcpt_tos == [CUSTOMER]]

    page = fresh_page()
    login(page, "carol@acme.test", "carol-pw", base_url=gw.url)
    page.goto(gw.url + "/approvals")
    row = page.locator(f"tr[data-approval='{a.id}']")
    assert "Browser JP-1" in row.inner_text()
    row.get_by_role("link").click()
    page.wait_for_url(f"**/approvals/{a.id}")
    # the HTML part is shown in a sandboxed frame, without its script or remote image
    frame = page.frame_locator("iframe.message-html")
    assert frame.locator("b").inner_text() == "JP"  # the sanitizer keeps the markup, drops attributes
    assert frame.locator("script, [onerror], img[src^='http']").count() == 0
    assert page.locator("iframe.message-html").get_attribute("sandbox") == ""
    assert page.title() != "pwned"
    page.click("#approve")
    page.wait_for_url("**/approvals")
    assert page.locator(".flash").count() == 1
    data = released(sink, "Browser JP-1")[0].data
    assert b"Quote" in data
    assert Approval.get_by_id(a.id).state == "approved" and Approval.get_by_id(a.id).decided_by == "carol@acme.test"
    only_loopback(page)


def test_emailed_link_on_a_phone(gw, db, sink, fresh_page):
    sink.clear()
    send(gw, "Browser JP-2")
    a = pending("Browser JP-2")
    request = wait_until(lambda: next((m for m in sink.messages() if m.rcpt_tos == ["carol@acme.test"]), None),
                         timeout=30)
    body = next(p for p in email.message_from_bytes(request.data).walk() if p.get_content_type() == "text/plain")
    text = body.get_payload(decode=True).decode(body.get_content_charset() or "utf-8")
    link = re.search(r"https?://\S+/approve\?t=[\w.-]+", text).group(0)
    parts = urlsplit(link)
    page = fresh_page()  # not signed in: the link is the credential
    page.goto(gw.url + parts.path + "?" + parts.query)
    assert page.locator("#confirm").is_visible()
    assert "Browser JP-2" in page.content()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390 + 1  # fits the phone, no sideways scroll
    assert Approval.get_by_id(a.id).state == "pending"  # the GET changed nothing
    page.reload()
    assert Approval.get_by_id(a.id).state == "pending"
    page.click("#confirm")
    page.locator("#link-done").wait_for()
    assert Approval.get_by_id(a.id).state == "approved"
    assert released(sink, "Browser JP-2")
    page.goto(gw.url + parts.path + "?" + parts.query)  # a second use
    assert page.locator("#link-error").is_visible()
    only_loopback(page)


def test_permission_denials_in_the_browser(gw, db, sink, fresh_page):
    sink.clear()
    send(gw, "Browser JP-3")
    a = pending("Browser JP-3")
    for who, password in (("alice@acme.test", "alice-pw"), ("auditor", "Pruefer-Lesen-42")):
        page = fresh_page()
        login(page, who, password, base_url=gw.url)
        page.goto(gw.url + "/approvals")
        assert page.locator(f"tr[data-approval='{a.id}']").count() == 0
        response = page.goto(gw.url + f"/approvals/{a.id}")
        assert response.status == 403
        response = page.goto(gw.url + f"/approvals/{a.id}/message.html")
        assert response.status == 403
    assert Approval.get_by_id(a.id).state == "pending"
