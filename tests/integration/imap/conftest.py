"""A self-contained IMAP proxy (subprocess) in front of the project's private Dovecot.

Users: alice@acme.test and bob@acme.test are employees; carol@acme.test has a
mailbox but is not an employee.  Customers: Buyer Co (buyer@buyer.test, owner
alice), 张伟 at china.test (owner alice), Bobcust (domain bobcust.test, owner bob).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.customers import create_customer, create_employee
from gateway.db import connect
from gateway.demo.upstream import DovecotUpstream, free_ports, make_self_signed_cert

ROOT = Path(__file__).resolve().parents[3]


class ProxyProcess:
    def __init__(self, base: Path, config: dict):
        self.base = base
        self.settings = base / "settings.json"
        self.settings.write_text(json.dumps({"config": config, "log_level": "INFO"}))
        self.log_path = base / "proxy.log"
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.host = "127.0.0.1"

    def start(self, timeout: float = 20.0) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.imap.run_proxy", str(self.settings)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                self.stop()
                raise RuntimeError("proxy did not start:\n" + self.log_path.read_text())
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError("proxy exited:\n" + self.log_path.read_text())
            line += chunk
        assert line.startswith(b"READY "), line
        self.ports = json.loads(line[6:])

    @property
    def starttls_port(self) -> int:
        return self.ports["starttls"]

    @property
    def tls_port(self) -> int:
        return self.ports["tls"]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def imap_upstream(dovecot):
    """The project's private Dovecot (tests/conftest.py): alice, bob, carol …, LMTP delivery."""
    return dovecot


@pytest.fixture(scope="session")
def gateway_cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("imap-certs")
    cert, key = d / "gateway.crt", d / "gateway.key"
    make_self_signed_cert(cert, key)
    return cert, key


@pytest.fixture(scope="session")
def imap_db(tmp_path_factory):
    url = "sqlite:///" + str(tmp_path_factory.mktemp("imap-db") / "gw.db")
    connect(url)
    alice = create_employee("alice@acme.test", "Alice")
    bob = create_employee("bob@acme.test", "Bob")
    create_customer("Buyer Co", contacts=[("buyer@buyer.test", "Buyer")], owners=[alice])
    create_customer("张伟贸易", contacts=["zhang@china.test"], owners=[alice])
    create_customer("Bobcust", domains=["bobcust.test"], owners=[bob])
    return url


def proxy_config(dovecot: DovecotUpstream, db_url: str, cert: tuple[Path, Path], **imap: object) -> dict:
    starttls, tls = free_ports(2)
    upstream_cfg = {
        "host": "127.0.0.1", "imap_port": dovecot.imaps_port, "imap_security": "tls",
        "ca_file": str(dovecot.cert_path), "timeout": 5.0,
    }
    upstream_cfg.update(imap.pop("upstream", {}))
    return {
        "database": {"url": db_url},
        "tls": {"cert": str(cert[0]), "key": str(cert[1])},
        "upstream": upstream_cfg,
        "relay": {"username": "relay", "password": "relay"},
        "imap": {"listen": "127.0.0.1", "starttls_port": starttls, "tls_port": tls, **imap},
    }


@pytest.fixture(scope="session")
def make_proxy(tmp_path_factory, imap_upstream, imap_db, gateway_cert):
    started: list[ProxyProcess] = []

    def make(**imap: object) -> ProxyProcess:
        p = ProxyProcess(tmp_path_factory.mktemp("imap-proxy"), proxy_config(imap_upstream, imap_db, gateway_cert,
                                                                              **imap))
        p.start()
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


@pytest.fixture(scope="session")
def proxy(make_proxy):
    return make_proxy()
