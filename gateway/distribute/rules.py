"""Distribution rule files (rules/distribution/*.yaml) with ``file:line: message`` errors.

A file holds ``groups:`` (name -> members and how to pick one) and ``rules:`` (a list).
A rule's ``when:`` conditions must all match (each takes a list: any value matches);
``to:`` names an employee, ``group:`` a group.  Rules run by ``priority`` (lower first),
then file and position.  See rules/distribution/README.md for the format.

This folder is separate from the outbound rules (gateway/rules/loader.py reads only
rules/*.yaml, not subfolders).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway.distribute.inquiry import Inquiry
from gateway.rules.loader import RuleFile

PICKS = ("round-robin", "least-loaded")
CONDITIONS = ("sender_domain", "country", "keyword", "language")
RULE_KEYS = {"name", "description", "priority", "enabled", "when", "to", "group"}
GROUP_KEYS = {"members", "pick"}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,99}$")
# ccTLDs whose country code differs from the ISO 3166 code.
_CCTLD_ALIASES = {"uk": "gb"}


@dataclass(frozen=True)
class Group:
    name: str
    members: tuple[str, ...]
    pick: str = "round-robin"


@dataclass(frozen=True)
class DistRule:
    name: str
    source: str  # file:line
    priority: int
    conditions: dict[str, tuple[str, ...]]
    to: str = ""
    group: str = ""

    def matches(self, inquiry: Inquiry) -> tuple[bool, str]:
        """(matched, why): every condition must hold."""
        reasons = []
        for key, values in self.conditions.items():
            ok, why = MATCHERS[key](inquiry, values)
            if not ok:
                return False, why
            reasons.append(why)
        return True, "; ".join(reasons)


def country_of(domain: str) -> str:
    """The country code of a domain's ccTLD ("" for gTLDs like .com)."""
    tld = domain.rstrip(".").rpartition(".")[2].lower()
    if len(tld) != 2 or not tld.isalpha():
        return ""
    return _CCTLD_ALIASES.get(tld, tld)


def _sender_domain(q: Inquiry, values: tuple[str, ...]) -> tuple[bool, str]:
    domain = q.from_domain
    for v in values:
        if domain == v or domain.endswith("." + v):
            return True, f"sender domain {domain} matches {v}"
    return False, f"sender domain {domain or '-'} not in list"


def _country(q: Inquiry, values: tuple[str, ...]) -> tuple[bool, str]:
    country = country_of(q.from_domain)
    if country and country in values:
        return True, f"country .{country}"
    return False, f"country {country or '-'} not in list"


def _keyword(q: Inquiry, values: tuple[str, ...]) -> tuple[bool, str]:
    haystack = (q.subject + "\n" + q.text).casefold()
    for v in values:
        if v.casefold() in haystack:
            return True, f"keyword {v!r}"
    return False, "no keyword"


def _language(q: Inquiry, values: tuple[str, ...]) -> tuple[bool, str]:
    lang = q.language
    if lang and lang in values:
        return True, f"language {lang}"
    return False, f"language {lang or '?'} not in list"


MATCHERS: dict[str, Callable[[Inquiry, tuple[str, ...]], tuple[bool, str]]] = {
    "sender_domain": _sender_domain,
    "country": _country,
    "keyword": _keyword,
    "language": _language,
}


@dataclass
class RuleSet:
    rules: list[DistRule] = field(default_factory=list)
    groups: dict[str, Group] = field(default_factory=dict)


class _File(RuleFile):
    """A distribution rule file: the rule loader's file (reading, YAML errors with lines) plus
    the few shape checks distribution rules need."""

    def mapping(self, node: Node, what: str, allowed: set[str] | None = None) -> dict[str, tuple[Node, Node]]:
        if not isinstance(node, MappingNode):
            self.error(node, f"{what} must be a mapping (key: value)")
            return {}
        out: dict[str, tuple[Node, Node]] = {}
        for k, v in node.value:
            key = str(k.value) if isinstance(k, ScalarNode) else ""
            if not key:
                self.error(k, f"{what}: keys must be plain words")
            elif key in out:
                self.error(k, f"{what}: {key!r} appears twice")
            elif allowed is not None and key not in allowed:
                self.error(k, f"{what}: unknown key {key!r} (known: {', '.join(sorted(allowed))})")
            else:
                out[key] = (k, v)
        return out

    def scalar(self, node: Node, what: str) -> str | None:
        if not isinstance(node, ScalarNode) or not str(node.value).strip():
            self.error(node, f"{what} must be a single non-empty value")
            return None
        return str(node.value).strip()

    def strings(self, node: Node, what: str) -> tuple[str, ...] | None:
        items = node.value if isinstance(node, SequenceNode) else [node]
        out = []
        for item in items:
            value = self.scalar(item, f"{what} entries")
            if value is None:
                return None
            out.append(value.lower())
        if not out:
            self.error(node, f"{what} must list at least one value")
            return None
        return tuple(out)


def rule_files(directory: Path) -> list[Path]:
    return sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])


