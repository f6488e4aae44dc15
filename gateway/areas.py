"""Optional areas: modules that plug subcommands and services into the node.

An area (archive, distribution, panel) lives in its own package; the core imports
its hooks by name and skips an area whose module does not exist.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Each has ``add_parsers(subparsers)``: the area's `mailgate` subcommands.
AREA_CLIS = ("gateway.rules.cli", "gateway.archive.cli", "gateway.distribute.cli", "panel.cli")

# Each has ``async def start(node, reactor) -> (async () -> None) | None``: the area's
# long-running service, started after the mail services; the returned coroutine
# function stops it (areas stop first, in reverse order).
AREA_SERVICES = ("gateway.archive.service", "gateway.distribute.service", "panel.service")


def optional_module(name: str) -> ModuleType | None:
    """Import ``name``; None if that module does not exist (a real import error inside it raises)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return None
