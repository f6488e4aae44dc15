"""Who may sign in: employees (their mail password, checked by the upstream IMAP
server) and local accounts (administrators, auditors; argon2 hashes).

Blocking (argon2, IMAP): call from a worker thread, which every WSGI request is.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import imapclient
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from gateway.config import Config
from gateway.db.models import Employee
from gateway.loginfail import SharedFailures, panel_key, user_key
from gateway.smtp.auth import UpstreamUnavailable, tls_context
from panel.schema import LocalAccount

log = logging.getLogger("mailgate.panel.auth")

ROLES = ("salesperson", "dept_head", "crm_admin", "auditor", "it_admin")
_hasher = PasswordHasher()
# Verified against when the login does not exist, so timing does not tell which logins exist.
_DUMMY_HASH = _hasher.hash("mailgate-dummy-password")
_COMMON = {
    "password", "password1", "password123", "12345678", "123456789", "1234567890", "qwertyuiop",
    "11111111", "00000000", "88888888", "abc123456", "a123456789", "iloveyou", "admin123", "administrator",
    "changeme", "letmein123", "welcome123", "passw0rd", "qwerty123", "mailgate", "mailgate123",
}


class WeakPassword(ValueError):
    """The password is too easy to guess; the message says why."""


def check_password_strength(login: str, password: str) -> None:
    """Raise WeakPassword with a reason for an empty, short or common password."""
    if not password:
        raise WeakPassword("the password is empty")
    if len(password) < 10:
        raise WeakPassword("the password needs at least 10 characters")
    lowered = password.lower()
    if lowered in _COMMON or len(set(password)) < 4:
        raise WeakPassword("the password is too common")
    if login and login.lower() in lowered:
        raise WeakPassword("the password must not contain the login")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def create_local_account(login: str, password: str, roles: set[str] | list[str] | tuple[str, ...],
                         name: str = "") -> LocalAccount:
    """Create a local account; raises ValueError (WeakPassword included) on bad input."""
    login = login.strip()
    if not login or "@" in login or len(login) > 100 or any(c.isspace() for c in login):
        raise ValueError("a local login is 1-100 characters without spaces or @ (employees sign in with e-mail)")
    unknown = set(roles) - set(ROLES)
    if unknown or not roles:
        raise ValueError(f"roles must be among {', '.join(ROLES)} (got {', '.join(sorted(roles)) or 'none'})")
    check_password_strength(login, password)
    if LocalAccount.select().where(LocalAccount.login == login).exists():
        raise ValueError(f"local account {login!r} already exists")
    return LocalAccount.create(login=login, name=name or login, roles=",".join(sorted(roles)),
                               password_hash=hash_password(password))


def set_local_password(account: LocalAccount, password: str) -> None:
    from gateway.db.models import utcnow

    check_password_strength(account.login, password)
    account.password_hash = hash_password(password)
    account.password_changed_at = utcnow()
    account.save()


def imap_login_ok(cfg: Config, username: str, password: str) -> bool:
    """True if the upstream IMAP server accepts these credentials.  Raises UpstreamUnavailable."""
    up = cfg.upstream
    ctx = tls_context(cfg)
    try:
        client = imapclient.IMAPClient(up.host, port=up.imap_port, ssl=up.imap_security == "tls",
                                       ssl_context=ctx, timeout=up.timeout)
    except (OSError, ssl.SSLError, imapclient.exceptions.IMAPClientError) as exc:
        log.warning("upstream IMAP unreachable: %s", type(exc).__name__)
        raise UpstreamUnavailable(str(exc)) from None
    try:
        if up.imap_security == "starttls":
            client.starttls(ctx)
        try:
            client.login(username, password)
        except imapclient.exceptions.LoginError:
            return False
        return True
    except (OSError, ssl.SSLError, imapclient.exceptions.IMAPClientError) as exc:
        log.warning("upstream IMAP check failed: %s", type(exc).__name__)
        raise UpstreamUnavailable(str(exc)) from None
    finally:
        try:
            client.logout()
        except Exception:  # noqa: BLE001 - best effort on a connection we are leaving anyway
            try:
                client.shutdown()
            except Exception:  # noqa: BLE001
                pass


@dataclass
class SignIn:
    """The outcome of a sign-in attempt: ``kind``/``user_id`` on success, else ``error`` (an i18n key)."""

    kind: str = ""
    user_id: int = 0
    error: str = ""


def authenticate(cfg: Config, login: str, password: str) -> SignIn:
    """Check a login: an e-mail address is an employee, anything else a local account."""
    login = login.strip()
    if not login or not password or len(login) > 320 or len(password) > 1024:
        return SignIn(error="login.failed")
    if "@" in login:
        emp = Employee.get_or_none(Employee.email == login.lower())
        if emp is None or not emp.active:
            return SignIn(error="login.failed")
        try:
            ok = imap_login_ok(cfg, emp.email, password)
        except UpstreamUnavailable:
            return SignIn(error="login.upstream")
        if not ok:
            return SignIn(error="login.failed")
        if not emp.role_set & set(ROLES):
            return SignIn(error="login.no_access")
        return SignIn(kind="employee", user_id=emp.id)
    acct = LocalAccount.get_or_none(LocalAccount.login == login)
    ok = verify_password(acct.password_hash if acct else None, password)
    if not ok or acct is None or not acct.active:
        return SignIn(error="login.failed")
    if not acct.role_set & set(ROLES):
        return SignIn(error="login.no_access")
    return SignIn(kind="local", user_id=acct.id)


class LoginLimiter:
    """Failed sign-ins per login and per client IP within a window; over the limit, wait.

    In memory (per process), bounded to ``max_keys`` entries (oldest dropped).  A
    success clears the login's record, never the IP's.

    With ``shared`` (gateway/loginfail.py) the failed sign-ins of a login are those of the
    whole deployment, every process and node (``panel_key``): each check reads them (one
    indexed query; a sign-in costs an argon2 hash or an IMAP login anyway), a failure is
    written there — and as a failure of the user (``user_key``), which slows the user's next
    SMTP AUTH and IMAP login — and a success clears both.  A mail login's failure does not
    count here (``panel_key`` says why).  The limits stay the panel's own (``max_failures``
    in ``window``, then ``lockout``); the IP's count stays in this process (behind a reverse
    proxy the panel's client IP is not the mail clients' one).  The shared record
    unavailable, the process's own count decides.
    """

    def __init__(self, max_failures: int, max_failures_per_ip: int, window: float, lockout: float,
                 max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic,
                 shared: SharedFailures | None = None):
        self.limits = {"user": max_failures, "ip": max_failures_per_ip}
        self.window = window
        self.lockout = lockout
        self.max_keys = max_keys
        self.clock = clock
        self.shared = shared
        self._failures: OrderedDict[str, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(key, ()) if t > now - self.window]
        if times:
            self._failures[key] = times
            self._failures.move_to_end(key)
        else:
            self._failures.pop(key, None)
        return times

    def wait_seconds(self, ip: str, login: str) -> int:
        """0 if this attempt may be checked, else the seconds left to wait."""
        shared, ukey = self.shared, user_key(login)
        pkey = panel_key(login)
        if shared is not None:
            shared.fresh([pkey])
        now = self.clock()
        with self._lock:
            wait = 0.0
            for kind, key in (("ip", "ip:" + ip), ("user", ukey)):
                times = self._recent(key, now)
                if kind == "user" and shared is not None:
                    seen = [now - age for age in shared.ages(pkey, self.window)]
                    if shared.available or len(seen) > len(times):
                        times = seen
                if len(times) >= self.limits[kind]:
                    wait = max(wait, times[-1] + self.lockout - now)
            return int(wait) + 1 if wait > 0 else 0

    def failed(self, ip: str, login: str) -> None:
        now = self.clock()
        with self._lock:
            for key in ("ip:" + ip, user_key(login)):
                self._failures.setdefault(key, []).append(now)
                self._failures.move_to_end(key)
                del self._failures[key][:-100]
            while len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)
        if self.shared is not None:
            self.shared.store(self.shared.note([user_key(login), panel_key(login)]))

    def succeeded(self, login: str) -> None:
        with self._lock:
            self._failures.pop(user_key(login), None)
        if self.shared is not None:
            self.shared.clear(user_key(login))
            self.shared.clear(panel_key(login))
