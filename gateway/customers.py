"""Writes to customers, contacts, domains, owners and employees.

Every write that changes what the directory answers goes through here, so the
``DirectoryChange`` feed is never forgotten.  The panel and the sample data use
these functions; reads go through ``gateway.directory``.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.db.models import (
    Alias,
    CompanyDomain,
    Contact,
    Customer,
    Department,
    DirectoryChange,
    Employee,
    Ownership,
    database,
    utcnow,
)


class DirectoryError(ValueError):
    """A write that would make the directory ambiguous or wrong."""


def changed(customer_id: int | None) -> None:
    """Record that a customer (or, with None, everything) changed."""
    DirectoryChange.create(customer_id=customer_id)


def create_department(name: str, parent: Department | None = None) -> Department:
    return Department.create(name=name, parent=parent)


def create_employee(
    email: str,
    name: str,
    department: Department | None = None,
    roles: Iterable[str] = ("salesperson",),
    manager: Employee | None = None,
    aliases: Iterable[str] = (),
) -> Employee:
    with database.atomic():
        emp = Employee.create(
            email=email.lower(), name=name, department=department, roles=",".join(roles), manager=manager
        )
        for a in aliases:
            Alias.create(employee=emp, address=a.lower())
        changed(None)
    return emp


def create_customer(
    name: str,
    contacts: Iterable[str | tuple[str, str]] = (),
    domains: Iterable[str] = (),
    owners: Iterable[Employee] = (),
    public_domains: Iterable[str] = (),
    **fields: object,
) -> Customer:
    """Create a customer with contacts ((email, name) or email), domains and owners.

    A public mail domain (gmail.com …) is refused as a company domain.
    """
    public = {d.lower() for d in public_domains}
    with database.atomic():
        owners = list(owners)
        if "pool" not in fields:
            fields["pool"] = "owned" if owners else "public"
        customer = Customer.create(name=name, **fields)
        for c in contacts:
            email, cname = (c, "") if isinstance(c, str) else c
            Contact.create(customer=customer, email=email.lower(), name=cname)
        for d in domains:
            add_domain(customer, d, public)
        for emp in owners:
            Ownership.create(customer=customer, employee=emp)
        if owners:
            customer.assigned_at = utcnow()
            customer.save()
        changed(customer.id)
    return customer


def add_domain(customer: Customer, domain: str, public_domains: Iterable[str] = ()) -> CompanyDomain:
    domain = domain.lower().strip()
    if domain in {d.lower() for d in public_domains}:
        raise DirectoryError(f"{domain} is a public mail domain; add the exact contact address instead")
    row = CompanyDomain.create(customer=customer, domain=domain)
    changed(customer.id)
    return row


def add_contact(customer: Customer, email: str, name: str = "") -> Contact:
    row = Contact.create(customer=customer, email=email.lower(), name=name)
    changed(customer.id)
    return row


def set_owners(customer: Customer, owners: Iterable[Employee]) -> None:
    with database.atomic():
        Ownership.delete().where(Ownership.customer == customer).execute()
        owners = list(owners)
        for emp in owners:
            Ownership.create(customer=customer, employee=emp)
        customer.pool = "owned" if owners else "public"
        customer.assigned_at = utcnow() if owners else None
        customer.updated_at = utcnow()
        customer.save()
        changed(customer.id)


def delete_customer(customer: Customer) -> None:
    with database.atomic():
        cid = customer.id
        customer.delete_instance(recursive=True)
        changed(cid)
