"""An attacker's view of the panel.

1. Over HTTP against the real panel (``panel_server``), from the app's own route table, so a
   route added later is covered too: every route that names roles answers 403 to each test
   account without one of them (a salesperson calling a manager's or auditor's URL directly);
   no route is open to the signed-out except the known public ones; every POST route refuses a
   request without the CSRF token or with another session's, before it does anything.
2. In Chromium against a running gateway with the panel inside: a salesperson sends mail with
   markup in the subject, the From display name, an attachment's name and the body; the
   manager (approval queue, the held message, the dashboard's blocked sends) and the auditor
   (archive search, the record) look at it.  Nothing of it may become markup or run.

(Per-area role and CSRF tests with real data are in the area test files; the sign-in lockout in
test_core_auth.py.)
"""

from __future__ import annotations

import re
import shutil
import smtplib
import ssl

import pytest

from gateway.config import load
from gateway.db import connect
from gateway.demo.sample_data import seed
from panel.auth import create_local_account
from panel.i18n import CATALOG
from tests.harness.gateway import REPO, GatewayProcess
from tests.panel.conftest import PanelClient, login, wait_until

pytestmark = [pytest.mark.integration]

ROLES_OF = {  # the test accounts' roles (tests/panel/conftest.py, gateway/demo/sample_data.py)
    "salesperson": {"salesperson"},
    "dept_head": {"salesperson", "dept_head"},
    "crm_admin": {"crm_admin"},
    "auditor": {"auditor"},
    "it_admin": {"it_admin"},
}
# Routes without a role decorator: public, or signed in by a token of their own (the e-mailed
# approval link), or checking who may see what inside (approvals: test_approvals.py).
PUBLIC = {("GET", "/login"), ("POST", "/login"), ("POST", "/logout"), ("GET", "/static/<path:path>"),
          ("GET", "/healthz"), ("GET", "/approvals/approve"), ("POST", "/approvals/approve"),
          ("GET", "/approvals/reject"), ("POST", "/approvals/reject"), ("GET", "/approvals/message.html")}
ANY_SIGNED_IN = {("GET", "/"), ("GET", "/approvals"), ("GET", "/approvals/<approval_id:int>"),
                 ("GET", "/approvals/<approval_id:int>/message.html"),
                 ("POST", "/approvals/<approval_id:int>/decide")}


def routes(panel_server) -> list[tuple[str, str, tuple[str, ...] | None]]:
    """(method, rule, required roles or None) of every route of the panel's app."""
    from panel.app import create_app

    app = create_app(load(panel_server.config_path))
    return [(r.method, r.rule, getattr(r.callback, "required_roles", None)) for r in app.routes]


def concrete(rule: str) -> str:
    """A URL for a rule: every wildcard filled in (an id of 1, a token, the csv format)."""
    def fill(m: re.Match) -> str:
        spec = m.group(0)
        if ":int" in spec:
            return "1"
        if ":re:" in spec:
            return spec.split(":re:")[1].rstrip(">").split("|")[0]
        return "x" * 8
    return re.sub(r"<[^>]+>", fill, rule)


def test_every_route_is_either_role_guarded_or_known(panel_server):
    table = routes(panel_server)
    unguarded = {(m, r) for m, r, roles in table if roles is None}
    any_user = {(m, r) for m, r, roles in table if roles == ()}
    assert unguarded == PUBLIC, "a route without @require: add the role check, or list it here on purpose"
    assert any_user == ANY_SIGNED_IN
    assert len(table) > 60  # the areas were loaded


@pytest.mark.parametrize("role", sorted(ROLES_OF))
def test_every_route_refuses_a_role_it_does_not_name(panel_server, http_as, role):
    client = http_as(role)
    refused, allowed = [], []
    for method, rule, roles in routes(panel_server):
        if not roles or ROLES_OF[role] & set(roles):
            continue
        url = concrete(rule)
        resp = client.get(url) if method == "GET" else client.post(url, {"name": "x", "action": "approve"})
        (refused if resp.status == 403 else allowed).append(f"{method} {url} -> {resp.status}")
    assert not allowed, f"{role} reached: {allowed}"
    if role in ("salesperson", "auditor"):  # the brief's case: they are refused the managers' pages
        assert any("/employees/new" in r for r in refused) and any("/rules" in r for r in refused)
    if role == "salesperson":
        assert any(r.startswith("GET /archive/1 ") for r in refused)
        assert any("/customers/handover" in r for r in refused)


