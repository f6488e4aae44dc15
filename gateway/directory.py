"""The directory: "whose customer is this address?" (docs/ARCHITECTURE.md §3).

An in-memory index kept in step with the DB.  Lookups are dictionary hits:
exact contact address first, then the customer's company domains, except for
public mail domains (gmail.com, qq.com …) where only an exact address counts.

Writers record a ``DirectoryChange`` row (see ``gateway.customers``); every
node's ``Directory.refresh()`` replays the rows it has not seen, so several
nodes on one PostgreSQL and a panel in another process stay in step.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.db.models import (
    Alias,
    CompanyDomain,
    Contact,
    Customer,
    DirectoryChange,
    Employee,
    Ownership,
)

# Relationship of an address to one employee (the reader or the sender).
OWN = "own_customer"
COLLEAGUE = "colleague_customer"
UNOWNED = "unowned_customer"
PUBLIC_POOL = "public_pool_customer"
INTERNAL = "internal"
UNKNOWN = "unknown_external"
RELATIONSHIPS = (OWN, COLLEAGUE, UNOWNED, PUBLIC_POOL, INTERNAL, UNKNOWN)


@dataclass(frozen=True)
class EmployeeInfo:
    id: int
    email: str
    name: str
    department_id: int | None
    manager_id: int | None
    roles: frozenset[str]
    active: bool


@dataclass(frozen=True)
class CustomerInfo:
    id: int
    name: str
    stage: str
    tags: frozenset[str]
    country: str
    pool: str
    owners: frozenset[int]
    contacts: tuple[str, ...]
    domains: tuple[str, ...]


@dataclass(frozen=True)
class Match:
    customer: CustomerInfo
    matched_by: str  # "contact" or "domain"


def normalize(address: str) -> str:
    return address.strip().strip("<>").lower()


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


class Directory:
    def __init__(self, company_domains: Iterable[str], public_domains: Iterable[str]):
        self.company_domains = frozenset(d.lower() for d in company_domains)
        self.public_domains = frozenset(d.lower() for d in public_domains)
        self._by_contact: dict[str, int] = {}
        self._by_domain: dict[str, int] = {}
        self._customers: dict[int, CustomerInfo] = {}
        self._employees: dict[int, EmployeeInfo] = {}
        self._employee_by_address: dict[str, int] = {}
        self._cursor = 0
        self._lock = threading.Lock()

    # -- loading ------------------------------------------------------------
    def load(self) -> None:
        """Full load from the DB."""
        with self._lock:
            last = DirectoryChange.select(DirectoryChange.id).order_by(DirectoryChange.id.desc()).first()
            self._cursor = last.id if last else 0
            self._load_employees()
            owners: dict[int, set[int]] = {}
            for cid, eid in Ownership.select(Ownership.customer, Ownership.employee).tuples():
                owners.setdefault(cid, set()).add(eid)
            contacts: dict[int, list[str]] = {}
            for cid, email in Contact.select(Contact.customer, Contact.email).tuples():
                contacts.setdefault(cid, []).append(email.lower())
            domains: dict[int, list[str]] = {}
            for cid, domain in CompanyDomain.select(CompanyDomain.customer, CompanyDomain.domain).tuples():
                domains.setdefault(cid, []).append(domain.lower())
            customers = {}
            for row in Customer.select(
                Customer.id, Customer.name, Customer.stage, Customer.tags, Customer.country, Customer.pool
            ).tuples():
                cid = row[0]
                customers[cid] = _customer_info(row, owners.get(cid, ()), contacts.get(cid, ()), domains.get(cid, ()))
            self._customers = customers
            self._by_contact = {a: cid for cid, info in customers.items() for a in info.contacts}
            self._by_domain = {d: cid for cid, info in customers.items() for d in info.domains}

    def _load_employees(self) -> None:
        employees = {}
        by_address = {}
        for e in Employee.select():
            employees[e.id] = EmployeeInfo(
                e.id, e.email.lower(), e.name, e.department_id, e.manager_id, frozenset(e.role_set), e.active
            )
            by_address[e.email.lower()] = e.id
        for eid, address in Alias.select(Alias.employee, Alias.address).tuples():
            by_address[address.lower()] = eid
        self._employees = employees
        self._employee_by_address = by_address

    def refresh(self) -> int:
        """Replay changes recorded since the last load/refresh; return how many."""
        rows = list(
            DirectoryChange.select(DirectoryChange.id, DirectoryChange.customer_id)
            .where(DirectoryChange.id > self._cursor)
            .order_by(DirectoryChange.id)
            .tuples()
        )
        if not rows:
            return 0
        if any(cid is None for _, cid in rows):
            self.load()
            return len(rows)
        with self._lock:
            for cid in {cid for _, cid in rows}:
                self._reload_customer(cid)
            self._cursor = rows[-1][0]
        return len(rows)

    def _reload_customer(self, cid: int) -> None:
        old = self._customers.pop(cid, None)
        if old:
            for a in old.contacts:
                if self._by_contact.get(a) == cid:
                    del self._by_contact[a]
            for d in old.domains:
                if self._by_domain.get(d) == cid:
                    del self._by_domain[d]
        row = (
            Customer.select(Customer.id, Customer.name, Customer.stage, Customer.tags, Customer.country, Customer.pool)
            .where(Customer.id == cid)
            .tuples()
            .first()
        )
        if row is None:
            return
        owners = [e for (e,) in Ownership.select(Ownership.employee).where(Ownership.customer == cid).tuples()]
        contacts = [a.lower() for (a,) in Contact.select(Contact.email).where(Contact.customer == cid).tuples()]
        domain_rows = CompanyDomain.select(CompanyDomain.domain).where(CompanyDomain.customer == cid).tuples()
        domains = [d.lower() for (d,) in domain_rows]
        info = _customer_info(row, owners, contacts, domains)
        self._customers[cid] = info
        for a in info.contacts:
            self._by_contact[a] = cid
        for d in info.domains:
            self._by_domain[d] = cid

    # -- questions ----------------------------------------------------------
    def lookup(self, address: str) -> Match | None:
        """The customer an address belongs to, or None."""
        address = normalize(address)
        cid = self._by_contact.get(address)
        if cid is not None:
            return Match(self._customers[cid], "contact")
        domain = domain_of(address)
        if domain in self.public_domains:
            return None
        cid = self._by_domain.get(domain)
        if cid is not None:
            return Match(self._customers[cid], "domain")
        return None

    def is_internal(self, address: str) -> bool:
        return domain_of(normalize(address)) in self.company_domains

    def relationship(self, address: str, employee_id: int | None) -> str:
        """How ``address`` relates to the employee: one of RELATIONSHIPS."""
        if self.is_internal(address):
            return INTERNAL
        match = self.lookup(address)
        if match is None:
            return UNKNOWN
        customer = match.customer
        if customer.pool == "public":
            return PUBLIC_POOL
        if not customer.owners:
            return UNOWNED
        if employee_id in customer.owners:
            return OWN
        return COLLEAGUE

    def employee(self, employee_id: int) -> EmployeeInfo | None:
        return self._employees.get(employee_id)

    def employee_for_address(self, address: str) -> EmployeeInfo | None:
        """The active employee whose address or alias this is."""
        eid = self._employee_by_address.get(normalize(address))
        info = self._employees.get(eid) if eid is not None else None
        return info if info and info.active else None

    def deactivated(self, address: str) -> bool:
        """True when ``address`` (an address or alias) belongs to an employee who was
        deactivated: such a login is refused by the SMTP and IMAP front ends even though
        the upstream still accepts its password.  An address nobody in the directory uses
        is not deactivated (shared and technical mailboxes need no employee record)."""
        eid = self._employee_by_address.get(normalize(address))
        info = self._employees.get(eid) if eid is not None else None
        return info is not None and not info.active

    def addresses_of(self, employee_id: int) -> set[str]:
        return {a for a, eid in self._employee_by_address.items() if eid == employee_id}

    def customer(self, customer_id: int) -> CustomerInfo | None:
        return self._customers.get(customer_id)

    def __len__(self) -> int:
        return len(self._customers)


def _customer_info(row: tuple, owners: Iterable[int], contacts: Iterable[str], domains: Iterable[str]) -> CustomerInfo:
    cid, name, stage, tags, country, pool = row
    return CustomerInfo(
        id=cid,
        name=name,
        stage=stage,
        tags=frozenset(t.strip() for t in (tags or "").split(",") if t.strip()),
        country=country or "",
        pool=pool,
        owners=frozenset(owners),
        contacts=tuple(contacts),
        domains=tuple(domains),
    )
