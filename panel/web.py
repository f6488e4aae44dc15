"""What every area uses: the signed-in user, role checks, templates, CSRF, flashes,
the operation log, pagination.

Areas import from here only (``from panel.web import require, render, ...``); the
app (panel/app.py) wires the hooks.  All of it runs inside a request (a WSGI worker
thread), so blocking DB calls are fine.
"""

from __future__ import annotations

import functools
import hmac
import math
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import bottle
import jinja2
from markupsafe import Markup, escape

from gateway import oplog as _oplog
from gateway.db.models import Employee
from panel import i18n, sessions
from panel.i18n import t
from panel.schema import LocalAccount

TEMPLATES = Path(__file__).resolve().parent / "templates"
STATIC = Path(__file__).resolve().parent / "static"
SESSION_COOKIE = "mg_session"
PRE_CSRF_COOKIE = "mg_csrf"  # CSRF token before sign-in (the login form, approval links)
UNSAFE_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})
ROLES = ("salesperson", "dept_head", "crm_admin", "auditor", "it_admin")

__all__ = [
    "User", "current_user", "optional_user", "require", "render", "csrf_token", "csrf_field", "oplog", "t",
    "flash", "redirect", "paginate", "Page", "forbidden", "not_found", "csrf_exempt", "panel_config",
    "form_value", "int_arg",
]


@dataclass(frozen=True)
class User:
    """The signed-in person: an employee (mail login) or a local account."""

    id: int
    kind: str  # "employee" | "local"
    login: str  # employee e-mail or local login
    name: str
    roles: frozenset[str] = field(default_factory=frozenset)
    employee_id: int | None = None
    department_id: int | None = None

    @property
    def email(self) -> str:
        return self.login if self.kind == "employee" else ""

    @property
    def actor(self) -> str:
        """How the operation log names this user."""
        return self.login if self.kind == "employee" else "local:" + self.login

    def has(self, *roles: str) -> bool:
        """True if the user holds any of ``roles`` (no roles: any signed-in user)."""
        return not roles or bool(self.roles & set(roles))


# -- request state ---------------------------------------------------------------

def _panel():  # noqa: ANN202 - panel.app.PanelState
    return bottle.request.app.mailgate


def panel_config():  # noqa: ANN201 - gateway.config.Config
    """The node's Config (``cfg.panel`` is this area's section)."""
    return _panel().cfg


def client_ip() -> str:
    """The peer address (X-Forwarded-For is not trusted)."""
    return bottle.request.environ.get("REMOTE_ADDR", "") or ""


def _session():  # noqa: ANN202 - PanelSession | None
    environ = bottle.request.environ
    if "mailgate.session" not in environ:
        cfg = panel_config().panel
        token = bottle.request.get_cookie(SESSION_COOKIE) or ""
        row, expired = sessions.lookup(token, cfg.idle_minutes, cfg.absolute_hours)
        environ["mailgate.session"] = row
        environ["mailgate.session_expired"] = expired
    return environ["mailgate.session"]


def _load_user(row) -> User | None:  # noqa: ANN001 - PanelSession
    if row.kind == "employee":
        emp = Employee.get_or_none(Employee.id == row.user_id)
        if emp is None or not emp.active:
            return None
        return User(id=emp.id, kind="employee", login=emp.email, name=emp.name,
                    roles=frozenset(emp.role_set & set(ROLES)), employee_id=emp.id,
                    department_id=emp.department_id)
    acct = LocalAccount.get_or_none(LocalAccount.id == row.user_id)
    if acct is None or not acct.active:
        return None
    return User(id=acct.id, kind="local", login=acct.login, name=acct.name,
                roles=frozenset(acct.role_set & set(ROLES)))


def optional_user() -> User | None:
    """The signed-in user, or None."""
    environ = bottle.request.environ
    if "mailgate.user" not in environ:
        row = _session()
        user = _load_user(row) if row is not None else None
        if row is not None and user is None:  # deactivated or deleted since sign-in
            sessions.delete(bottle.request.get_cookie(SESSION_COOKIE) or "")
            environ["mailgate.session"] = None
        environ["mailgate.user"] = user
    return environ["mailgate.user"]


def current_user() -> User:
    """The signed-in user; outside ``require`` a signed-out request is sent to /login."""
    user = optional_user()
    if user is None:
        _to_login()
    return user


def _to_login() -> None:
    path = bottle.request.fullpath
    query = bottle.request.query_string
    target = path + ("?" + query if query else "")
    expired = "&expired=1" if bottle.request.environ.get("mailgate.session_expired") else ""
    bottle.redirect("/login?next=" + quote(target, safe="/") + expired, 303)


def forbidden(message: str | None = None) -> None:
    """Stop with the 403 page."""
    raise bottle.HTTPError(403, message or t("error.403.text"))


def not_found(message: str | None = None) -> None:
    raise bottle.HTTPError(404, message or t("error.404.text"))


def require(*roles: str) -> Callable:
    """Route decorator: signed out → /login; signed in without any of ``roles`` → 403.

    ``@require()`` (no roles) admits any signed-in user.
    """
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}")

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            user = optional_user()
            if user is None:
                _to_login()
            if not user.has(*roles):
                forbidden()
            return fn(*args, **kwargs)

        wrapper.required_roles = roles
        return wrapper

    return decorate


# -- CSRF ------------------------------------------------------------------------

