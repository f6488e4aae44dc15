"""The panel inside ``mailgate run``: served on the node's reactor when [panel] enabled."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from panel.server import listen


async def start(node: Any, reactor: Any) -> Callable[[], Awaitable[None]] | None:
    sweeper = _start_pool_sweeper(node)
    if not node.cfg.panel.enabled:
        return sweeper
    server = listen(node.cfg, reactor, node=node)
    node.panel_url = server.url

    async def stop() -> None:
        if sweeper is not None:
            await sweeper()
        await server.stop()

    return stop


def _start_pool_sweeper(node: Any) -> Callable[[], Awaitable[None]] | None:
    """The public pool's daily automatic return (panel/pool.py), when [panel] pool_auto_return."""
    from panel.pool import PoolRules, run_daily

    rules = PoolRules.from_config(node.cfg.panel)
    if not rules.active:
        return None
    task = asyncio.create_task(run_daily(rules, node.stopping), name="pool-sweep")

    async def stop() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    return stop
