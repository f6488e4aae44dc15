"""The node's stop waits for its tasks together, within one grace period."""

from __future__ import annotations

import asyncio
import logging

from gateway.service import _finish_tasks


def test_tasks_end_together_and_stuck_ones_are_cancelled_at_once_by_name(caplog) -> None:
    async def scenario() -> tuple[list[str], list[bool], list[asyncio.Task]]:
        stopping = asyncio.Event()
        ended: list[str] = []
        other_already_cancelled: list[bool] = []
        tasks: list[asyncio.Task] = []

        async def ends_after_stop(name: str) -> None:
            await stopping.wait()
            for _ in range(3):  # some work to finish after the stop, as a real task has
                await asyncio.sleep(0)
            ended.append(name)

        async def stuck(other: int) -> None:
            try:
                await asyncio.Event().wait()  # ignores the stop
            except asyncio.CancelledError:
                # Waited for together, both stuck tasks are cancelled in one go; one after the
                # other, the second would still be waiting out a grace period of its own.
                other_already_cancelled.append(tasks[other].cancelling() > 0 or tasks[other].done())
                raise

        async def fails() -> None:
            await stopping.wait()
            raise RuntimeError("boom while stopping")

        loop = asyncio.get_running_loop()
        tasks += [loop.create_task(ends_after_stop(f"t{i}"), name=f"t{i}") for i in range(3)]
        tasks += [loop.create_task(stuck(4), name="stuck-a"), loop.create_task(stuck(3), name="stuck-b"),
                  loop.create_task(fails(), name="fails")]
        stopping.set()
        await _finish_tasks(tasks, grace=0.5)
        return ended, other_already_cancelled, tasks

    with caplog.at_level(logging.WARNING, logger="mailgate"):
        ended, other_already_cancelled, tasks = asyncio.run(scenario())
    assert sorted(ended) == ["t0", "t1", "t2"]
    assert tasks[3].cancelled() and tasks[4].cancelled()
    assert other_already_cancelled == [True, True]
    messages = [r.getMessage() for r in caplog.records]
    assert any("task stuck-a did not end within 0.5 s" in m for m in messages), messages
    assert any("task fails failed while stopping" in m for m in messages), messages
