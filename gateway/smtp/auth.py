"""Check submission credentials by authenticating to the upstream provider.

The gateway keeps no passwords: a login is good when the upstream's own
submission service accepts it.  A success may be remembered for a short time
as a salted scrypt hash (never the cleartext) so that a client that opens a
connection per message does not cost an upstream round trip each time.
The client's address is passed on with XCLIENT where the upstream offers it
(Dovecot honours it from login_trusted_networks), so the upstream's own
per-IP penalties hit the right client and not the gateway.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import smtplib
import ssl
import time

from gateway.config import Config

log = logging.getLogger("mailgate.auth")


class UpstreamUnavailable(Exception):
    """The upstream could not be asked (down, TLS failure, timeout)."""


def tls_context(cfg: Config) -> ssl.SSLContext:
    """Client-side TLS context for talking to the upstream."""
    ctx = ssl.create_default_context(cafile=str(cfg.upstream.ca_file) if cfg.upstream.ca_file else None)
    if not cfg.upstream.verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _hash(salt: bytes, password: str) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=2**12, r=8, p=1, dklen=32)


class AuthCache:
    def __init__(self, ttl: float, max_entries: int = 10_000):
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, bytes, bytes]] = {}

    def remember(self, username: str, password: str) -> None:
        if self.ttl <= 0:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.pop(next(iter(self._entries)))
        salt = os.urandom(16)
        self._entries[username.lower()] = (time.monotonic() + self.ttl, salt, _hash(salt, password))

    def check(self, username: str, password: str) -> bool:
        entry = self._entries.get(username.lower())
        if entry is None:
            return False
        expires, salt, digest = entry
        if time.monotonic() > expires:
            self._entries.pop(username.lower(), None)
            return False
        return hmac.compare_digest(digest, _hash(salt, password))

    def forget(self, username: str) -> None:
        self._entries.pop(username.lower(), None)


class UpstreamAuthenticator:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.cache = AuthCache(cfg.smtp.auth_cache_seconds)
        self._tls = tls_context(cfg)

    async def verify(self, username: str, password: str, client_ip: str) -> bool:
        """True if the upstream accepts these credentials.  Raises UpstreamUnavailable."""
        if await asyncio.to_thread(self.cache.check, username, password):
            return True
        ok = await asyncio.to_thread(self._ask_upstream, username, password, client_ip)
        if ok:
            await asyncio.to_thread(self.cache.remember, username, password)
        else:
            self.cache.forget(username)
        return ok

    def _ask_upstream(self, username: str, password: str, client_ip: str) -> bool:
        up = self.cfg.upstream
        try:
            if up.submission_security == "tls":
                conn = smtplib.SMTP_SSL(up.host, up.submission_port, timeout=up.timeout, context=self._tls)
            else:
                conn = smtplib.SMTP(up.host, up.submission_port, timeout=up.timeout)
            with conn:
                conn.ehlo(self.cfg.smtp.hostname)
                if up.submission_security == "starttls":
                    conn.starttls(context=self._tls)
                    conn.ehlo(self.cfg.smtp.hostname)
                if conn.has_extn("xclient") and client_ip:
                    code, _ = conn.docmd("XCLIENT", f"ADDR={client_ip}")
                    if code == 220:
                        conn.ehlo(self.cfg.smtp.hostname)
                try:
                    conn.login(username, password)
                except smtplib.SMTPAuthenticationError as exc:
                    if 400 <= exc.smtp_code < 500:
                        raise UpstreamUnavailable(f"upstream answered {exc.smtp_code}") from None
                    return False
                return True
        except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
            log.warning("upstream auth check failed: %s", type(exc).__name__ + ": " + str(exc)[:200])
            raise UpstreamUnavailable(str(exc)) from None
