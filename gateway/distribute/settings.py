"""The [distribution] config section (owned by the distribution area)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DistributionConfig:
    enabled: bool = False
    # Shared mailboxes to watch (login names at the upstream).
    mailboxes: list[str] = field(default_factory=list)


def validate(section: DistributionConfig) -> list[str]:
    return []
