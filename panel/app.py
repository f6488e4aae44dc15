"""The panel's WSGI app: ``create_app(cfg)`` builds one explicit Bottle() with the core
routes (sign-in, sign-out, start page, static files, error pages) and every area's routes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import bottle

from gateway import loginfail
from gateway.areas import optional_module
from gateway.config import Config
from gateway.db.models import database
from panel import i18n, sessions, web
from panel.areas import AREAS
from panel.auth import LoginLimiter, authenticate
from panel.i18n import t

log = logging.getLogger("mailgate.panel")

# Navigation order (areas not listed come last, in AREAS order).
NAV_ORDER = ("dashboard", "customers", "pool", "approvals", "distribution", "archive", "oplog", "rules", "employees")

SECURITY_HEADERS = [
    ("Content-Security-Policy",
     "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
     "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Permissions-Policy", "camera=(), microphone=(), geolocation=()"),
]


@dataclass
class PanelState:
    cfg: Config
    limiter: LoginLimiter
    nav: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)
    areas: list[str] = field(default_factory=list)
    # The running gateway.service.Node inside `mailgate run`; None under `mailgate panel serve`.
    node: Any = None


class PanelApp(bottle.Bottle):
    """A Bottle app whose every response (errors and static files too) carries the security headers."""

    mailgate: PanelState

    def wsgi(self, environ: dict, start_response: Any) -> Any:
        secure = self.mailgate.cfg.panel.tls

        def with_headers(status: str, headers: list, exc_info: Any = None) -> Any:
            present = {name.lower() for name, _ in headers}
            extra = [(n, v) for n, v in SECURITY_HEADERS if n.lower() not in present]
            if secure:
                extra.append(("Strict-Transport-Security", "max-age=31536000"))
            if "cache-control" not in present and not environ.get("PATH_INFO", "").startswith("/static/"):
                extra.append(("Cache-Control", "no-store"))
            return start_response(status, headers + extra, exc_info) if exc_info else \
                start_response(status, headers + extra)

        return super().wsgi(environ, with_headers)


def _safe_next(target: str) -> str:
    """Only a local path (no scheme, host or //) may follow sign-in."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    parts = urlsplit(target)
    return "/" if parts.scheme or parts.netloc else target


def _login_page(error: str = "", status: int = 200, login: str = "", **fmt: object) -> str:
    bottle.response.status = status
    q = bottle.request.query
    notice = ""
    if q.get("expired") or bottle.request.environ.get("mailgate.session_expired"):
        notice = t("login.expired")
    elif q.get("bye"):
        notice = t("login.logged_out")
    return web.render("login.html", error=t(error, **fmt) if error else "", notice=notice, login=login,
                      next=_safe_next(bottle.request.forms.getunicode("next") or q.get("next") or "/"))


def _core_routes(app: PanelApp) -> None:
    @app.get("/login")
    def login_form() -> str:
        if web.optional_user() is not None:
            web.redirect(_safe_next(bottle.request.query.get("next") or "/"))
        return _login_page()

    @app.post("/login")
    def login_submit() -> str:
        state: PanelState = app.mailgate
        login = web.form_value("login", max_length=320)
        password = bottle.request.forms.getunicode("password") or ""
        ip = web.client_ip()
        wait = state.limiter.wait_seconds(ip, login)
        if wait:
            log.warning("panel sign-in refused (rate limit) login=%r ip=%s", login[:100], ip)
            return _login_page("login.locked", 429, login, seconds=wait)
        result = authenticate(state.cfg, login, password)
        if result.error:
            if result.error == "login.failed":
                state.limiter.failed(ip, login)
            log.info("panel sign-in failed login=%r ip=%s (%s)", login[:100], ip, result.error)
            status = {"login.failed": 401, "login.upstream": 503, "login.no_access": 403}[result.error]
            return _login_page(result.error, status, login)
        state.limiter.succeeded(login)
        old = bottle.request.get_cookie(web.SESSION_COOKIE)
        if old:  # no session fixation: a sign-in always gets a fresh token
            sessions.delete(old)
        token, _row = sessions.create(result.kind, result.user_id, ip, bottle.request.headers.get("User-Agent", ""))
        web._set_cookie(web.SESSION_COOKIE, token)
        actor = login.lower() if result.kind == "employee" else "local:" + login
        from gateway import oplog

        oplog.record(actor, "panel.signin", actor, {"ip": ip})
        log.info("panel sign-in ok login=%r ip=%s", login[:100], ip)
        web.redirect(_safe_next(web.form_value("next") or "/"))

    @app.post("/logout")
    def logout() -> None:
        token = bottle.request.get_cookie(web.SESSION_COOKIE)
        if token:
            sessions.delete(token)
        bottle.response.delete_cookie(web.SESSION_COOKIE, path="/")
        web.redirect("/login?bye=1")

    @app.get("/")
    @web.require()
    def home() -> str:
        return web.render("home.html")

    @app.get("/static/<path:path>")
    def static(path: str) -> Any:
        return bottle.static_file(path, root=str(web.STATIC))

    @app.get("/healthz")
    def healthz() -> str:
        bottle.response.content_type = "text/plain"
        return "ok\n"


def _error_page(error: bottle.HTTPError) -> str:
    code = error.status_code
    if code >= 500:
        log.error("panel error %s on %s %s\n%s", code, bottle.request.method, bottle.request.path,
                  error.traceback or error.exception or "")
    title = t(f"error.{code}") if f"error.{code}" in i18n.CATALOG["en"] else error.status_line
    text = t("error.500.text") if code >= 500 else (error.body if isinstance(error.body, str) else "")
    if code == 404 and (not text or text.startswith("Not found")):
        text = t("error.404.text")
    try:
        return web.render("error.html", code=code, title=title, text=text)
    except Exception:  # noqa: BLE001 - the error page itself must never fail with a traceback
        log.exception("panel error page failed")
        bottle.response.content_type = "text/plain; charset=utf-8"
        return f"{code} {title}\n"


def _hooks(app: PanelApp) -> None:
    @app.hook("before_request")
    def before() -> None:
        database.connect(reuse_if_open=True)

    @app.hook("after_request")
    def after() -> None:
        # One connection per request (peewee's advice for web apps): a worker thread's
        # connection kept across requests could hold a stale SQLite read snapshot left by an
        # unfinished cursor, and then not see new rows or be refused its writes.
        if not database.is_closed() and not database.in_transaction():
            database.close()
        lang = bottle.request.query.get("lang")
        if lang in i18n.LANGUAGES:
            web._set_cookie(i18n.LANG_COOKIE, lang, max_age=365 * 24 * 3600)


def _load_areas(app: PanelApp) -> None:
    nav: list[tuple[int, int, tuple[str, str, tuple[str, ...]]]] = []
    for index, name in enumerate(AREAS):
        module = optional_module("panel.areas." + name)
        if module is None:
            continue
        module.routes(app)
        app.mailgate.areas.append(name)
        order = NAV_ORDER.index(name) if name in NAV_ORDER else len(NAV_ORDER) + index
        for n, (path, label, roles) in enumerate(getattr(module, "NAV", ())):
            nav.append((order, n, (path, label, tuple(roles))))
    app.mailgate.nav = [entry for _, _, entry in sorted(nav)]


def create_app(cfg: Config, node: Any = None) -> PanelApp:
    """The panel as a WSGI app (an explicit Bottle instance, nothing global)."""
    app = PanelApp(catchall=True)
    app.config["json.enable"] = False
    app.mailgate = PanelState(
        cfg=cfg,
        node=node,
        limiter=LoginLimiter(cfg.panel.login_max_failures, cfg.panel.login_max_failures_per_ip,
                             cfg.panel.login_window, cfg.panel.login_lockout,
                             shared=loginfail.for_process(cfg)),
    )
    i18n.set_default(cfg.company.language)
    app.install(web.CSRFPlugin())
    _hooks(app)
    for code in (400, 403, 404, 405, 409, 413, 429, 500, 502, 503):
        app.error(code)(_error_page)
    _core_routes(app)
    _load_areas(app)
    return app
