"""The distribution area of the panel (邮件分发) over HTTP and in Chromium, end to end:
a real node (`mailgate run` with [distribution] and the panel inside), a real Dovecot
shared mailbox fed through LMTP, the real SMTP sink behind the relay.

Role denials (salespeople, auditors, IT administrators: 403; signed out: to the sign-in
page), CSRF on every form, the undistributed list with a safe preview, dispatch by hand,
"always send" mappings, a customer from a message, the reject list (the shared copy goes
to Junk) and the filtered history — each action in the operation log.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from imapclient import IMAPClient

from gateway import oplog
from gateway.db import connect
from gateway.db.models import Customer, database
from gateway.demo.sample_data import seed
from gateway.distribute.schema import DistDelivery, DistMapping, DistReject, Distribution
from panel.auth import create_local_account
from tests.harness.gateway import GatewayProcess
from tests.panel.conftest import ACCOUNTS, PanelClient, login, wait_until

pytestmark = [pytest.mark.integration]

HOSTILE_HTML = ("<p>Angebot <b id='bold'>bitte</b></p><script>document.title='pwned'</script>"
                "<img src='http://tracker.example/pixel.gif'>")


@pytest.fixture(scope="module")
def gw(tmp_path_factory, dovecot, sink) -> Iterator[GatewayProcess]:
    base = tmp_path_factory.mktemp("dist-panel")
    rules = base / "distrules"
    rules.mkdir()
    shared = f"shared-{secrets.token_hex(4)}@acme.test"
    dovecot.add_user(shared, "pw-" + secrets.token_hex(6))
    process = GatewayProcess(base / "gw", dovecot, {"distribution": {
        "enabled": True, "mailboxes": [shared], "master_user": "archiver", "master_password": "archiver-pw",
        "initial": "all", "rules_dir": str(rules),
        # 30 s, longer than inquiry()'s wait: only IDLE can bring each inquiry in time.  (An EXISTS
        # that came in the same segment as "+ idling" used to wait for this rescan.)
        "poll_interval": 30.0}})
    connect(process.db_url)
    seed()
    for role in ("crm_admin", "auditor", "it_admin"):
        login_name, password = ACCOUNTS[role]
        create_local_account(login_name, password, (role,), name=login_name.capitalize())
    database.close()
    process.shared = shared
    process.start()
    process.url = f"http://127.0.0.1:{process.panel_port}"
    yield process
    process.stop()


@pytest.fixture
def db(gw):
    database_ = connect(gw.db_url, migrate=False)
    yield database_
    database_.close()


def client_as(gw, role: str) -> PanelClient:
    client = PanelClient(gw.url)
    resp = client.login(*ACCOUNTS[role])
    assert resp.status == 303, f"sign-in as {role} failed: {resp.status} {resp.text[:300]}"
    client.get("/")
    return client


def inquiry(gw, dovecot, sender: str, subject: str, html: str | None = None) -> Distribution:
    """Deliver a message into the shared mailbox over LMTP; return its record once the node made it."""
    mid = f"<{secrets.token_hex(8)}@{sender.rpartition('@')[2]}>"
    head = (f"From: Kunde <{sender}>\r\nTo: {gw.shared}\r\nSubject: {subject}\r\nMessage-ID: {mid}\r\n"
            "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n")
    if html is None:
        raw = head + "Content-Type: text/plain; charset=utf-8\r\n\r\nWe need 40 pumps.\r\n"
    else:
        raw = (head + 'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n--b1\r\n'
               "Content-Type: text/plain; charset=utf-8\r\n\r\nWe need 40 pumps.\r\n--b1\r\n"
               f"Content-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n--b1--\r\n")
    dovecot.deliver(gw.shared, raw.encode())

    def made() -> Distribution | None:
        database.close()  # a fresh connection sees the node's commits
        return Distribution.get_or_none(Distribution.message_id == mid)

    try:
        return wait_until(made, timeout=20)
    except TimeoutError:
        raise AssertionError(f"no distribution record for {subject!r}; the node's log ends:\n"
                             + "\n".join(gw.log_lines[-40:])) from None


def fresh(rec: Distribution) -> Distribution:
    database.close()
    return Distribution.get_by_id(rec.id)


def forwarded_to(sink, subject: str, rcpt: str) -> list:
    return wait_until(lambda: [m for m in sink.messages()
                               if m.rcpt_tos == [rcpt] and f"Subject: {subject}".encode() in m.data], timeout=30)


def actions(actor: str) -> list[str]:
    database.close()
    return [r.action for r in oplog.search(actor=actor, limit=50)[0]]


def test_roles_and_signed_out(gw, db) -> None:
    for role in ("salesperson", "auditor", "it_admin"):
        client = client_as(gw, role)
        for path in ("/distribution", "/distribution/history", "/distribution/lists"):
            assert client.get(path).status == 403, (role, path)
        assert client.post("/distribution/lists/reject", {"key": "x@deny.example"}).status == 403
        assert "/distribution" not in client.get("/").text  # no menu entry
    assert DistReject.get_or_none(DistReject.key == "x@deny.example") is None
    anon = PanelClient(gw.url)
    resp = anon.get("/distribution")
    assert resp.status == 303 and "/login" in resp.header("location")
    for role in ("dept_head", "crm_admin"):
        client = client_as(gw, role)
        page = client.get("/distribution")
        assert page.status == 200 and 'href="/distribution"' in page.text


def test_csrf_is_required(gw, db, dovecot) -> None:
    client = client_as(gw, "crm_admin")
    rec = inquiry(gw, dovecot, f"who@csrf-{secrets.token_hex(3)}.example", "CSRF probe")
    client.get(f"/distribution/{rec.id}")
    for path, data in ((f"/distribution/{rec.id}/dispatch", {"employee": "bob@acme.test"}),
                       (f"/distribution/{rec.id}/reject", {"key": rec.from_addr}),
                       (f"/distribution/{rec.id}/mapping", {"key": rec.from_addr, "employee": "bob@acme.test"}),
                       ("/distribution/lists/reject", {"key": "nocsrf@deny.example"})):
        assert client.post(path, data, csrf=False).status == 403, path
        assert client.post(path, data, csrf="forged-token").status == 403, path
    assert fresh(rec).state == "undistributed"
    assert DistReject.select().where(DistReject.key.in_(["nocsrf@deny.example", rec.from_addr])).count() == 0
    assert DistMapping.get_or_none(DistMapping.key == rec.from_addr) is None


def test_preview_and_dispatch_over_http(gw, db, dovecot, sink) -> None:
    sink.clear()
    subject = "Anfrage <b>Pumpen</b> " + secrets.token_hex(3)
    rec = inquiry(gw, dovecot, f"einkauf@newco-{secrets.token_hex(3)}.example", subject, html=HOSTILE_HTML)
    assert rec.state == "undistributed" and rec.step == "none"
    client = client_as(gw, "dept_head")
    listing = client.get("/distribution")
    assert f'data-record="{rec.id}"' in listing.text
    assert "Anfrage &lt;b&gt;Pumpen&lt;/b&gt;" in listing.text and "<b>Pumpen</b>" not in listing.text
    detail = client.get(f"/distribution/{rec.id}")
    assert detail.status == 200 and "We need 40 pumps." in detail.text
    assert 'iframe class="message-html"' in detail.text and "<script>" not in detail.text
    frame = client.get(f"/distribution/{rec.id}/message.html")
    assert frame.status == 200 and "default-src 'none'" in frame.header("content-security-policy")
    assert "<b>bitte</b>" in frame.text and "<script" not in frame.text and "tracker.example" not in frame.text
    # dispatch to bob
    resp = client.post(f"/distribution/{rec.id}/dispatch", {"employee": "bob@acme.test", "note": "pumps"})
    assert resp.status == 303 and resp.header("location").endswith("/distribution")
    rec = fresh(rec)
    assert (rec.state, rec.step, rec.actor) == ("distributed", "manual", "carol@acme.test")
    assert [d.employee.email for d in DistDelivery.select().where(DistDelivery.distribution == rec)] == [
        "bob@acme.test"]
    data = forwarded_to(sink, subject, "bob@acme.test")[0].data
    assert b"Resent-To: bob@acme.test" in data and f"Resent-From: {gw.shared}".encode() in data
    assert "distribution.dispatch" in actions("carol@acme.test")
    # a second dispatch of the same message is refused, nothing more is sent
    again = client.post(f"/distribution/{rec.id}/dispatch", {"employee": "alice@acme.test"}, follow=True)
    assert again.status == 200 and "这封邮件已处理" in again.text
    assert DistDelivery.select().where(DistDelivery.distribution == rec).count() == 1
    # and it is no longer in the undistributed list
    assert f'data-record="{rec.id}"' not in client.get("/distribution").text


def test_mapping_customer_and_reject(gw, db, dovecot) -> None:
    client = client_as(gw, "crm_admin")
    domain = f"mapped-{secrets.token_hex(3)}.example"
    rec = inquiry(gw, dovecot, f"a@{domain}", "Mapping probe")
    # a key that does not cover the sender is refused
    refused = client.post(f"/distribution/{rec.id}/mapping", {"key": "other.example", "employee": "alice@acme.test"},
                          follow=True)
    assert refused.status == 200 and "does not cover the sender" in refused.text
    assert DistMapping.get_or_none(DistMapping.key == "other.example") is None
    resp = client.post(f"/distribution/{rec.id}/mapping",
                       {"key": domain, "employee": "alice@acme.test", "also_dispatch": "1"})
    assert resp.status == 303, "\n".join(gw.log_lines[-30:])
    assert DistMapping.get(DistMapping.key == domain).employee.email == "alice@acme.test"
    assert fresh(rec).state == "distributed"
    follow_up = inquiry(gw, dovecot, f"b@{domain}", "Mapped follow-up")
    assert (follow_up.step, follow_up.state) == ("mapping", "distributed")
    # a customer from a message
    lead = inquiry(gw, dovecot, f"ceo@lead-{secrets.token_hex(3)}.example", "Customer probe")
    name = "Lead Co " + secrets.token_hex(2)
    made = client.post(f"/distribution/{lead.id}/customer", {"name": name, "owner": "bob@acme.test", "use_domain": "1"},
                       follow=True)
    assert made.status == 200 and name in made.text, made.text[-3000:]
    database.close()
    customer = Customer.get(Customer.name == name)
    assert {c.email for c in customer.contacts} == {lead.from_addr}
    # the reject list: the record is retired and the shared copy moved to Junk
    spam_domain = f"spam-{secrets.token_hex(3)}.example"
    spam = inquiry(gw, dovecot, f"promo@{spam_domain}", "Buy now")
    resp = client.post(f"/distribution/{spam.id}/reject", {"key": spam_domain, "note": "spam"})
    assert resp.status == 303
    assert fresh(spam).state == "rejected" and DistReject.get_or_none(DistReject.key == spam_domain) is not None
    imap = IMAPClient(dovecot.host, port=dovecot.imaps_port, ssl_context=dovecot.ssl_context())
    imap.login(f"{gw.shared}*archiver", "archiver-pw")
    imap.select_folder("Junk", readonly=True)
    assert imap.search(["HEADER", "Subject", "Buy now"])
    imap.logout()
    later = inquiry(gw, dovecot, f"again@{spam_domain}", "Buy more")
    assert (later.state, later.step) == ("rejected", "reject")
    done = set(actions("crm"))
    assert {"distribution.mapping.set", "distribution.dispatch", "distribution.customer.create",
            "distribution.reject.add", "distribution.reject.message"} <= done
    # the lists page shows both; removing works
    lists = client.get("/distribution/lists").text
    assert domain in lists and spam_domain in lists
    client.post("/distribution/lists/reject/remove", {"key": spam_domain})
    assert DistReject.get_or_none(DistReject.key == spam_domain) is None
    assert "distribution.reject.remove" in actions("crm")


def test_history_filters(gw, db, dovecot) -> None:
    client = client_as(gw, "dept_head")
    rejected = inquiry(gw, dovecot, f"x@hist-{secrets.token_hex(3)}.example", "History probe")
    client.get(f"/distribution/{rejected.id}")
    client.post(f"/distribution/{rejected.id}/reject", {"key": rejected.from_addr})
    only_rejected = client.get("/distribution/history?state=rejected").text
    assert f'data-record="{rejected.id}"' in only_rejected
    assert 'badge state-distributed' not in only_rejected
    by_sender = client.get("/distribution/history?sender=" + rejected.from_addr).text
    assert by_sender.count("data-record=") == 1
    none_bob = client.get(f"/distribution/history?employee=bob%40acme.test&sender={rejected.from_addr}").text
    assert "data-record=" not in none_bob
    bad = client.get("/distribution/history?since=yesterday")
    assert bad.status == 200 and 'role="alert"' in bad.text


@pytest.mark.browser
def test_manual_dispatch_in_the_browser(gw, db, dovecot, sink, browser) -> None:
    sink.clear()
    subject = "Browser inquiry " + secrets.token_hex(3)
    rec = inquiry(gw, dovecot, f"buyer@browser-{secrets.token_hex(3)}.example", subject, html=HOSTILE_HTML)
    ctx = browser.new_context(viewport={"width": 1280, "height": 800}, locale="zh-CN")
    ctx.set_default_timeout(15000)
    try:
        page = ctx.new_page()
        login(page, *ACCOUNTS["dept_head"], base_url=gw.url)
        page.goto(gw.url + "/distribution")
        row = page.locator(f"tr[data-record='{rec.id}']")
        assert subject in row.inner_text()
        row.get_by_role("link").click()
        page.wait_for_url(f"**/distribution/{rec.id}")
        assert page.locator("#message-text").inner_text().strip() == "We need 40 pumps."
        assert page.frame_locator("iframe.message-html").locator("b").inner_text() == "bitte"
        assert page.title() != "pwned"
        page.select_option("#dispatch-employee", "bob@acme.test")
        page.click("#dispatch")
        page.wait_for_url("**/distribution")
        assert "bob@acme.test" in page.locator(".flash").inner_text()
        assert page.locator(f"tr[data-record='{rec.id}']").count() == 0
    finally:
        ctx.close()
    rec = fresh(rec)
    assert (rec.state, rec.step, rec.actor) == ("distributed", "manual", "carol@acme.test")
    data = forwarded_to(sink, subject, "bob@acme.test")[0].data
    assert b"Resent-To: bob@acme.test" in data and b"Reply-To: " + rec.from_addr.encode() in data
