"""``mailgate check``: every problem one line, nothing changed.  ``run_checks`` lists
failures; ``config_warnings`` settings that work but are probably not meant (a warning,
never a failure)."""

from __future__ import annotations

import datetime as dt
import smtplib
import socket
import ssl
from pathlib import Path

from gateway.config import Config


def run_checks(cfg: Config, network: bool = True) -> list[str]:
    problems: list[str] = []
    problems += check_database(cfg)
    problems += check_tls(cfg)
    problems += check_rules(cfg)
    problems += check_dirs(cfg)
    if network:
        problems += check_upstream(cfg)
    return problems


def config_warnings(cfg: Config) -> list[str]:
    """Settings that are valid but probably not what was meant (not failures: a deployment may
    want them): say them, e.g. ``WARN <line>``."""
    from gateway.archive.settings import capture_problem

    problem = capture_problem(cfg.archive)
    return [problem] if problem else []


def check_database(cfg: Config) -> list[str]:
    from gateway.db import connect
    from gateway.db.migrations import applied_versions, pending

    url = cfg.database.url
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        return [f"database: no schema yet ({url[len('sqlite:///'):]} does not exist; run `mailgate init`)"]
    try:
        db = connect(url, migrate=False)
        try:
            done = applied_versions(db)
            missing = pending(db)
        finally:
            db.close()
    except Exception as exc:
        return [f"database: cannot open {cfg.database.url.split('@')[-1]}: {exc}"]
    if not done:
        return ["database: no schema yet (run `mailgate init`)"]
    if missing:
        return [f"database: migrations {missing} not applied (run `mailgate init` to migrate)"]
    return []


def check_tls(cfg: Config) -> list[str]:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cfg.tls.cert.read_bytes())
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cfg.tls.cert), str(cfg.tls.key))
    except FileNotFoundError as exc:
        return [f"tls: {exc.filename} missing (run `mailgate init` or configure [tls])"]
    except (ValueError, ssl.SSLError) as exc:
        return [f"tls: certificate/key unusable: {exc}"]
    if cert.not_valid_after_utc < dt.datetime.now(dt.UTC):
        return [f"tls: certificate {cfg.tls.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}"]
    return []


def check_rules(cfg: Config) -> list[str]:
    if not cfg.rules.dir.is_dir():
        return [f"rules: directory {cfg.rules.dir} does not exist"]
    try:
        from gateway.rules.loader import load_rules
    except ImportError:
        return []
    _, errors = load_rules(cfg.rules.dir)
    return [f"rules: {e}" for e in errors]


def check_dirs(cfg: Config) -> list[str]:
    problems = []
    for name, path in (("spool", cfg.spool_dir), ("archive", cfg.archive_dir)):
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".check"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as exc:
            problems.append(f"{name}: {path} not writable: {exc.strerror}")
    return problems


def _tls(cfg: Config) -> ssl.SSLContext:
    from gateway.smtp.auth import tls_context

    return tls_context(cfg)


def check_upstream(cfg: Config) -> list[str]:
    up = cfg.upstream
    problems = []
    try:
        with socket.create_connection((up.host, up.imap_port), timeout=10) as sock:
            if up.imap_security == "tls":
                with _tls(cfg).wrap_socket(sock, server_hostname=up.host) as tls:
                    greeting = tls.recv(512)
            else:
                greeting = sock.recv(512)
            if not greeting.startswith(b"* OK"):
                problems.append(f"upstream imap {up.host}:{up.imap_port}: unexpected greeting {greeting[:60]!r}")
    except (OSError, ssl.SSLError) as exc:
        problems.append(f"upstream imap {up.host}:{up.imap_port}: {exc}")
    try:
        if up.submission_security == "tls":
            conn = smtplib.SMTP_SSL(up.host, up.submission_port, timeout=10, context=_tls(cfg))
        else:
            conn = smtplib.SMTP(up.host, up.submission_port, timeout=10)
        with conn:
            conn.ehlo(cfg.smtp.hostname)
            if up.submission_security == "starttls":
                conn.starttls(context=_tls(cfg))
                conn.ehlo(cfg.smtp.hostname)
            if cfg.relay.mode == "relay_account" and cfg.relay.username:
                try:
                    conn.login(cfg.relay.username, cfg.relay.password)
                except smtplib.SMTPAuthenticationError as exc:
                    problems.append(f"relay account {cfg.relay.username}: upstream refused the login ({exc.smtp_code})")
    except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
        problems.append(f"upstream submission {up.host}:{up.submission_port}: {exc}")
    return problems
