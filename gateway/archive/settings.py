"""The [archive] config section (owned by the archive area)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ArchiveConfig:
    # Where blobs live; empty = <node.data_dir>/archive.
    dir: Path | None = None


def validate(section: ArchiveConfig) -> list[str]:
    return []
