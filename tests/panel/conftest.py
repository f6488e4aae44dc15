"""Fixtures for the panel's tests: a real panel process, HTTP clients and a real browser.

``panel_server`` (session): `mailgate panel serve` as a subprocess, on a fresh SQLite
DB with the sample data (gateway/demo/sample_data.py) and local accounts, signing
employees in against the real ``dovecot`` fixture.  Accounts (``ACCOUNTS[role]``):

  salesperson  alice@acme.test / alice-pw   (employee; bob@acme.test / bob-pw too)
  dept_head    carol@acme.test / carol-pw   (employee; heads "Sales Europe")
  crm_admin    crm / Kunden-Verwalter-7    (local account)
  auditor      auditor / Pruefer-Lesen-42    (local account)
  it_admin     admin / Sys-Technik-99     (local account)

``http_as(role)`` → a signed-in ``PanelClient`` (urllib, cookie jar, CSRF token sent
automatically on POST; redirects are not followed unless asked).  ``panel_db`` binds
this test process's models to the panel's DB (to seed rows or age a session).
``browser`` (session) is Debian's Chromium through Playwright; ``page_as(role)`` gives a
signed-in page; ``login(page, login, password)`` fills the sign-in form.
"""

from __future__ import annotations

import http.cookiejar
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness import wait_until  # noqa: F401 - re-exported for the panel tests
from tests.harness.gateway import REPO, write_config

ACCOUNTS: dict[str, tuple[str, str]] = {
    "salesperson": ("alice@acme.test", "alice-pw"),
    "dept_head": ("carol@acme.test", "carol-pw"),
    "crm_admin": ("crm", "Kunden-Verwalter-7"),
    "auditor": ("auditor", "Pruefer-Lesen-42"),
    "it_admin": ("admin", "Sys-Technik-99"),
}
LOCAL_ACCOUNTS = {"crm": ("crm_admin",), "auditor": ("auditor",), "admin": ("it_admin",)}
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class PanelServer:
    url: str
    db_url: str
    config_path: Path
    proc: subprocess.Popen
    rules_dir: Path = Path()  # the panel's own copy of rules/ (tests may add a file and remove it)
    data_dir: Path = Path()
    log_lines: list[str] = field(default_factory=list)

    def log_text(self) -> str:
        return "\n".join(self.log_lines)


def _seed(db_url: str) -> None:
    from gateway.db import connect
    from gateway.demo.sample_data import seed
    from panel.auth import create_local_account

    db = connect(db_url)
    seed()
    for login, roles in LOCAL_ACCOUNTS.items():
        create_local_account(login, ACCOUNTS[roles[0]][1], roles, name=login.capitalize())
    db.close()


@pytest.fixture(scope="session")
def panel_server(dovecot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PanelServer]:
    from gateway.cli import main
    from gateway.demo.upstream import free_ports

    base = tmp_path_factory.mktemp("panel")
    port = free_ports(1)[0]
    config_path = base / "mailgate.toml"
    rules_dir = base / "rules"
    shutil.copytree(REPO / "rules", rules_dir)
    write_config(config_path, {
        "node": {"name": "paneltest", "data_dir": "var"},
        "database": {"url": "sqlite:///var/mailgate.db"},
        "company": {"name": "ACME Trading", "domains": ["acme.test"], "language": "zh-CN"},
        "upstream": {"host": dovecot.host, "imap_port": dovecot.imaps_port, "imap_security": "tls",
                     "submission_port": dovecot.submission_port, "submission_security": "starttls",
                     "ca_file": str(dovecot.cert_path)},
        "relay": {"mode": "relay_account", "username": "relay@acme.test", "password": "relay-pw"},
        "rules": {"dir": str(rules_dir)},
        "panel": {"listen": "127.0.0.1", "port": port, "login_max_failures": 3, "login_max_failures_per_ip": 200},
    })
    assert main(["-c", str(config_path), "init"]) == 0
    db_url = "sqlite:///" + str(base / "var" / "mailgate.db")
    _seed(db_url)
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "-c", str(config_path), "panel", "serve"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    server = PanelServer(f"http://127.0.0.1:{port}", db_url, config_path, proc, rules_dir=rules_dir,
                         data_dir=base / "var")
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            server.log_lines.append(line.rstrip("\n"))
            if "panel ready on" in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(30) or proc.poll() is not None:
        proc.kill()
        raise RuntimeError("panel did not start:\n" + server.log_text())
    yield server
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def panel_url(panel_server: PanelServer) -> str:
    """Base URL without a trailing slash, e.g. http://127.0.0.1:40123."""
    return panel_server.url


