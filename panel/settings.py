"""The [panel] config section (owned by the panel area)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PanelConfig:
    enabled: bool = True
    listen: str = "127.0.0.1"
    port: int = 8025
    # Public pool (公海) automatic return, swept once a day inside `mailgate run` (panel/pool.py).
    pool_auto_return: bool = False
    pool_days_without_contact: int = 0
    pool_days_after_assignment: int = 0
    pool_exempt_stages: list[str] = field(default_factory=lambda: ["won"])


def validate(section: PanelConfig) -> list[str]:
    from panel.pool import check_rules

    return check_rules(section)
