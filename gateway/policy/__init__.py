"""The outbound policy entry point (docs/ARCHITECTURE.md §2, step 1: decide).

``Policy.decide(ctx)`` runs every rule in priority order, records each in the
trace, and returns one Verdict.  The first rule in enforce mode that rejects
ends the evaluation; a hold is remembered and returned unless a later rule
rejects; accepting rules may add mutations.  Rules are small objects with
``name``, ``priority``, ``mode`` and ``evaluate(ctx, directory)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from gateway.directory import Directory
from gateway.policy.conflict import SendConflict
from gateway.policy.context import ACCEPT, HOLD, REJECT, Context, Verdict


class Rule(Protocol):
    name: str
    priority: int
    mode: str

    def evaluate(self, ctx: Context, directory: Directory) -> Verdict | None: ...


def builtin_rules() -> list[Rule]:
    return [SendConflict()]


class Policy:
    def __init__(self, directory: Directory, rules: Iterable[Rule] | None = None):
        self.directory = directory
        self.rules: list[Rule] = sorted(rules if rules is not None else builtin_rules(), key=lambda r: r.priority)

    def replace_rules(self, rules: Iterable[Rule]) -> None:
        """Swap the rule set atomically (one assignment)."""
        self.rules = sorted(rules, key=lambda r: r.priority)

    def decide(self, ctx: Context) -> Verdict:
        verdict = Verdict()
        for rule in list(self.rules):
            result = rule.evaluate(ctx, self.directory)
            if result is None:
                continue
            if result.action == REJECT:
                result.mutations = []
                return result
            if result.action == HOLD and verdict.action == ACCEPT:
                result.mutations = verdict.mutations + result.mutations
                verdict = result
            else:
                verdict.mutations.extend(result.mutations)
        return verdict


__all__ = ["ACCEPT", "HOLD", "REJECT", "Context", "Policy", "Rule", "Verdict"]
