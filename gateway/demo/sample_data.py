"""Sample employees and customers, for the demo and the integration tests.

The story: ACME Trading sells tools abroad.  Alice and Bob are salespeople in
"Sales Europe", Carol heads the department.  Each has customers; one customer
sits in the public pool (公海); one uses a public mail domain (gmail.com), so
only its exact address identifies it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import PUBLIC_MAIL_DOMAINS
from gateway.customers import create_customer, create_department, create_employee
from gateway.db.models import Customer, Employee

PASSWORDS = {
    "alice@acme.test": "alice-pw",
    "bob@acme.test": "bob-pw",
    "carol@acme.test": "carol-pw",
    "sales@acme.test": "sales-pw",
    "relay@acme.test": "relay-pw",
}


# Local panel accounts (not mail users): login -> (password, roles).
PANEL_ACCOUNTS = {
    "admin": ("gate-keeper-2026", ("it_admin",)),
    "auditor": ("read-only-2026", ("auditor",)),
    "crm": ("customers-2026", ("crm_admin",)),
}


@dataclass
class Sample:
    alice: Employee
    bob: Employee
    carol: Employee
    hamburg: Customer  # Alice's, by domain hamburg-tools.de
    lagos: Customer  # Bob's, exact gmail address
    osaka: Customer  # co-owned by Alice and Bob
    lima: Customer  # public pool


def seed() -> Sample:
    """Create the sample data in the bound database (idempotent only on an empty DB)."""
    dept = create_department("Sales Europe")
    carol = create_employee("carol@acme.test", "Carol Chen 陈经理", dept, roles=("salesperson", "dept_head"))
    dept.head_id = carol.id
    dept.save()
    alice = create_employee(
        "alice@acme.test", "Alice Wang 王丽", dept, manager=carol, aliases=("alice.wang@acme.test",)
    )
    bob = create_employee("bob@acme.test", "Bob Li 李波", dept, manager=carol)
    create_employee("sales@acme.test", "Sales inbox", dept, roles=("shared",))
    hamburg = create_customer(
        "Hamburg Tools GmbH", contacts=[("einkauf@hamburg-tools.de", "Klaus Becker")],
        domains=["hamburg-tools.de"], owners=[alice], country="DE", stage="negotiating", tags="vip",
        public_domains=PUBLIC_MAIL_DOMAINS,
    )
    lagos = create_customer(
        "Lagos Imports Ltd", contacts=[("lagos.imports@gmail.com", "Chinedu Okafor")],
        owners=[bob], country="NG", stage="quoted", public_domains=PUBLIC_MAIL_DOMAINS,
    )
    osaka = create_customer(
        "Osaka Machinery 大阪机械", contacts=[("tanaka@osaka-machinery.jp", "田中 太郎")],
        domains=["osaka-machinery.jp"], owners=[alice, bob], country="JP", stage="won",
        public_domains=PUBLIC_MAIL_DOMAINS,
    )
    lima = create_customer(
        "Lima Ferretería SAC", contacts=[("compras@lima-ferreteria.pe", "Rosa Quispe")],
        domains=["lima-ferreteria.pe"], owners=[], country="PE", stage="lead",
        public_domains=PUBLIC_MAIL_DOMAINS,
    )
    return Sample(alice, bob, carol, hamburg, lagos, osaka, lima)


def seed_panel_accounts() -> None:
    """The demo's local panel accounts (PANEL_ACCOUNTS); existing ones are left alone."""
    from panel.auth import create_local_account
    from panel.schema import LocalAccount

    for login, (password, roles) in PANEL_ACCOUNTS.items():
        if not LocalAccount.select().where(LocalAccount.login == login).exists():
            create_local_account(login, password, roles, name=login.capitalize())
