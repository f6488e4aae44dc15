"""A small company for rule tests: departments, employees, customers of every kind."""

from __future__ import annotations

import datetime as dt
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.policy import SMTP, compat32
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway.config import PUBLIC_MAIL_DOMAINS
from gateway.db import connect
from gateway.db.models import CompanyDomain, Contact, Customer, Department, Employee, Ownership
from gateway.directory import Directory
from gateway.policy.context import Context
from gateway.rules.env import DepartmentIndex, DomainHistory, RuleEnv


@pytest.fixture
def world(tmp_path: Path) -> SimpleNamespace:
    connect("sqlite:///" + str(tmp_path / "t.db"))
    sales = Department.create(name="Sales")
    europe = Department.create(name="Europe", parent=sales)
    mgmt = Department.create(name="Management")
    boss = Employee.create(email="boss@acme.test", name="Boss", department=mgmt, roles="dept_head")
    bob = Employee.create(email="bob@acme.test", name="Bob", department=sales, roles="dept_head,salesperson",
                          manager=boss)
    sales.head_id = bob.id
    sales.save()
    alice = Employee.create(email="alice@acme.test", name="Alice Wang", department=europe, manager=bob)
    carol = Employee.create(email="carol@acme.test", name="Carol", department=sales, manager=bob)

    def customer(name: str, domain: str, owners: list, pool: str = "owned", **kw: str) -> Customer:
        c = Customer.create(name=name, pool=pool, **kw)
        CompanyDomain.create(customer=c, domain=domain)
        Contact.create(customer=c, email=f"buyer@{domain}")
        for o in owners:
            Ownership.create(customer=c, employee=o)
        return c

    customer("OwnCo", "own.example", [alice], stage="deal", tags="VIP,steel", country="DE")
    customer("ColCo", "col.example", [carol], stage="lead", country="FR")
    customer("LooseCo", "unowned.example", [])
    customer("PoolCo", "pool.example", [], pool="public")
    directory = Directory(["acme.test"], PUBLIC_MAIL_DOMAINS)
    directory.load()
    clock = SimpleNamespace(now=dt.datetime(2025, 3, 5, 10, 30, tzinfo=dt.UTC))  # a Wednesday
    env = RuleEnv(
        departments=DepartmentIndex(Department.select(Department.id, Department.name, Department.parent).tuples()),
        history=DomainHistory({"own.example", "col.example"}),
        clock=lambda: clock.now,
        company="ACME Trading",
        company_domains=("acme.test",),
    )
    return SimpleNamespace(directory=directory, env=env, clock=clock, alice=alice, bob=bob, carol=carol,
                           boss=boss, sales=sales, europe=europe)


def make_message(sender: str = "alice@acme.test", to: tuple[str, ...] = ("buyer@own.example",),
                 subject: str = "Quotation", body: str = "Hello", attachments: tuple = ()) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Message-ID"] = "<m1@acme.test>"
    msg.set_content(body)
    for name, data, ctype in attachments:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes(policy=SMTP)


def make_ctx(world: SimpleNamespace, raw: bytes | None = None, sender: str = "alice@acme.test",
             to: tuple[str, ...] = ("buyer@own.example",), **kw: object) -> Context:
    raw = raw or make_message(sender, to, **kw)
    end = raw.find(b"\r\n\r\n")
    return Context(
        mail_from=sender,
        rcpt_tos=list(to),
        headers=BytesHeaderParser(policy=compat32).parsebytes(raw[: end + 2]),
        raw=raw,
        employee=world.directory.employee_for_address(sender),
        language="en",
    )


@pytest.fixture
def ctx_factory(world: SimpleNamespace):
    def factory(**kw: object) -> Context:
        return make_ctx(world, **kw)

    return factory
