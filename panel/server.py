"""Serve the panel with Twisted's WSGI container: the reactor accepts and parses HTTP,
a thread pool runs the Bottle app (blocking DB and IMAP calls are fine there)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from gateway.config import Config

log = logging.getLogger("mailgate.panel")


@dataclass
class PanelServer:
    port: Any  # IListeningPort
    pool: Any  # twisted.python.threadpool.ThreadPool
    url: str

    async def stop(self) -> None:
        import asyncio

        d = self.port.stopListening()
        if d is not None and hasattr(d, "asFuture"):
            await d.asFuture(asyncio.get_running_loop())
        await asyncio.to_thread(self.pool.stop)

    def stop_blocking(self) -> None:
        self.port.stopListening()
        self.pool.stop()


def listen(cfg: Config, reactor: Any, app: Any = None, node: Any = None) -> PanelServer:
    """Start listening on [panel] listen:port (HTTPS with the [tls] cert when panel.tls)."""
    from twisted.python.threadpool import ThreadPool
    from twisted.web.server import Site
    from twisted.web.wsgi import WSGIResource

    from panel.app import create_app

    if app is None:
        app = create_app(cfg, node)
    pool = ThreadPool(minthreads=1, maxthreads=cfg.panel.threads, name="panel")
    pool.start()
    site = Site(WSGIResource(reactor, pool, app))
    site.displayTracebacks = False
    site.log = lambda request: None  # the app logs what matters (sign-ins, errors)
    host = cfg.panel.listen
    shown = f"[{host}]" if ":" in host else host
    try:
        if cfg.panel.tls:
            from gateway.imap.service import server_tls_options

            options = server_tls_options(cfg)
            if options is None:
                raise RuntimeError(f"[panel] tls = true but the certificate {cfg.tls.cert} cannot be read")
            port = reactor.listenSSL(cfg.panel.port, site, options, interface=host)
            url = f"https://{shown}:{cfg.panel.port}/"
        else:
            port = reactor.listenTCP(cfg.panel.port, site, interface=host)
            url = f"http://{shown}:{cfg.panel.port}/"
    except Exception:
        pool.stop()
        raise
    log.info("panel ready on %s", url)
    return PanelServer(port, pool, url)
