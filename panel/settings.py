"""The [panel] config section (owned by the panel area)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PanelConfig:
    enabled: bool = True
    listen: str = "127.0.0.1"
    port: int = 8025


def validate(section: PanelConfig) -> list[str]:
    return []