def test_signed_out_every_guarded_route_sends_to_the_sign_in(panel_url, panel_server):
    client = PanelClient(panel_url)
    client.get("/login")  # a pre-session CSRF cookie and token, as a visitor would have
    for method, rule, roles in routes(panel_server):
        if roles is None:
            continue
        url = concrete(rule)
        resp = client.get(url) if method == "GET" else client.post(url, {"name": "x"})
        if method == "GET":
            assert resp.status == 303 and "/login" in resp.header("location"), (url, resp.status)
        else:  # the CSRF check comes first (a visitor's token is no session's), or the sign-in
            assert resp.status in (303, 403), (url, resp.status)


CSRF_TEXTS = {CATALOG[lang]["error.csrf"] for lang in CATALOG}


@pytest.mark.parametrize("forged", [None, "", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "other-session"])
def test_every_post_route_refuses_a_missing_or_foreign_csrf_token(panel_server, http_as, forged):
    """For each POST route, as an account the route admits (so the refusal is the CSRF check's)."""
    other = http_as("it_admin").csrf if forged == "other-session" else forged
    clients: dict[str, PanelClient] = {}
    checked = []
    for method, rule, roles in routes(panel_server):
        if method != "POST" or rule in ("/login",):
            continue
        role = next((r for r in sorted(ROLES_OF) if roles and ROLES_OF[r] & set(roles)), "dept_head")
        if roles is None:
            role = "dept_head"
        client = clients.get(role) or clients.setdefault(role, http_as(role))
        url = concrete(rule)
        fields = {"name": "CSRF sweep", "action": "approve"}
        resp = client.post(url, fields, csrf=False) if other is None else client.post(url, fields, csrf=other)
        assert resp.status == 403, (url, role, resp.status)
        assert any(text in resp.text for text in CSRF_TEXTS), (url, resp.text[:300])
        checked.append(url)
    assert "/logout" in checked and "/customers/new" in checked and "/rules/dryrun" in checked
    # The sessions were not ended by the refused /logout: still signed in.
    assert all(c.get("/").status == 200 for c in clients.values())


# -- XSS: hostile mail through a running gateway, looked at in Chromium -------------------------

MARK = "XSSMARK7"
SCRIPT = "<script>document.title='pwned'</script>"
IMG = "<img src=x onerror=\"document.title='pwned'\">"
HOLD_RULE = """
rules:
  - name: hold-japan-xss
    priority: 50
    conditions:
      recipient-country: [JP]
    actions:
      - hold_for_approval: {approvers: [manager], reason: "Japan: manager approval"}
"""


def hostile_message(to: str, tag: str) -> bytes:
    subject = f"{MARK} {tag} \"><svg onload=\"document.title='pwned'\">{SCRIPT}"
    return (
        f"From: \"{MARK} {SCRIPT}\" <alice@acme.test>\r\n"
        f"To: \"{IMG}\" <{to}>\r\n"
        f"Subject: {subject}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: multipart/mixed; boundary=b1\r\n\r\n"
        "--b1\r\nContent-Type: multipart/alternative; boundary=b2\r\n\r\n"
        f"--b2\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{MARK} plain {SCRIPT} {IMG}\r\n"
        f"--b2\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>{MARK} html</p>{SCRIPT}{IMG}"
        "<a href=\"javascript:document.title='pwned'\">x</a><iframe src=\"javascript:parent.document.title='pwned'\">"
        "</iframe>\r\n"
        "--b2--\r\n"
        f"--b1\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"{IMG}.pdf\"\r\n\r\n"
        "%PDF-1.4\r\n--b1--\r\n"
    ).encode()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, dovecot, sink):
    base = tmp_path_factory.mktemp("attack-panel")
    rules = base / "rules"
    shutil.copytree(REPO / "rules", rules)
    (rules / "70-hold-japan-xss.yaml").write_text(HOLD_RULE)
    process = GatewayProcess(base / "gw", dovecot, {"rules": {"dir": str(rules)}, "archive": {"index_lag": 0}})
    connect(process.db_url)
    seed()
    create_local_account("auditor", "Pruefer-Lesen-42", ("auditor",), name="Auditor")
    process.start()
    process.url = f"http://127.0.0.1:{process.panel_port}"
    yield process
    process.stop()


def submit(gw: GatewayProcess, to: str, raw: bytes) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(gw.cert_path))
    with smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30) as conn:
        conn.starttls(context=ctx)
        conn.login("alice@acme.test", "alice-pw")
        conn.mail("alice@acme.test")
        assert conn.rcpt(to)[0] == 250
        return conn.data(raw)


