"""Sign-in, sign-out, rate limiting and session expiry against the real panel process."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from tests.panel.conftest import ACCOUNTS, PanelClient, login

pytestmark = pytest.mark.integration


def _session_row(client: PanelClient):  # noqa: ANN202
    from panel.schema import PanelSession
    from panel.sessions import token_hash

    token = client.cookie("mg_session")
    assert token
    return PanelSession.get_or_none(PanelSession.token_hash == token_hash(token))


@pytest.mark.browser
@pytest.mark.parametrize("role", list(ACCOUNTS))
def test_each_role_signs_in_in_the_browser(role, page_as):
    page = page_as(role)
    assert page.url.endswith("/")
    assert page.locator("h1").inner_text().startswith("欢迎")
    nav = page.locator("nav.nav").inner_text()
    # The employees area is in the navigation exactly for the roles that may open it.
    assert ("员工与部门" in nav) == (role in ("dept_head", "crm_admin", "it_admin", "auditor"))
    assert page.locator(".userbox .who").inner_text()


@pytest.mark.browser
def test_wrong_password_shows_a_clear_error_in_the_browser(new_page, panel_url):
    page = new_page()
    login(page, "alice@acme.test", "not-her-password", base_url=panel_url)
    assert "/login" in page.url
    assert page.locator("#login-error").inner_text() == "账号或密码错误。"
    assert page.input_value("input[name=login]") == "alice@acme.test"
    assert page.input_value("input[name=password]") == ""


def test_wrong_password_for_employee_and_local_account(anon_client):
    r = anon_client.login("bob@acme.test", "wrong")
    assert r.status == 401 and "账号或密码错误" in r.text
    r = anon_client.login("nobody-here", "wrong-password")
    assert r.status == 401 and "账号或密码错误" in r.text
    r = anon_client.login("unknown@acme.test", "whatever")
    assert r.status == 401
    assert anon_client.cookie("mg_session") is None


def test_repeated_failures_lock_the_login_even_for_the_right_password(panel_db, panel_url):
    from panel.auth import create_local_account

    create_local_account("locktest", "Sehr-geheim-2026", ("auditor",))
    client = PanelClient(panel_url)
    for _ in range(3):  # the test panel's login_max_failures
        assert client.login("locktest", "wrong password").status == 401
    r = client.login("locktest", "Sehr-geheim-2026")
    assert r.status == 429
    assert "登录失败次数过多" in r.text and "秒后再试" in r.text
    assert client.cookie("mg_session") is None
    # Another login from the same address is not affected.
    other = PanelClient(panel_url)
    assert other.login(*ACCOUNTS["auditor"]).status == 303


def test_shared_mailbox_and_inactive_employee_cannot_sign_in(anon_client, panel_db):
    from gateway.db.models import Employee

    r = anon_client.login("sales@acme.test", "sales-pw")  # right password, no panel role
    assert r.status == 403 and "没有管理面板的权限" in r.text
    relay = anon_client.login("relay@acme.test", "relay-pw")  # a mailbox, not an employee
    assert relay.status == 401
    assert Employee.get(Employee.email == "sales@acme.test").active


def test_logout_ends_the_session(http_as, panel_db):
    client = http_as("it_admin")
    token_row = _session_row(client)
    assert token_row is not None
    assert client.get("/").status == 200
    r = client.post("/logout")
    assert r.status == 303 and r.header("location").endswith("/login?bye=1")
    assert _session_row_gone(token_row.id)
    r = client.get("/")
    assert r.status == 303 and "/login?next=/" in r.header("location")


def _session_row_gone(row_id: int) -> bool:
    from panel.schema import PanelSession

    return PanelSession.get_or_none(PanelSession.id == row_id) is None


def test_logout_needs_the_csrf_token(http_as, panel_db):
    client = http_as("auditor")
    r = client.post("/logout", csrf=False)
    assert r.status == 403
    assert _session_row(client) is not None
    assert client.get("/").status == 200


def test_idle_session_expires(http_as, panel_db):
    from gateway.db.models import utcnow
    from panel.schema import PanelSession

    client = http_as("dept_head")
    row = _session_row(client)
    PanelSession.update(last_seen=utcnow() - dt.timedelta(minutes=31)).where(PanelSession.id == row.id).execute()
    r = client.get("/employees")
    assert r.status == 303
    assert "/login?next=/employees" in r.header("location") and "expired=1" in r.header("location")
    assert _session_row_gone(row.id)
    page = client.get(r.header("location").replace(client.base_url, ""))
    assert "会话已过期" in page.text


def test_active_session_is_kept_alive_and_absolute_lifetime_ends_it(http_as, panel_db):
    from gateway.db.models import utcnow
    from panel.schema import PanelSession

    client = http_as("crm_admin")
    row = _session_row(client)
    PanelSession.update(last_seen=utcnow() - dt.timedelta(minutes=29)).where(PanelSession.id == row.id).execute()
    assert client.get("/").status == 200
    assert PanelSession.get_by_id(row.id).last_seen > utcnow() - dt.timedelta(minutes=1)  # touched
    PanelSession.update(created_at=utcnow() - dt.timedelta(hours=13)).where(PanelSession.id == row.id).execute()
    assert client.get("/").status == 303
    assert _session_row_gone(row.id)


def test_session_cookie_flags_and_only_a_hash_is_stored(panel_url, panel_db):
    from panel.schema import PanelSession

    client = PanelClient(panel_url)
    client.get("/login")
    r = client.post("/login", {"login": ACCOUNTS["auditor"][0], "password": ACCOUNTS["auditor"][1]})
    cookie = r.header("set-cookie")
    assert cookie.startswith("mg_session=") and "HttpOnly" in cookie and "SameSite=lax" in cookie.replace("Lax", "lax")
    token = client.cookie("mg_session")
    assert not PanelSession.select().where(PanelSession.token_hash == token).exists()
    assert _session_row(client) is not None


def test_sign_in_replaces_an_existing_session_token(http_as, panel_db):
    client = http_as("it_admin")
    first = client.cookie("mg_session")
    first_row = _session_row(client)
    client.get("/login")  # signed in: redirected, the CSRF token stays the session's
    assert client.post("/login", {"login": ACCOUNTS["it_admin"][0],
                                  "password": ACCOUNTS["it_admin"][1]}).status == 303
    assert client.cookie("mg_session") != first
    # The old token no longer opens a session (SQLite may reuse the row id, so look it up by hash).
    from panel.schema import PanelSession
    from panel.sessions import token_hash

    assert first_row is not None
    assert PanelSession.get_or_none(PanelSession.token_hash == token_hash(first)) is None


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example"])
def test_sign_in_never_redirects_off_site(anon_client, target):
    anon_client.get("/login")
    r = anon_client.post("/login", {"login": ACCOUNTS["auditor"][0], "password": ACCOUNTS["auditor"][1],
                                    "next": target})
    assert r.status == 303
    assert r.header("location") == anon_client.base_url + "/"


def test_sign_in_returns_to_the_page_asked_for(anon_client):
    r = anon_client.get("/employees?status=all")
    assert r.status == 303
    anon_client.get(r.header("location").replace(anon_client.base_url, ""))
    r = anon_client.post("/login", {"login": ACCOUNTS["it_admin"][0], "password": ACCOUNTS["it_admin"][1],
                                    "next": "/employees?status=all"})
    assert r.header("location") == anon_client.base_url + "/employees?status=all"


def test_signins_are_in_the_operation_log(http_as, panel_db):
    from gateway.db.models import AuditLog

    http_as("auditor")
    entry = AuditLog.select().where(AuditLog.action == "panel.signin").order_by(AuditLog.id.desc()).first()
    assert entry is not None and entry.actor == "local:auditor"


@pytest.mark.browser
def test_forged_form_without_the_csrf_token_is_refused_in_the_browser(page_as, panel_db):
    """A signed-in browser submits a form whose CSRF token was removed or replaced: 403, nothing changes."""
    from gateway.db.models import Department

    page = page_as("it_admin")
    page.goto(page.url.rstrip("/") + "/employees/departments")
    for token in (None, "forged-token-forged-token-forged"):
        name = f"CSRF probe {token is None}"
        page.fill("form[action='/employees/departments/new'] input[name=name]", name)
        if token is None:
            page.eval_on_selector("form[action='/employees/departments/new'] input[name=csrf_token]",
                                  "e => e.remove()")
        else:
            page.eval_on_selector("form[action='/employees/departments/new'] input[name=csrf_token]",
                                  f"e => e.value = '{token}'")
        with page.expect_navigation() as nav:
            page.click("form[action='/employees/departments/new'] button[type=submit]")
        assert nav.value.status == 403
        assert "安全校验失败" in page.content()
        assert not Department.select().where(Department.name == name).exists()
        page.go_back()


@pytest.mark.browser
def test_cross_site_post_does_not_carry_the_session(page_as, panel_url, panel_db):
    """A page of another site posting a form to the panel: SameSite keeps the session cookie
    out, so the request counts as signed out (no token either) and changes nothing."""
    from gateway.db.models import Department

    page = page_as("it_admin")
    page.goto("about:blank")  # not the panel's origin
    page.set_content(f"<form method='post' action='{panel_url}/employees/departments/new'>"
                     "<input name='name' value='Cross site probe'><button id='go'>go</button></form>")
    with page.expect_navigation() as nav:
        page.click("#go")
    assert nav.value.status == 403
    assert not Department.select().where(Department.name == "Cross site probe").exists()


def _mailgate(panel_server, *args: str, stdin: str = ""):  # noqa: ANN202
    import subprocess
    import sys

    from tests.harness.gateway import REPO

    return subprocess.run([sys.executable, "-m", "gateway.cli", "-c", str(panel_server.config_path), "panel", *args],
                          cwd=REPO, input=stdin, capture_output=True, text=True, timeout=60)


def test_local_accounts_from_the_command_line(panel_server, panel_url, panel_db):
    """`mailgate panel adduser | passwd | users`: weak passwords refused, new account signs in,
    a password change signs its sessions out."""
    weak = _mailgate(panel_server, "adduser", "cliuser", "--role", "auditor", "--password-stdin", stdin="short\n")
    assert weak.returncode == 1 and "at least 10" in weak.stderr
    made = _mailgate(panel_server, "adduser", "cliuser", "--role", "auditor,it_admin", "--name", "CLI User",
                     "--password-stdin", stdin="Kommando-Zeile-31\n")
    assert made.returncode == 0, made.stderr
    listed = _mailgate(panel_server, "users")
    assert re.search(r"^cliuser\s+active\s+auditor,it_admin\s+CLI User$", listed.stdout, re.M)
    client = PanelClient(panel_url)
    assert client.login("cliuser", "Kommando-Zeile-31").status == 303
    assert client.get("/rules").status == 200  # it_admin
    changed = _mailgate(panel_server, "passwd", "cliuser", "--password-stdin", stdin="Neues-Passwort-77\n")
    assert changed.returncode == 0 and "1 session(s) signed out" in changed.stdout
    assert client.get("/").status == 303  # signed out
    assert PanelClient(panel_url).login("cliuser", "Kommando-Zeile-31").status == 401
    assert PanelClient(panel_url).login("cliuser", "Neues-Passwort-77").status == 303
    log = panel_server.log_text()
    assert "cliuser" in log and "Neues-Passwort-77" not in log and "Kommando-Zeile-31" not in log  # never logged


def _wsgi(app, method: str, path: str, form: dict | None = None, cookies: dict | None = None):  # noqa: ANN001, ANN202
    """One request straight into the WSGI app: (status, headers as a list, body)."""
    import io
    import urllib.parse
    from wsgiref.util import setup_testing_defaults

    body = urllib.parse.urlencode(form or {}).encode()
    environ: dict = {}
    setup_testing_defaults(environ)
    environ.update({"REQUEST_METHOD": method, "PATH_INFO": path, "wsgi.input": io.BytesIO(body),
                    "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "application/x-www-form-urlencoded",
                    "REMOTE_ADDR": "127.0.0.1",
                    "HTTP_COOKIE": "; ".join(f"{k}={v}" for k, v in (cookies or {}).items())})
    result = {}

    def start_response(status, headers, exc_info=None):  # noqa: ANN001, ANN202
        result["status"], result["headers"] = status, headers

    text = b"".join(app(environ, start_response)).decode()
    return int(result["status"].split()[0]), result["headers"], text


def test_cookies_are_secure_behind_tls(panel_server, panel_db):
    """With `[panel] cookie_secure` (or tls) every cookie the panel sets carries Secure."""
    from gateway.config import load
    from panel.app import create_app

    cfg = load(panel_server.config_path)
    cfg.panel.cookie_secure = True
    app = create_app(cfg)
    status, headers, text = _wsgi(app, "GET", "/login")
    pre = [v for k, v in headers if k.lower() == "set-cookie" and v.startswith("mg_csrf=")]
    assert status == 200 and pre and "Secure" in pre[0] and "HttpOnly" in pre[0]
    token = re.search(r'name="csrf_token" value="([^"]+)"', text).group(1)
    status, headers, _ = _wsgi(app, "POST", "/login", {"login": "auditor", "password": ACCOUNTS["auditor"][1],
                                                       "csrf_token": token}, {"mg_csrf": token})
    session = [v for k, v in headers if k.lower() == "set-cookie" and v.startswith("mg_session=")]
    assert status == 303 and session
    assert "Secure" in session[0] and "HttpOnly" in session[0] and "samesite=lax" in session[0].lower()
    names = {k.lower() for k, _ in headers}
    assert {"content-security-policy", "x-frame-options", "x-content-type-options"} <= names
