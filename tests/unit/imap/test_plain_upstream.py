"""[upstream] imap_security = "none" only towards [imap] plaintext_upstream_networks."""

from __future__ import annotations

import pytest

from gateway import config


def _cfg(host: str, security: str = "none", **imap: object) -> config.Config:
    return config.from_dict({
        "relay": {"username": "r", "password": "r"},
        "upstream": {"host": host, "imap_port": 143, "imap_security": security},
        "imap": imap,
    })


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.5", "::1", "localhost"])
def test_plaintext_upstream_on_loopback_is_allowed_by_default(host):
    assert _cfg(host).upstream.imap_security == "none"


@pytest.mark.parametrize("host", ["10.0.0.5", "192.0.2.1", "mail.example.com", "2001:db8::1"])
def test_plaintext_upstream_elsewhere_is_refused(host):
    with pytest.raises(config.ConfigError) as err:
        _cfg(host)
    assert any(p.startswith("[upstream] imap_security") and "plaintext_upstream_networks" in p
               for p in err.value.problems)


def test_a_configured_trusted_network_allows_it_and_tls_never_needs_it():
    assert _cfg("10.0.0.5", plaintext_upstream_networks=["10.0.0.0/24"]).upstream.host == "10.0.0.5"
    assert _cfg("mail.example.com", security="tls").upstream.imap_security == "tls"
    with pytest.raises(config.ConfigError):  # a host name never matches a network
        _cfg("mail.example.com", plaintext_upstream_networks=["0.0.0.0/0"])


def test_bad_network_is_reported():
    with pytest.raises(config.ConfigError) as err:
        _cfg("127.0.0.1", plaintext_upstream_networks=["nonsense"])
    assert any("'nonsense' is not an IP network" in p for p in err.value.problems)


def test_the_service_refuses_it_even_without_validation():
    from twisted.internet.testing import MemoryReactor

    from gateway.imap.service import ProxyService

    cfg = _cfg("127.0.0.1")
    cfg.upstream.host = "10.1.2.3"  # changed after validation
    with pytest.raises(RuntimeError, match="plaintext_upstream_networks"):
        ProxyService(cfg, directory=None, reactor=MemoryReactor())
