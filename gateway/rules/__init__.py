"""Rule files: company policy in rules/*.yaml (docs/ARCHITECTURE.md §2, step 1).

loader     YAML -> rule objects, file:line errors
conditions one class per condition, by kebab-case name
actions    reject, hold_for_approval, rewrite_sender, add_header, prepend_subject, add_bcc, notify
rule       the rule object gateway.policy.Policy runs
watcher    hot reload; a broken set never replaces the running rules
dryrun     the trace printer of `mailgate rules test`
cli        `mailgate rules check|test` and `mailgate approvals …`
"""

from __future__ import annotations

from typing import Any


def load_rules(directory: Any, env: Any = None) -> tuple[list, list[str]]:
    """See gateway.rules.loader.load_rules (imported lazily: gateway.rewrite and
    gateway.dkim use gateway.rules.headerblock without loading the whole engine)."""
    from gateway.rules.loader import load_rules as _load

    return _load(directory, env)


__all__ = ["load_rules"]
