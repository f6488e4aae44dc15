"""Background chores of a node: blocking work run in a thread at a fixed interval."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mailgate")


async def periodically(stopping: asyncio.Event, fn: Callable[[], Any], every: float, *,
                       first: float | None = None, failure: str) -> None:
    """Run the blocking ``fn`` in a thread every ``every`` seconds until ``stopping`` is set;
    the first run after ``first`` seconds (default ``every``; 0: at once).  A failure is
    logged (``failure`` is the message) and the next run comes as planned."""
    delay = every if first is None else first
    while not stopping.is_set():
        if delay > 0:
            try:
                await asyncio.wait_for(stopping.wait(), delay)
                return
            except TimeoutError:
                pass
        try:
            await asyncio.to_thread(fn)
        except Exception:
            log.exception(failure)
        delay = every
