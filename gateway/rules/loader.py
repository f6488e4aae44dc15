"""Rule files (rules/*.yaml) -> rule objects, with ``file:line: message`` errors.

Each file is a YAML mapping with ``rules:`` (a list of rules) and optionally
``groups:`` (name -> list of addresses, usable by ``sender-group`` in any file).
The document is *composed* (not just loaded) so every key keeps its line
number for error messages.  ``load_rules`` reads the whole directory and
returns every problem at once; callers must not use a set that has errors
(see gateway.rules.watcher) — a broken set never replaces working rules.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway.rules.actions import ACTIONS
from gateway.rules.conditions import CONDITIONS
from gateway.rules.env import DepartmentIndex, DomainHistory, RuleEnv
from gateway.rules.rule import AUDIT, ENFORCE, FileRule

RULE_KEYS = {
    "name", "description", "priority", "mode", "enabled", "conditions", "exceptions",
    "actions", "stop", "applies_to_all", "builtin",
}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,99}$")

# Shared across reloads, so the contact history and the department cache survive a reload.
_SHARED_DEPARTMENTS = DepartmentIndex()
_SHARED_HISTORY = DomainHistory()


def _builtins() -> dict[str, Any]:
    from gateway.policy.conflict import SendConflict

    return {"send-conflict": SendConflict}


class RuleFile:
    """One composed rule file: constructs values and formats errors with lines."""

    def __init__(self, path: Path, errors: list[str]):
        self.path = path
        self.errors = errors
        self.loader: yaml.SafeLoader | None = None

    def error(self, node: Node | None, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.errors.append(f"{self.path}:{line}: {message}")

    def compose(self) -> Node | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.errors.append(f"{self.path}:1: cannot read: {exc}")
            return None
        try:
            self.loader = yaml.SafeLoader(text)
            return self.loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else 1
            self.errors.append(f"{self.path}:{line}: YAML syntax: {exc.problem or exc.context}")
        except yaml.YAMLError as exc:
            self.errors.append(f"{self.path}:1: YAML: {exc}")
        return None

    def value(self, node: Node) -> Any:
        assert self.loader is not None
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self.error(node, f"YAML: {exc}")
            return None

    def pairs(self, node: Node, what: str) -> list[tuple[str, Node, Node]] | None:
        """(key, key node, value node) of a mapping; duplicate keys are errors."""
        if not isinstance(node, MappingNode):
            self.error(node, f"{what} must be a mapping (key: value)")
            return None
        seen: set[str] = set()
        out = []
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.error(key_node, f"{what}: keys must be plain words")
                continue
            key = str(key_node.value)
            if key in seen:
                self.error(key_node, f"{what}: {key!r} appears twice")
                continue
            seen.add(key)
            out.append((key, key_node, value_node))
        return out


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _rule_files(directory: Path) -> list[Path]:
    return sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])


def load_rules(directory: str | Path, env: RuleEnv | None = None) -> tuple[list[FileRule], list[str]]:
    """Load every rule file in ``directory``: (rules by priority, errors)."""
    directory = Path(directory)
    errors: list[str] = []
    if not directory.is_dir():
        return [], [f"{directory}:0: rules directory does not exist"]
    documents: list[tuple[RuleFile, list[tuple[str, Node, Node]]]] = []
    groups: dict[str, frozenset[str]] = {}
    for path in _rule_files(directory):
        f = RuleFile(path, errors)
        root = f.compose()
        if root is None:
            continue
        top = f.pairs(root, "a rule file")
        if top is None:
            continue
        for key, key_node, value_node in top:
            if key == "groups":
                _read_groups(f, value_node, groups)
            elif key != "rules":
                f.error(key_node, f"unknown top-level key {key!r}; a rule file has `rules:` and `groups:`")
        documents.append((f, top))
    env = dataclasses.replace(env or RuleEnv(departments=_SHARED_DEPARTMENTS, history=_SHARED_HISTORY), groups=groups)
    rules: list[FileRule] = []
    names: dict[str, str] = {}
    for f, top in documents:
        for key, _, value_node in top:
            if key != "rules":
                continue
            if not isinstance(value_node, SequenceNode):
                f.error(value_node, "`rules:` must be a list (each rule starts with `- name:`)")
                continue
            for rule_node in value_node.value:
                rule = _build_rule(f, rule_node, env)
                if rule is None:
                    continue
                if rule.name in names:
                    f.error(rule_node, f"rule name {rule.name!r} already used at {names[rule.name]}")
                    continue
                names[rule.name] = rule.source
                if rule.enabled:
                    rules.append(rule.rule)
    rules.sort(key=lambda r: (r.priority, r.name))
    return rules, errors


def _read_groups(f: RuleFile, node: Node, groups: dict[str, frozenset[str]]) -> None:
    for name, key_node, value_node in f.pairs(node, "groups") or []:
        value = f.value(value_node)
        members = value if isinstance(value, list) else [value]
        if not members or not all(isinstance(m, str) and "@" in m for m in members):
            f.error(value_node, f"group {name!r}: a list of e-mail addresses")
            continue
        if name in groups:
            f.error(key_node, f"group {name!r} is defined twice")
            continue
        groups[name] = frozenset(m.strip().lower() for m in members)


@dataclasses.dataclass
class _Built:
    rule: FileRule
    enabled: bool

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def source(self) -> str:
        return self.rule.source


def _build_rule(f: RuleFile, node: Node, env: RuleEnv) -> _Built | None:
    pairs = f.pairs(node, "a rule")
    if pairs is None:
        return None
    n_errors = len(f.errors)
    fields = {key: (key_node, value_node) for key, key_node, value_node in pairs}
    for key, (key_node, _) in fields.items():
        if key not in RULE_KEYS:
            f.error(key_node, f"unknown rule key {key!r}{_suggest(key, RULE_KEYS)}")

    def scalar(key: str, kind: type, default: Any) -> Any:
        if key not in fields:
            return default
        value = f.value(fields[key][1])
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            f.error(fields[key][1], f"{key}: expected {kind.__name__}, got {value!r}")
            return default
        return value

    name = scalar("name", str, "")
    if not name:
        f.error(node, "rule without `name:`")
    elif not _NAME.match(name):
        f.error(fields["name"][1], f"name {name!r}: lower-case letters, digits, - and _")
    label = f"rule {name!r}" if name else "rule"
    priority = scalar("priority", int, 100)
    mode = scalar("mode", str, ENFORCE)
    if mode not in (ENFORCE, AUDIT):
        f.error(fields["mode"][1], f"mode: enforce or audit (got {mode!r})")
    enabled = scalar("enabled", bool, True)
    stop = scalar("stop", bool, False)
    applies_to_all = scalar("applies_to_all", bool, False)
    description = scalar("description", str, "")
    builtin_name = scalar("builtin", str, "")
    conditions = _conditions(f, fields.get("conditions"), env, "conditions")
    exceptions = _conditions(f, fields.get("exceptions"), env, "exceptions")
    actions = _actions(f, fields.get("actions"), env)

    delegate = None
    if builtin_name:
        builtins = _builtins()
        if builtin_name not in builtins:
            f.error(fields["builtin"][1], f"unknown builtin {builtin_name!r}; known: {', '.join(builtins)}")
        else:
            delegate = builtins[builtin_name]()
        if "actions" in fields:
            f.error(fields["actions"][0], f"{label}: a builtin rule has its own action; remove `actions:`")
    elif "actions" not in fields:
        f.error(node, f"{label}: no `actions:`")

    blocking = [a.name for a in actions if a.blocks]
    clean = len(f.errors) == n_errors  # a broken condition must not look like "no conditions"
    if clean and blocking and not applies_to_all and all(c.matches_everything() for c in conditions):
        f.error(node, f"{label} would {blocking[0]} every message: add conditions, "
                      "or say `applies_to_all: true` if that is really meant")
    if len(f.errors) > n_errors:
        return None
    rule = FileRule(
        name=name, priority=priority, mode=mode, conditions=conditions, exceptions=exceptions,
        actions=actions, env=env, stop=stop, applies_to_all=applies_to_all, description=description,
        source=f"{f.path}:{node.start_mark.line + 1}", delegate=delegate,
    )
    return _Built(rule, enabled)


def _conditions(f: RuleFile, entry: tuple[Node, Node] | None, env: RuleEnv, what: str) -> list:
    if entry is None:
        return []
    out = []
    for key, key_node, value_node in f.pairs(entry[1], what) or []:
        cls = CONDITIONS.get(key)
        if cls is None:
            f.error(key_node, f"unknown condition {key!r}{_suggest(key, CONDITIONS)}")
            continue
        try:
            out.append(cls(f.value(value_node), env))
        except ValueError as exc:
            f.error(value_node, f"{key}: {exc}")
    return out


def _actions(f: RuleFile, entry: tuple[Node, Node] | None, env: RuleEnv) -> list:
    if entry is None:
        return []
    node = entry[1]
    if not isinstance(node, SequenceNode) or not node.value:
        f.error(node, "actions: a list, e.g. `- reject: \"reason\"`")
        return []
    out = []
    for item in node.value:
        pairs = f.pairs(item, "an action")
        if pairs is None:
            continue
        if len(pairs) != 1:
            f.error(item, "each action is one `- name: value` item")
            continue
        key, key_node, value_node = pairs[0]
        cls = ACTIONS.get(key)
        if cls is None:
            f.error(key_node, f"unknown action {key!r}{_suggest(key, ACTIONS)}")
            continue
        try:
            out.append(cls(f.value(value_node), env))
        except ValueError as exc:
            f.error(value_node, f"{key}: {exc}")
    return out