def load(directory: str | Path) -> tuple[RuleSet, list[str]]:
    """Load every rule file in ``directory`` (missing folder: no rules); (rule set, errors)."""
    directory = Path(directory)
    errors: list[str] = []
    ruleset = RuleSet()
    if not directory.is_dir():
        return ruleset, errors
    order: list[tuple[int, int, DistRule]] = []
    pending_groups: list[tuple[_File, Node, str]] = []
    for path in rule_files(directory):
        f = _File(path, errors)
        root = f.compose()
        if root is None:
            continue
        top = f.mapping(root, "a distribution rule file", {"groups", "rules"})
        if "groups" in top:
            for name, (key_node, value) in f.mapping(top["groups"][1], "groups").items():
                group = _group(f, name, key_node, value)
                if group is None:
                    continue
                if name in ruleset.groups:
                    f.error(key_node, f"group {name!r} is defined twice")
                ruleset.groups[name] = group
        if "rules" in top:
            node = top["rules"][1]
            if not isinstance(node, SequenceNode):
                f.error(node, "`rules:` must be a list (each rule starts with `- name:`)")
                continue
            for item in node.value:
                rule = _rule(f, item)
                if rule is not None:
                    order.append((rule.priority, len(order), rule))
                    if rule.group:
                        pending_groups.append((f, item, rule.group))
    for f, item, name in pending_groups:
        if name not in ruleset.groups:
            f.error(item, f"group {name!r} is not defined in any file")
    names: dict[str, str] = {}
    for _, _, rule in sorted(order, key=lambda t: (t[0], t[1])):
        if rule.name in names:
            errors.append(f"{rule.source}: rule name {rule.name!r} already used at {names[rule.name]}")
        names[rule.name] = rule.source
        ruleset.rules.append(rule)
    return ruleset, errors


def _group(f: _File, name: str, key_node: Node, node: Node) -> Group | None:
    if not _NAME.match(name):
        f.error(key_node, f"group name {name!r}: lower-case letters, digits, - and _ only")
        return None
    fields = f.mapping(node, f"group {name!r}", GROUP_KEYS)
    if "members" not in fields:
        f.error(node, f"group {name!r} needs `members:`")
        return None
    members = f.strings(fields["members"][1], f"group {name!r} members")
    if members is None:
        return None
    for m in members:
        if "@" not in m:
            f.error(fields["members"][1], f"group {name!r}: member {m!r} is not an address")
            return None
    pick = "round-robin"
    if "pick" in fields:
        pick = f.scalar(fields["pick"][1], "pick") or ""
        if pick not in PICKS:
            f.error(fields["pick"][1], f"group {name!r}: pick must be one of {', '.join(PICKS)}")
            return None
    return Group(name, members, pick)


def _rule(f: _File, node: Node) -> DistRule | None:
    fields = f.mapping(node, "a rule", RULE_KEYS)
    if not fields:
        return None
    before = len(f.errors)
    name = f.scalar(fields["name"][1], "name") if "name" in fields else None
    if name is None and "name" not in fields:
        f.error(node, "a rule needs `name:`")
    elif name is not None and not _NAME.match(name):
        f.error(fields["name"][1], f"rule name {name!r}: lower-case letters, digits, - and _ only")
    priority = 100
    if "priority" in fields:
        text = f.scalar(fields["priority"][1], "priority") or ""
        if not text.lstrip("-").isdigit():
            f.error(fields["priority"][1], "priority must be a whole number")
        else:
            priority = int(text)
    if "enabled" in fields:
        enabled = (f.scalar(fields["enabled"][1], "enabled") or "").lower()
        if enabled not in ("true", "false"):
            f.error(fields["enabled"][1], "enabled must be true or false")
        elif enabled == "false":
            return None
    conditions: dict[str, tuple[str, ...]] = {}
    if "when" not in fields:
        f.error(node, "a rule needs `when:` (at least one condition)")
    else:
        for key, (_, value) in f.mapping(fields["when"][1], "when", set(CONDITIONS)).items():
            values = f.strings(value, key)
            if values is not None:
                if key == "country" and any(len(v) != 2 or not v.isalpha() for v in values):
                    f.error(value, "country: two-letter codes (de, jp, br …)")
                conditions[key] = tuple(_CCTLD_ALIASES.get(v, v) for v in values) if key == "country" else values
        if not conditions and len(f.errors) == before:
            f.error(fields["when"][1], "when: needs at least one condition")
    to = f.scalar(fields["to"][1], "to") if "to" in fields else ""
    group = f.scalar(fields["group"][1], "group") if "group" in fields else ""
    if bool(to) == bool(group) and "to" not in fields and "group" not in fields:
        f.error(node, "a rule needs `to:` (an employee) or `group:`")
    elif "to" in fields and "group" in fields:
        f.error(fields["group"][0], "a rule has either `to:` or `group:`, not both")
    elif to and "@" not in to:
        f.error(fields["to"][1], f"to: {to!r} is not an employee address")
    if len(f.errors) != before or name is None:
        return None
    return DistRule(name=name, source=f"{f.path}:{node.start_mark.line + 1}", priority=priority,
                    conditions=conditions, to=(to or "").lower(), group=group or "")


class RuleReloader:
    """Reloads the rule folder when a file changes; a broken set is refused and the last good one kept."""

    def __init__(self, directory: str | Path, on_load: Callable[[RuleSet], None] | None = None):
        self.directory = Path(directory)
        self.on_load = on_load
        self.errors: list[str] = []
        self._signature: tuple = ()
        self.ruleset = RuleSet()

    def signature(self) -> tuple:
        if not self.directory.is_dir():
            return ()
        out = []
        for path in rule_files(self.directory):
            try:
                st = path.stat()
            except OSError:
                continue
            out.append((path.name, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def initial(self) -> list[str]:
        """First load: the errors (empty = loaded)."""
        self._signature = self.signature()
        ruleset, self.errors = load(self.directory)
        if not self.errors:
            self._use(ruleset)
        return self.errors

    def check(self) -> bool:
        """Reload if anything changed; True when a new set is in use."""
        signature = self.signature()
        if signature == self._signature:
            return False
        self._signature = signature
        ruleset, self.errors = load(self.directory)
        if self.errors:
            import logging

            logging.getLogger("mailgate.distribute").error(
                "distribution rules not reloaded, keeping the running set:\n  %s", "\n  ".join(self.errors))
            return False
        self._use(ruleset)
        return True

    def _use(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        if self.on_load is not None:
            self.on_load(ruleset)
