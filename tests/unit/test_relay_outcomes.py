"""The schedule of relay outcomes waiting to be recorded again (gateway.relayoutcomes)."""

from __future__ import annotations

from gateway.relayoutcomes import UnrecordedOutcomes


class Ticks:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_from_half_a_second_up_to_the_cap():
    waiting = UnrecordedOutcomes(clock=Ticks())
    assert [waiting.keep(f"o{n}", n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert waiting.keep("huge", 10_000) == 4.0  # no overflow for a long outage


def test_only_due_outcomes_are_taken_earliest_first():
    ticks = Ticks()
    waiting = UnrecordedOutcomes(clock=ticks)
    waiting.keep("late", 3)  # due in 2 s
    waiting.keep("early", 1)  # due in 0.5 s
    assert waiting.due() == [] and len(waiting) == 2
    assert waiting.wait_hint() == 0.5
    ticks.now += 0.5
    assert waiting.wait_hint() == 0.0
    assert waiting.due() == ["early"]
    assert waiting.due() == []  # taken out: the caller tries it, and keeps it again if it fails
    assert waiting.wait_hint() == 1.5
    ticks.now += 5
    assert waiting.due() == ["late"] and len(waiting) == 0
    assert waiting.wait_hint() == waiting.first  # nothing waits: how long a waiting thread may block


def test_closed_it_hands_back_what_waits_and_keeps_nothing_more():
    waiting = UnrecordedOutcomes(clock=Ticks())
    waiting.keep("a", 1)
    waiting.keep("b", 2)
    assert sorted(waiting.close()) == ["a", "b"]
    assert waiting.keep("c", 1) is None  # a failure answered after the close: given up by the caller
    assert len(waiting) == 0 and waiting.close() == []
