"""Loading rule files: the format, file:line errors, the shipped rules."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.policy import Policy
from gateway.policy.conflict import SendConflict
from gateway.rules.loader import load_rules

REPO_RULES = Path(__file__).resolve().parents[3] / "rules"


def write(tmp_path: Path, name: str, text: str) -> Path:
    d = tmp_path / "rules"
    d.mkdir(exist_ok=True)
    (d / name).write_text(textwrap.dedent(text))
    return d


def errors_of(tmp_path, text, world=None):
    d = write(tmp_path, "10-x.yaml", text)
    return load_rules(d, world.env if world else None)[1]


def test_shipped_rules_load_cleanly():
    rules, errors = load_rules(REPO_RULES)
    assert errors == []
    names = [r.name for r in rules]
    assert names[0] == "send-conflict"
    assert all(r.mode == "audit" for r in rules if r.name != "send-conflict")


def test_shipped_send_conflict_gives_the_builtin_text(world, ctx_factory):
    rules, _ = load_rules(REPO_RULES, world.env)
    ctx = ctx_factory(to=("x@col.example", "buyer@own.example"))
    from_files = Policy(world.directory, rules).decide(ctx)
    ctx2 = ctx_factory(to=("x@col.example", "buyer@own.example"))
    builtin = Policy(world.directory, [SendConflict()]).decide(ctx2)
    assert from_files.action == "reject"
    assert (from_files.rule, from_files.reason, from_files.smtp_code, from_files.enhanced) == \
        (builtin.rule, builtin.reason, 550, "5.7.1")
    assert "x@col.example" in from_files.reason and "Carol" in from_files.reason


def test_a_full_rule(tmp_path, world):
    d = write(tmp_path, "10-a.yaml", """
        groups:
          eu: [alice@acme.test]
        rules:
          - name: eu-quotes
            description: test
            priority: 5
            mode: enforce
            conditions:
              sender-group: eu
              subject-contains: [quote, 报价]
            exceptions:
              recipient-relationship: internal
            actions:
              - prepend_subject: "[EU] "
              - add_header: {name: X-Team, value: eu}
            stop: true
    """)
    rules, errors = load_rules(d, world.env)
    assert errors == []
    (rule,) = rules
    assert (rule.name, rule.priority, rule.mode, rule.stop) == ("eu-quotes", 5, "enforce", True)
    assert rule.source.endswith("10-a.yaml:5")
    assert [a.name for a in rule.actions] == ["prepend_subject", "add_header"]


@pytest.mark.parametrize("text,line,fragment", [
    ("rules:\n  - name: a\n    conditons: {sender: x}\n    actions: [{reject: nope}]\n", 3,
     "unknown rule key 'conditons' (did you mean 'conditions'?)"),
    ("rules:\n  - name: a\n    conditions:\n      sender-rol: x\n    actions: [{reject: nope}]\n", 4,
     "unknown condition 'sender-rol'"),
    ("rules:\n  - name: a\n    conditions: {sender: x}\n    actions:\n      - rejekt: no\n", 5,
     "unknown action 'rejekt'"),
    ("rules:\n  - name: a\n    conditions:\n      message-size: huge\n    actions: [{reject: nope}]\n", 4,
     "message-size: 'huge'"),
    ("rules:\n  - name: a\n    mode: loud\n    conditions: {sender: x}\n    actions: [{reject: nope}]\n", 3,
     "mode: enforce or audit"),
    ("rules:\n  - name: a\n    priority: high\n    conditions: {sender: x}\n    actions: [{reject: nope}]\n", 3,
     "priority: expected int"),
    ("rules:\n  - name: a\n    conditions: {sender: x}\n", 2, "no `actions:`"),
    ("rules:\n  - name: a\n    conditions: {sender: x}\n    actions:\n      - reject: {reason: x, code: 250}\n", 5,
     "code 250"),
    ("rules:\n  - name: a\n   bad indent: [\n", 3, "YAML syntax"),
    ("rules:\n  - name: a\n    name: b\n    actions: [{reject: nope}]\n", 3, "'name' appears twice"),
    ("rulez: []\n", 1, "unknown top-level key"),
    ("rules:\n  - name: Bad Name\n    conditions: {sender: x}\n    actions: [{reject: nope}]\n", 2, "name 'Bad Name'"),
    ("rules:\n  - name: a\n    conditions: {sender-group: ghosts}\n    actions: [{reject: nope}]\n", 3,
     "unknown group"),
    ("rules:\n  - name: a\n    builtin: magic\n", 3, "unknown builtin"),
])
def test_errors_have_file_and_line(tmp_path, world, text, line, fragment):
    d = write(tmp_path, "10-x.yaml", text)
    _, errors = load_rules(d, world.env)
    assert errors, "expected an error"
    assert any(e.startswith(f"{d / '10-x.yaml'}:{line}: ") and fragment in e for e in errors), errors


def test_duplicate_rule_names_across_files(tmp_path, world):
    dup = "rules:\n  - name: dup\n    conditions: {sender: x}\n    actions: [{reject: nope}]\n"
    write(tmp_path, "10-a.yaml", dup)
    d = write(tmp_path, "20-b.yaml", dup)
    _, errors = load_rules(d, world.env)
    assert len(errors) == 1 and "20-b.yaml:2:" in errors[0] and "10-a.yaml:2" in errors[0]


def test_every_error_is_reported_at_once(tmp_path, world):
    write(tmp_path, "10-a.yaml", "rules:\n  - name: a\n    conditions: {nope: x}\n    actions: [{reject: nope}]\n")
    d = write(tmp_path, "20-b.yaml", "rules:\n  - name: b\n    conditions: {sender: x}\n    actions: [{nada: 1}]\n")
    _, errors = load_rules(d, world.env)
    assert len(errors) == 2


@pytest.mark.parametrize("action", ["- reject: refused", "- hold_for_approval: [manager]"])
@pytest.mark.parametrize("conditions", ["", "    conditions:\n      message-size: '>= 0'\n",
                                        "    conditions:\n      day-of-week: mon-sun\n"])
def test_a_rule_that_blocks_everything_is_refused(tmp_path, world, action, conditions):
    text = f"rules:\n  - name: all\n{conditions}    actions:\n      {action}\n"
    errors = errors_of(tmp_path, text, world)
    assert len(errors) == 1 and "every message" in errors[0] and "applies_to_all" in errors[0]
    ok = f"rules:\n  - name: all\n    applies_to_all: true\n{conditions}    actions:\n      {action}\n"
    assert errors_of(tmp_path, ok, world) == []


def test_exceptions_do_not_make_a_catch_all_acceptable(tmp_path, world):
    text = "rules:\n  - name: all\n    exceptions: {sender-role: dept_head}\n    actions: [{reject: nope}]\n"
    assert "every message" in errors_of(tmp_path, text, world)[0]


def test_a_catch_all_that_only_tags_is_fine(tmp_path, world):
    assert errors_of(tmp_path, "rules:\n  - name: t\n    actions: [{prepend_subject: '[x] '}]\n", world) == []


def test_disabled_rules_are_checked_but_not_loaded(tmp_path, world):
    d = write(tmp_path, "10-a.yaml", "rules:\n  - name: a\n    enabled: false\n    builtin: send-conflict\n")
    assert load_rules(d, world.env) == ([], [])


def test_missing_directory(tmp_path):
    rules, errors = load_rules(tmp_path / "nope")
    assert rules == [] and "does not exist" in errors[0]


def test_empty_file_is_fine(tmp_path):
    d = write(tmp_path, "10-a.yaml", "# nothing yet\n")
    assert load_rules(d) == ([], [])
