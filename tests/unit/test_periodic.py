"""gateway.periodic: a node's background chores."""

from __future__ import annotations

import asyncio

from gateway.periodic import periodically


def test_runs_at_once_survives_a_failure_and_stops() -> None:
    async def main() -> list[int]:
        stopping = asyncio.Event()
        calls: list[int] = []
        third = asyncio.Event()
        loop = asyncio.get_running_loop()

        def chore() -> None:
            calls.append(len(calls))
            if len(calls) == 3:
                loop.call_soon_threadsafe(third.set)
            if len(calls) == 2:
                raise RuntimeError("a bad run")  # logged; the next run still comes

        task = asyncio.create_task(periodically(stopping, chore, 0.01, first=0, failure="chore failed"))
        await asyncio.wait_for(third.wait(), 10)
        stopping.set()
        await asyncio.wait_for(task, 10)
        return calls

    assert asyncio.run(main())[:3] == [0, 1, 2]


def test_first_delay_and_stop_before_the_first_run() -> None:
    async def main() -> list[int]:
        stopping = asyncio.Event()
        calls: list[int] = []
        task = asyncio.create_task(periodically(stopping, lambda: calls.append(1), 0.01, first=3600,
                                                failure="chore failed"))
        await asyncio.sleep(0)
        stopping.set()
        await asyncio.wait_for(task, 10)  # returns at once: no run was due
        return calls

    assert asyncio.run(main()) == []