@pytest.fixture
def panel_db(panel_server: PanelServer):
    """The models bound to the panel's DB (as the panel process sees it)."""
    from gateway.db import connect

    db = connect(panel_server.db_url, migrate=False)
    yield db
    db.close()


# -- HTTP client -------------------------------------------------------------------

@dataclass
class Response:
    status: int
    headers: dict[str, str]
    text: str
    url: str

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        return None


class PanelClient:
    """A browser-like HTTP client: cookie jar, CSRF token picked up from the pages it reads."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.jar = http.cookiejar.CookieJar()
        self.csrf = ""
        self._plain = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect)
        self._follow = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def request(self, method: str, path: str, data: dict | None = None, *, csrf: bool | str = True,
                follow: bool = False, headers: dict[str, str] | None = None) -> Response:
        body = None
        if method != "GET":
            fields = dict(data or {})
            if csrf is True and self.csrf:
                fields.setdefault("csrf_token", self.csrf)
            elif isinstance(csrf, str):
                fields["csrf_token"] = csrf
            body = urllib.parse.urlencode(fields, doseq=True).encode()
        req = urllib.request.Request(self.base_url + path, data=body, method=method, headers=headers or {})
        opener = self._follow if follow else self._plain
        try:
            with opener.open(req, timeout=30) as resp:
                result = Response(resp.status, {k.lower(): v for k, v in resp.headers.items()},
                                  resp.read().decode("utf-8", "replace"), resp.url)
        except urllib.error.HTTPError as exc:
            result = Response(exc.code, {k.lower(): v for k, v in exc.headers.items()},
                              exc.read().decode("utf-8", "replace"), exc.url)
        found = CSRF_RE.search(result.text)
        if found:
            self.csrf = found.group(1)
        return result

    def get(self, path: str, **kw) -> Response:  # noqa: ANN003
        return self.request("GET", path, **kw)

    def post(self, path: str, data: dict | None = None, **kw) -> Response:  # noqa: ANN003
        return self.request("POST", path, data, **kw)

    def login(self, login: str, password: str) -> Response:
        self.get("/login")
        return self.post("/login", {"login": login, "password": password})

    def cookie(self, name: str) -> str | None:
        return next((c.value for c in self.jar if c.name == name), None)


@pytest.fixture
def anon_client(panel_url: str) -> PanelClient:
    return PanelClient(panel_url)


@pytest.fixture
def http_as(panel_url: str):
    """``http_as(role)`` → a PanelClient signed in as ACCOUNTS[role]."""
    def make(role: str) -> PanelClient:
        client = PanelClient(panel_url)
        resp = client.login(*ACCOUNTS[role])
        assert resp.status == 303, f"sign-in as {role} failed: {resp.status} {resp.text[:500]}"
        client.get("/")  # picks up the session's CSRF token
        return client

    return make


# -- browser -------------------------------------------------------------------------

@pytest.fixture(scope="package")  # sync Playwright keeps an event loop running: end it with tests/panel
def browser():
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    try:
        chromium = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                      args=["--no-sandbox", "--disable-background-networking"])
    except Exception:
        pw.stop()
        raise
    yield chromium
    chromium.close()
    pw.stop()


def login(page, login_name: str, password: str, base_url: str | None = None) -> None:  # noqa: ANN001
    """Fill and send the sign-in form (on the current page, or base_url + /login)."""
    if base_url is not None:
        page.goto(base_url + "/login")
    page.fill("input[name=login]", login_name)
    page.fill("input[name=password]", password)
    page.click("form[action='/login'] button[type=submit]")
    page.wait_for_load_state()


@pytest.fixture
def new_page(browser, panel_url: str):
    """``new_page(width=1280, height=800)`` → a page in a fresh context (closed after the test)."""
    contexts = []

    def make(width: int = 1280, height: int = 800, locale: str = "zh-CN"):  # noqa: ANN202
        ctx = browser.new_context(viewport={"width": width, "height": height}, locale=locale)
        ctx.set_default_timeout(15000)
        contexts.append(ctx)
        return ctx.new_page()

    yield make
    for ctx in contexts:
        ctx.close()


@pytest.fixture
def page_as(new_page, panel_url: str):
    """``page_as(role, width=1280, height=800)`` → a browser page signed in as ACCOUNTS[role]."""
    def make(role: str, width: int = 1280, height: int = 800):  # noqa: ANN202
        page = new_page(width, height)
        login(page, *ACCOUNTS[role], base_url=panel_url)
        assert "/login" not in page.url, f"sign-in as {role} failed: {page.content()[:500]}"
        return page

    return make