def csrf_token() -> str:
    """The token forms must send back (field ``csrf_token`` or header X-CSRF-Token)."""
    row = _session() if optional_user() is not None else None
    if row is not None:
        return row.csrf
    environ = bottle.request.environ
    token = environ.get("mailgate.pre_csrf") or bottle.request.get_cookie(PRE_CSRF_COOKIE) or ""
    if len(token) < 20 or len(token) > 100:
        token = secrets.token_urlsafe(32)
        _set_cookie(PRE_CSRF_COOKIE, token, max_age=12 * 3600)
    environ["mailgate.pre_csrf"] = token
    return token


def csrf_field() -> Markup:
    return Markup('<input type="hidden" name="csrf_token" value="%s">') % csrf_token()


def check_csrf() -> None:
    """Raise 403 unless the request carries the expected CSRF token."""
    sent = bottle.request.forms.get("csrf_token") or bottle.request.headers.get("X-CSRF-Token") or ""
    row = _session() if optional_user() is not None else None
    expected = row.csrf if row is not None else (bottle.request.get_cookie(PRE_CSRF_COOKIE) or "")
    if not sent or not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise bottle.HTTPError(403, t("error.csrf"))


def csrf_exempt(fn: Callable) -> Callable:
    """Mark a route as not needing a CSRF token (only for machine endpoints with their own auth)."""
    fn.csrf_exempt = True
    return fn


class CSRFPlugin:
    """Checks the token on every POST/PUT/DELETE/PATCH route unless marked ``csrf_exempt``."""

    name = "csrf"
    api = 2

    def apply(self, callback: Callable, route: bottle.Route) -> Callable:
        if getattr(route.callback, "csrf_exempt", False) or route.config.get("csrf") is False:
            return callback

        @functools.wraps(callback)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if bottle.request.method in UNSAFE_METHODS:
                check_csrf()
            return callback(*args, **kwargs)

        return wrapper


# -- responses ---------------------------------------------------------------------

def _cookie_secure() -> bool:
    cfg = panel_config().panel
    return cfg.tls or cfg.cookie_secure


def _set_cookie(name: str, value: str, max_age: int | None = None) -> None:
    extra = {"max_age": max_age} if max_age is not None else {}
    bottle.response.set_cookie(name, value, path="/", httponly=True, samesite="lax",
                               secure=_cookie_secure(), **extra)


def flash(message: str) -> None:
    """Show ``message`` once on the next page this user sees."""
    row = _session()
    if row is not None:
        sessions.add_flash(row, message)


def redirect(url: str) -> None:
    """303 See Other (after a POST the browser GETs ``url``)."""
    bottle.redirect(url, 303)


def form_value(name: str, default: str = "", max_length: int = 1000) -> str:
    """A form field as text (bottle decodes UTF-8), stripped and bounded."""
    value = bottle.request.forms.getunicode(name)
    return (value if value is not None else default).strip()[:max_length]


def int_arg(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


@dataclass
class Page:
    items: list
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.per_page))

    @property
    def has_prev(self) -> bool:
        return self.page > 1

    @property
    def has_next(self) -> bool:
        return self.page < self.pages


def paginate(query_or_total: Any, page: Any = 1, per_page: int | None = None) -> Page:
    """A page of a peewee query (items filled), or of a plain total count (items empty).

    ``page`` may be the raw query-string value; it is clamped to 1..pages.
    """
    per_page = per_page or panel_config().panel.page_size
    total = query_or_total if isinstance(query_or_total, int) else query_or_total.count()
    page = max(1, int_arg(page, 1))
    page = min(page, max(1, math.ceil(total / per_page)))
    items = [] if isinstance(query_or_total, int) else list(query_or_total.paginate(page, per_page))
    return Page(items, total, page, per_page)


def oplog(action: str, target: str = "", details: Any = None) -> None:
    """Record a change in the operation log, with the signed-in user as actor."""
    user = optional_user()
    _oplog.record(user.actor if user else "anonymous", action, target, details)


# -- templates ---------------------------------------------------------------------

def _url_with(**params: Any) -> str:
    """The current URL with some query parameters replaced (for pagination, language)."""
    query = dict(bottle.request.query.decode().allitems())
    for key, value in params.items():
        if value is None:
            query.pop(key, None)
        else:
            query[key] = str(value)
    from urllib.parse import urlencode

    qs = urlencode(query)
    return bottle.request.path + ("?" + qs if qs else "")


ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES)),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.globals.update(t=t, csrf_token=csrf_token, csrf_field=csrf_field, url_with=_url_with)


def nav_for(user: User | None) -> list[tuple[str, str]]:
    if user is None:
        return []
    return [(path, t(label)) for path, label, roles in _panel().nav if user.has(*roles)]


def render(template_name: str, **ctx: Any) -> str:
    """Render ``panel/templates/<template_name>`` (autoescaped) with the layout's globals."""
    user = optional_user()
    row = _session() if user is not None else None
    base = {
        "user": user,
        "nav": nav_for(user),
        "lang": i18n.current_language(),
        "flashes": sessions.pop_flashes(row) if row is not None else [],
        "request_path": bottle.request.path,
        "company": panel_config().company.name,
    }
    base.update(ctx)
    return ENV.get_template(template_name).render(**base)


def escape_text(value: Any) -> str:
    return str(escape(value))


def join_roles(roles: Iterable[str]) -> str:
    return ", ".join(t("role." + r) for r in ROLES if r in set(roles))


ENV.globals.update(join_roles=join_roles)
