"""Opening IMAP connections to the upstream as "<mailbox>*<master user>" (blocking)."""

from __future__ import annotations

from collections.abc import Callable

from imapclient import IMAPClient

from gateway.config import Config
from gateway.relay import tls_context


def connector(cfg: Config, timeout: float | None = None) -> Callable[[str], IMAPClient]:
    """A function ``login -> logged-in IMAPClient`` for the upstream of ``cfg``."""
    up = cfg.upstream
    dist = cfg.distribution
    context = tls_context(up) if up.imap_security != "none" else None

    def connect(mailbox: str) -> IMAPClient:
        client = IMAPClient(up.host, port=up.imap_port, ssl=up.imap_security == "tls", ssl_context=context,
                            timeout=timeout or up.timeout)
        try:
            if up.imap_security == "starttls":
                client.starttls(context)
            client.login(f"{mailbox}*{dist.master_user}", dist.master_password)
        except BaseException:
            try:
                client.shutdown()
            except Exception:
                pass
            raise
        return client

    return connect
