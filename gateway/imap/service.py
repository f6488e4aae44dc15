"""The IMAP proxy service: listeners, TLS contexts and shared per-process state.

``listen_imap(config, directory, reactor)`` is the entry point that
``mailgate run`` calls once the asyncio reactor is installed.
"""

from __future__ import annotations

import logging
import ssl as stdssl
from collections import OrderedDict
from typing import Any

from twisted.internet import protocol, ssl, threads

from gateway import loginfail
from gateway.config import Config, host_in_networks
from gateway.directory import Directory
from gateway.imap.decisions import Decision, DecisionStore
from gateway.imap.limits import ConnectionLimits
from gateway.imap.session import ClientSession
from gateway.imap.tlslayer import TLSServerFactory
from gateway.imap.upstream import UpstreamSettings
from gateway.smtp.guard import LoginGuard

log = logging.getLogger("mailgate.imap")

#: How often (seconds) deciding new messages first replays the directory's change feed.
DIRECTORY_REFRESH_INTERVAL = 1.0
#: Decisions kept in memory per process (persisted ones are immutable, so caching is safe).
DECISION_CACHE = 200_000


def server_tls_options(config: Config) -> ssl.CertificateOptions | None:
    """The gateway's own certificate as Twisted options (the panel's HTTPS; None if missing)."""
    try:
        cert_pem = config.tls.cert.read_bytes()
        key_pem = config.tls.key.read_bytes()
    except OSError as exc:
        log.warning("IMAP TLS disabled: %s", exc)
        return None
    cert = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    return ssl.CertificateOptions(
        privateKey=cert.privateKey.original,
        certificate=cert.original,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def server_ssl_context(config: Config) -> stdssl.SSLContext | None:
    """The proxy's own TLS (STARTTLS and implicit TLS), for ``tlslayer.TLSLayer`` (None if no cert)."""
    ctx = stdssl.SSLContext(stdssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = stdssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.tls.cert, config.tls.key)
    except (OSError, stdssl.SSLError) as exc:
        log.warning("IMAP TLS disabled: %s", exc)
        return None
    return ctx


def upstream_ssl_context(config: Config) -> stdssl.SSLContext:
    """Client TLS to the upstream, verified against ``ca_file`` (or the system store).

    Session tickets are refused: thousands of idle sessions would each keep the
    server's tickets in memory for nothing.
    """
    u = config.upstream
    if u.verify_tls:
        ctx = stdssl.create_default_context(cafile=str(u.ca_file) if u.ca_file else None)
    else:
        ctx = stdssl.SSLContext(stdssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = stdssl.CERT_NONE
    ctx.minimum_version = stdssl.TLSVersion.TLSv1_2
    ctx.options |= stdssl.OP_NO_TICKET
    return ctx


class ProxyService:
    """State shared by all sessions of this process."""

    # Archive capture hooks (set by gateway.archive.service; None = off), called on the reactor
    # thread, must not block: on_login(account, login, password) after an employee's upstream
    # login; on_whole_fetch(account, mailbox, uidvalidity, uids) for a BODY[]/RFC822/BINARY[] FETCH.
    on_login: Any = None
    on_whole_fetch: Any = None

    def __init__(self, config: Config, directory: Directory, reactor: Any):
        u = config.upstream
        if u.imap_security == "none" and not host_in_networks(u.host, config.imap.plaintext_upstream_networks):
            raise RuntimeError(f"plaintext IMAP upstream {u.host!r} is outside [imap] plaintext_upstream_networks")
        self.config = config
        self.directory = directory
        self.reactor = reactor
        self.limits = ConnectionLimits(config.imap.max_connections, config.imap.max_connections_per_user)
        c = config.imap
        self.guard = LoginGuard(c.auth_fail_base_delay, c.auth_fail_max_delay, c.auth_fail_window,
                                shared=loginfail.for_process(config))
        self.store = DecisionStore()
        self.pool = reactor.getThreadPool()
        self.tls_context = server_ssl_context(config)
        u = config.upstream
        self.upstream_settings = UpstreamSettings(
            host=u.host,
            port=u.imap_port,
            security=u.imap_security,
            timeout=u.timeout,
            tls_context=upstream_ssl_context(config) if u.imap_security != "none" else None,
        )
        self._last_refresh = float("-inf")
        self._decisions: OrderedDict[tuple, Decision] = OrderedDict()
        self.special_use: dict[str, tuple[float, frozenset[bytes]]] = {}  # account -> (when, \Sent/\Drafts names)

    def cached_decisions(self, account: str, mailbox: bytes, uidvalidity: int, uids: list[int]) -> dict[int, Decision]:
        """Decisions this process already knows (they never change once stored)."""
        out = {}
        for uid in uids:
            d = self._decisions.get((account, mailbox, uidvalidity, uid))
            if d is not None:
                out[uid] = d
        return out

    def cache_decisions(self, account: str, mailbox: bytes, uidvalidity: int, decisions: dict[int, Decision]) -> None:
        cache = self._decisions
        for uid, d in decisions.items():
            cache[(account, mailbox, uidvalidity, uid)] = d
        while len(cache) > DECISION_CACHE:
            cache.popitem(last=False)

    async def maybe_refresh_directory(self) -> None:
        """Replay the directory change feed before deciding (at most every interval)."""
        now = self.reactor.seconds()
        if now - self._last_refresh < DIRECTORY_REFRESH_INTERVAL:
            return
        self._last_refresh = now
        try:
            await threads.deferToThreadPool(self.reactor, self.pool, self.directory.refresh)
        except Exception:  # noqa: BLE001 - a stale directory is better than a failed FETCH
            log.exception("directory refresh failed")


class ProxyFactory(protocol.Factory):
    def __init__(self, svc: ProxyService, implicit_tls: bool):
        self.svc = svc
        self.implicit_tls = implicit_tls

    def buildProtocol(self, addr: Any) -> ClientSession:
        p = ClientSession(self.svc, self.implicit_tls)
        p.factory = self
        return p


def listen_imap(config: Config, directory: Directory, reactor: Any) -> list:
    """Listen on the STARTTLS and implicit-TLS ports (0 = off); returns the listening ports."""
    svc = ProxyService(config, directory, reactor)
    c = config.imap
    ports = []
    if c.starttls_port:
        ports.append(reactor.listenTCP(c.starttls_port, ProxyFactory(svc, False), interface=c.listen))
    if c.tls_port:
        if svc.tls_context is None:
            raise RuntimeError(f"IMAP tls_port {c.tls_port} needs [tls] cert and key")
        factory = TLSServerFactory(ProxyFactory(svc, True), svc.tls_context, reactor)
        ports.append(reactor.listenTCP(c.tls_port, factory, interface=c.listen))
    for p in ports:
        log.info("IMAP proxy listening on %s", p.getHost())
    return ports
