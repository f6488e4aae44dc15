"""The [panel] config section (owned by the panel area)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PanelConfig:
    enabled: bool = True
    listen: str = "127.0.0.1"
    port: int = 8025
    # Serve HTTPS with the gateway's [tls] cert/key (else put a TLS reverse proxy in front).
    tls: bool = False
    # Mark cookies Secure even without tls (behind a TLS reverse proxy).
    cookie_secure: bool = False
    # Sign-out after this many minutes without a request, and after this many hours in any case.
    idle_minutes: int = 30
    absolute_hours: int = 12
    # Failed sign-ins: after this many in the window, a login (or an IP) must wait lockout_seconds.
    login_max_failures: int = 5
    login_max_failures_per_ip: int = 30
    login_window: int = 900
    login_lockout: int = 300
    # Worker threads serving requests (each blocking DB or IMAP call holds one).
    threads: int = 10
    # Rows per page in lists.
    page_size: int = 50
    # Public pool (公海) automatic return, swept once a day inside `mailgate run` (panel/pool.py).
    pool_auto_return: bool = False
    pool_days_without_contact: int = 0
    pool_days_after_assignment: int = 0
    pool_exempt_stages: list[str] = field(default_factory=lambda: ["won"])


def validate(section: PanelConfig) -> list[str]:
    problems = []
    if not 0 < section.port < 65536:
        problems.append(f"[panel] port: must be 1-65535 (got {section.port})")
    if section.idle_minutes <= 0 or section.absolute_hours <= 0:
        problems.append("[panel] idle_minutes/absolute_hours: must be positive")
    if section.idle_minutes > section.absolute_hours * 60:
        problems.append("[panel] idle_minutes: must not exceed absolute_hours")
    if section.login_max_failures < 1 or section.login_max_failures_per_ip < section.login_max_failures:
        problems.append("[panel] login_max_failures: need 1 <= login_max_failures <= login_max_failures_per_ip")
    if section.login_window <= 0 or section.login_lockout <= 0:
        problems.append("[panel] login_window/login_lockout: must be positive")
    if not 1 <= section.threads <= 200:
        problems.append("[panel] threads: must be 1-200")
    if not 1 <= section.page_size <= 1000:
        problems.append("[panel] page_size: must be 1-1000")
    from panel.pool import check_rules

    problems += check_rules(section)
    return problems
