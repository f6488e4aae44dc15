"""A rule from a rule file: conditions (all must match), exceptions (any one
skips the rule), actions, mode (enforce | audit) and stop.

It fits gateway.policy's Rule protocol (name, priority, mode, evaluate), and
writes one trace step per evaluation: hit or miss, and why.  In audit mode a
hit is recorded with what *would* have happened, and nothing happens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.directory import Directory
from gateway.policy.context import ACCEPT, Context, Verdict
from gateway.rules.actions import Action
from gateway.rules.conditions import Condition
from gateway.rules.env import RuleEnv
from gateway.rules.facts import facts_for

ENFORCE = "enforce"
AUDIT = "audit"


@dataclass
class FileRule:
    name: str
    priority: int
    mode: str
    conditions: list[Condition]
    exceptions: list[Condition]
    actions: list[Action]
    env: RuleEnv
    stop: bool = False
    applies_to_all: bool = False
    description: str = ""
    source: str = ""  # file:line
    delegate: Any = field(default=None, repr=False)  # a built-in rule object (send-conflict)

    def evaluate(self, ctx: Context, directory: Directory) -> Verdict | None:
        facts = facts_for(ctx, directory, self.env)
        if facts.stopped_by:
            ctx.record(self.name, False, f"not evaluated: rule {facts.stopped_by} said stop", self.mode)
            return None
        whys = []
        for cond in self.conditions:
            hit, why = cond.test(facts)
            if not hit:
                ctx.record(self.name, False, f"{cond.name}: {why}", self.mode)
                return None
            whys.append(f"{cond.name}: {why}")
        for exc in self.exceptions:
            hit, why = exc.test(facts)
            if hit:
                ctx.record(self.name, False, f"exception {exc.name}: {why}", self.mode)
                return None
        if self.delegate is not None:
            return self._delegate(ctx, directory, facts)
        verdict = Verdict(rule=self.name)
        notes = [action.contribute(verdict, ctx, self.name) for action in self.actions]
        if self.stop:
            facts.stopped_by = self.name
        why = "; ".join(whys) if whys else "applies to all messages"
        if self.mode == AUDIT:
            ctx.record(self.name, True, f"{why} -> would: {'; '.join(notes)} (audit only)", self.mode)
            return None
        ctx.record(self.name, True, f"{why} -> {'; '.join(notes)}", self.mode)
        if verdict.action == ACCEPT and not verdict.mutations:
            return None
        return verdict

    def _delegate(self, ctx: Context, directory: Directory, facts: Any) -> Verdict | None:
        """Built-in rules write their own trace step and keep their own texts."""
        self.delegate.mode = self.mode
        result = self.delegate.evaluate(ctx, directory)
        if ctx.trace and ctx.trace[-1].rule == self.delegate.name and self.delegate.name != self.name:
            step = ctx.trace[-1]
            step.rule = self.name
        if result is not None and self.stop:
            facts.stopped_by = self.name
        return result

    def describe(self) -> list[str]:
        lines = [f"when {c.describe()}" for c in self.conditions]
        lines += [f"unless {c.describe()}" for c in self.exceptions]
        lines += [f"then {a.describe()}" for a in self.actions]
        return lines
