#!/usr/bin/env python3
"""Rule evaluation cost: µs per message with 50 rules and 100k customers.

    python scripts/bench_rules.py [--customers 100000] [--rules 50] [--messages 5000]

Builds a throw-away SQLite directory (100k customers, one domain and contact each,
owned by 200 employees), 50 enforce-mode rules mixing sender, relationship,
customer-attribute, domain, subject and size conditions (no body/attachment
conditions: those parse MIME, ~10 ms/MB, and are measured separately below),
then times Policy.decide on messages to a mix of own, colleague and unknown
recipients.  Target: <= 200 µs per message.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.config import PUBLIC_MAIL_DOMAINS  # noqa: E402
from gateway.db import connect  # noqa: E402
from gateway.db.models import CompanyDomain, Contact, Customer, Department, Employee, Ownership, database  # noqa: E402
from gateway.directory import Directory  # noqa: E402
from gateway.policy import Policy  # noqa: E402
from gateway.policy.context import Context  # noqa: E402
from gateway.rules.env import DepartmentIndex, DomainHistory, RuleEnv  # noqa: E402
from gateway.rules.loader import load_rules  # noqa: E402

RULE_TEMPLATES = [
    "conditions: {{recipient-relationship: [colleague, public-pool], sender-role: [trainee{i}]}}\n"
    "    actions: [{{reject: r{i}}}]",
    "conditions: {{recipient-tag: [tag{i}], subject-contains: [urgent{i}]}}\n"
    "    actions: [{{prepend_subject: '[{i}] '}}]",
    "conditions: {{recipient-country: [C{i}], sender-department: [Dept{i}]}}\n"
    "    actions: [{{hold_for_approval: [manager]}}]",
    "conditions: {{recipient-domain: [blocked{i}.example], message-size: '> 20MB'}}\n    actions: [{{reject: r{i}}}]",
    "conditions: {{subject-regex: ['^PO-{i}\\\\d+'], recipient-stage: [stage{i}]}}\n"
    "    actions: [{{add_header: {{name: X-R{i}, value: '1'}}}}]",
]


def build_db(path: Path, customers: int) -> Directory:
    connect("sqlite:///" + str(path))
    with database.atomic():
        dept = Department.create(name="Sales")
        Employee.insert_many([{"email": f"e{i}@acme.test", "name": f"E{i}", "department": dept.id}
                              for i in range(200)]).execute()
        for start in range(0, customers, 5000):
            batch = range(start, min(start + 5000, customers))
            Customer.insert_many([{"name": f"C{i}", "stage": "lead", "tags": "a,b", "country": "DE"}
                                  for i in batch]).execute()
            CompanyDomain.insert_many([{"customer": i + 1, "domain": f"c{i}.example"} for i in batch]).execute()
            Contact.insert_many([{"customer": i + 1, "email": f"buyer@c{i}.example"} for i in batch]).execute()
            Ownership.insert_many([{"customer": i + 1, "employee": i % 200 + 1} for i in batch]).execute()
    directory = Directory(["acme.test"], PUBLIC_MAIL_DOMAINS)
    directory.load()
    return directory


def write_rules(d: Path, n: int) -> None:
    d.mkdir()
    text = "rules:\n" + "".join(
        f"  - name: r{i}\n    priority: {100 + i}\n    {RULE_TEMPLATES[i % len(RULE_TEMPLATES)].format(i=i)}\n"
        for i in range(n)
    )
    (d / "50-bench.yaml").write_text(text)
    (d / "00-send-conflict.yaml").write_text("rules:\n  - name: send-conflict\n    builtin: send-conflict\n")


def messages(directory: Directory, customers: int, count: int) -> list[tuple[str, list[str], bytes]]:
    rnd = random.Random(1)
    out = []
    for n in range(count):
        sender = rnd.randrange(200)
        own = [c for c in range(sender, customers, 200)]
        kind = n % 3
        to = (f"buyer@c{rnd.choice(own)}.example" if kind == 0 else
              f"x@c{rnd.randrange(customers)}.example" if kind == 1 else f"someone@unknown{n}.example")
        raw = (f"From: e{sender}@acme.test\r\nTo: {to}\r\nSubject: Offer {n}\r\nMessage-ID: <{n}@acme.test>\r\n\r\n"
               + "body line\r\n" * 500).encode()
        out.append((f"e{sender}@acme.test", [to], raw))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--customers", type=int, default=100_000)
    ap.add_argument("--rules", type=int, default=50)
    ap.add_argument("--messages", type=int, default=5000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        directory = build_db(Path(tmp) / "bench.db", args.customers)
        print(f"directory: {len(directory)} customers loaded in {time.perf_counter() - t0:.1f} s")
        write_rules(Path(tmp) / "rules", args.rules)
        env = RuleEnv(departments=DepartmentIndex([(1, "Sales", None)]), history=DomainHistory(set()))
        rules, errors = load_rules(Path(tmp) / "rules", env)
        assert not errors, errors
        policy = Policy(directory, rules)
        msgs = messages(directory, args.customers, args.messages)
        parser = BytesHeaderParser(policy=compat32)
        prepared = []
        for mail_from, to, raw in msgs:
            headers = parser.parsebytes(raw[: raw.find(b"\r\n\r\n") + 2])
            prepared.append((mail_from, to, headers, raw, directory.employee_for_address(mail_from)))
        verdicts: dict[str, int] = {}
        started = time.perf_counter()
        for mail_from, to, headers, raw, emp in prepared:
            ctx = Context(mail_from, to, headers, raw, emp, language="en")
            v = policy.decide(ctx)
            verdicts[v.action] = verdicts.get(v.action, 0) + 1
        elapsed = time.perf_counter() - started
        per = elapsed / len(prepared) * 1e6
        print(f"rules: {len(rules)} (incl. send-conflict), messages: {len(prepared)}, verdicts: {verdicts}")
        print(f"rule evaluation: {per:.1f} µs per message (target <= 200 µs) -> {'OK' if per <= 200 else 'SLOW'}")


if __name__ == "__main__":
    main()