@pytest.fixture(scope="module")
def hostile(gw):
    """One hostile message held for approval, one refused (send-conflict: a colleague's customer)."""
    from gateway.archive.schema import ArchiveRecord
    from gateway.db.models import Approval

    db = connect(gw.db_url, migrate=False)
    code, text = submit(gw, "tanaka@osaka-machinery.jp", hostile_message("tanaka@osaka-machinery.jp", "held"))
    assert code == 250, text
    code, text = submit(gw, "lagos.imports@gmail.com", hostile_message("lagos.imports@gmail.com", "refused"))
    assert code == 550, text
    approval = wait_until(lambda: Approval.get_or_none(Approval.subject.contains(f"{MARK} held")), timeout=20)
    wait_until(lambda: ArchiveRecord.select().where(ArchiveRecord.subject.contains(MARK)).count() >= 2, timeout=20)
    db.close()
    return approval.id


def watch(page) -> list[str]:  # noqa: ANN001
    """Dialogs and console messages of a page (a script that ran would show up there)."""
    events: list[str] = []
    page.on("dialog", lambda d: (events.append("dialog " + d.message), d.dismiss()))
    page.on("console", lambda m: events.append(f"console {m.type}: {m.text}") if "pwned" in m.text else None)
    return events


def assert_inert(page, response, shown: bool = True) -> None:  # noqa: ANN001
    """Nothing hostile became markup, and nothing ran, in the page or any of its frames."""
    assert response.status == 200, (page.url, response.status)
    html = response.text()
    for bad in (SCRIPT, "<svg onload", "<img src=x", "onerror=\"document"):
        assert bad not in html, (page.url, bad)
    if shown:  # the page does show the hostile text: as text
        assert MARK in page.inner_text("body"), page.url
    for frame in page.frames:
        assert frame.evaluate("document.title") != "pwned", frame.url
        live = "script:not([src]), [onerror], [onload], iframe[src^='javascript'], a[href^='javascript']"
        assert frame.locator(live).count() == 0, frame.url


@pytest.mark.browser
def test_manager_views_hostile_mail_inert(gw, hostile, new_page):
    approval_id = hostile
    page = new_page()
    events = watch(page)
    login(page, "carol@acme.test", "carol-pw", base_url=gw.url)
    assert_inert(page, page.goto(gw.url + "/approvals"))
    assert_inert(page, page.goto(gw.url + f"/approvals/{approval_id}"))
    # The sandboxed HTML part: loaded, its text there, its markup gone.
    frame = page.frame_locator("iframe.message-html")
    assert MARK in frame.locator("body").inner_text()
    assert_inert(page, page.goto(gw.url + f"/approvals/{approval_id}/message.html"))
    assert_inert(page, page.goto(gw.url + "/dashboard"))  # the blocked send's subject and sender
    assert page.title() != "pwned" and events == [], events


@pytest.mark.browser
def test_auditor_views_hostile_mail_inert(gw, hostile, new_page):
    page = new_page()
    events = watch(page)
    login(page, "auditor", "Pruefer-Lesen-42", base_url=gw.url)
    assert_inert(page, page.goto(gw.url + "/archive"), shown=False)
    page.fill("#archive-q", MARK)
    with page.expect_response(lambda r: "/archive?" in r.url) as info:
        page.click("#archive-search button[type=submit]")
    page.wait_for_selector("#archive-results")
    assert_inert(page, info.value)
    rows = page.locator("#archive-results tbody tr")
    # the two messages, and the approval request and notice that quote the held one's subject
    record_ids = [rows.nth(i).get_attribute("data-record") for i in range(rows.count())]
    assert len(record_ids) >= 2, record_ids
    for record_id in record_ids:
        assert_inert(page, page.goto(gw.url + f"/archive/{record_id}"))
        assert_inert(page, page.goto(gw.url + f"/archive/{record_id}/message.html"), shown=False)  # may have no HTML
    assert page.title() != "pwned" and events == [], events


# -- secrets (last: the panel's and the gateway's logs after the sign-ins above) -----------------

def test_no_secret_in_the_panel_logs(panel_server, panel_url, http_as, gw):
    from tests.panel.conftest import ACCOUNTS

    stranger = PanelClient(panel_url)
    assert stranger.login("nobody-h5", "Wr0ng-Panel-Pw-h5").status == 401
    client = http_as("auditor")
    tokens = [client.cookie(name) for name in ("mg_session", "mg_csrf")] + [client.csrf]
    log = panel_server.log_text() + "\n" + gw.log_text()
    assert "panel sign-in failed login='nobody-h5'" in log and "panel sign-in ok" in log  # the logs meant
    secrets = [pw for _, pw in ACCOUNTS.values()] + ["Wr0ng-Panel-Pw-h5"] + [t for t in tokens if t]
    assert len(secrets) >= 8
    found = [s for s in secrets if s in log]
    assert not found, f"secrets in the panel's log: {found}"
