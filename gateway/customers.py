"""Writes to customers, contacts, domains, owners and employees.

Every write that changes what the directory answers goes through here, so the
``DirectoryChange`` feed is never forgotten.  The panel and the sample data use
these functions; reads go through ``gateway.directory``.
"""

from __future__ import annotations

import datetime as dt
import re
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
    utcnow,
)
from gateway.groupcommit import write_transaction


class DirectoryError(ValueError):
    """A write that would make the directory ambiguous or wrong."""


def changed(customer_id: int | None) -> None:
    """Record that a customer (or, with None, everything) changed."""
    DirectoryChange.create(customer_id=customer_id)
    if customer_id is not None:
        refresh_search_text(customer_id)  # the panel's list searches this column


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
    with write_transaction():
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
    with write_transaction():
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
    with write_transaction():
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
    with write_transaction():
        cid = customer.id
        customer.delete_instance(recursive=True)
        changed(cid)


# -- customers (panel) --
# Validated writes for the panel's customer pages, the importer and the public pool.
# Each raises CustomerError (a DirectoryError with a code the panel translates).

STAGES = ("lead", "contacted", "quoted", "sample", "negotiating", "won", "lost")
MAX_NAME = 300
MAX_TAGS = 20
MAX_TAG_LENGTH = 40
MAX_CONTACTS = 500
MAX_DOMAINS = 50
_TEXT_LIMITS = {"country": 100, "region": 100, "source": 100, "notes": 5000}
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_LOCAL_BAD = re.compile(r"[\s<>()\[\],;:\\\"@]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class RefusedWrite(DirectoryError):
    """A refused panel write; ``code`` and ``params`` let the panel say why in its language."""

    def __init__(self, code: str, message: str, **params: object):
        super().__init__(message)
        self.code = code
        self.params = params


class CustomerError(RefusedWrite):
    """A refused customer write."""


def normalize_email(value: str) -> str:
    """A contact address, lowercased; CustomerError if it is not one."""
    address = (value or "").strip().strip("<>").strip().lower()
    local, at, domain = address.rpartition("@")
    if not at or not local or len(local) > 64 or len(address) > 320 or _LOCAL_BAD.search(local):
        raise CustomerError("bad_email", f"not a valid e-mail address: {value!r}", value=value)
    try:
        normalize_domain(domain)
    except CustomerError:
        raise CustomerError("bad_email", f"not a valid e-mail address: {value!r}", value=value) from None
    return address


def normalize_domain(value: str) -> str:
    """A company domain, lowercased (IDN as punycode); "@x.com" and "https://x.com/" accepted."""
    domain = (value or "").strip().lower()
    for prefix in ("https://", "http://", "@"):
        if domain.startswith(prefix):
            domain = domain[len(prefix):]
    domain = domain.split("/", 1)[0].rstrip(".")
    if domain and not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            domain = "\x00"
    labels = domain.split(".")
    if (len(domain) > 253 or len(labels) < 2 or not all(_LABEL.match(x) for x in labels)
            or labels[-1].isdigit()):
        raise CustomerError("bad_domain", f"not a valid domain: {value!r}", value=value)
    return domain


def parse_tags(value: str | Iterable[str]) -> str:
    """Tags as stored: stripped, unique, comma-separated ("vip,germany")."""
    items = value.replace("，", ",").split(",") if isinstance(value, str) else list(value)
    tags: list[str] = []
    for raw in items:
        tag = " ".join(str(raw).split())
        if not tag or tag in tags:
            continue
        if len(tag) > MAX_TAG_LENGTH or _CONTROL.search(tag):
            raise CustomerError("bad_tag", f"tag too long or not printable: {tag[:50]!r}", value=tag[:50])
        tags.append(tag)
    if len(tags) > MAX_TAGS:
        raise CustomerError("too_many_tags", f"at most {MAX_TAGS} tags", limit=MAX_TAGS)
    return ",".join(tags)


def _clean_name(value: str) -> str:
    name = " ".join((value or "").split())
    if not name:
        raise CustomerError("name_required", "the customer name is required")
    if len(name) > MAX_NAME:
        raise CustomerError("name_too_long", f"the customer name is longer than {MAX_NAME} characters",
                            limit=MAX_NAME)
    return name


def _clean_fields(fields: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in fields.items():
        if key == "name":
            out[key] = _clean_name(str(value))
        elif key == "stage":
            if value not in STAGES:
                raise CustomerError("bad_stage", f"unknown stage {value!r}", value=value)
            out[key] = value
        elif key == "tags":
            out[key] = parse_tags(value)  # type: ignore[arg-type]
        elif key in _TEXT_LIMITS:
            text = str(value or "").strip() if key == "notes" else " ".join(str(value or "").split())
            if len(text) > _TEXT_LIMITS[key]:
                raise CustomerError("too_long", f"{key} is longer than {_TEXT_LIMITS[key]} characters",
                                    field=key, limit=_TEXT_LIMITS[key])
            out[key] = text
        else:
            raise CustomerError("bad_field", f"unknown customer field {key!r}", field=key)
    return out


def _clean_contacts(contacts: Iterable[str | tuple[str, str]]) -> list[tuple[str, str]]:
    out: dict[str, str] = {}
    for c in contacts:
        email, name = (c, "") if isinstance(c, str) else c
        email = normalize_email(email)
        name = " ".join((name or "").split())[:200]
        if email not in out or name:
            out[email] = name
    if len(out) > MAX_CONTACTS:
        raise CustomerError("too_many_contacts", f"at most {MAX_CONTACTS} contacts", limit=MAX_CONTACTS)
    return list(out.items())


def _clean_domains(domains: Iterable[str], public_domains: Iterable[str]) -> list[str]:
    public = {d.lower() for d in public_domains}
    out: list[str] = []
    for raw in domains:
        if not (raw or "").strip():
            continue
        domain = normalize_domain(raw)
        if domain in public:
            raise CustomerError(
                "public_domain",
                f"{domain} is a public mail domain and cannot be a company domain; "
                "add the contact's exact address instead",
                domain=domain,
            )
        if domain not in out:
            out.append(domain)
    if len(out) > MAX_DOMAINS:
        raise CustomerError("too_many_domains", f"at most {MAX_DOMAINS} domains", limit=MAX_DOMAINS)
    return out


def _check_free(contacts: Iterable[tuple[str, str]], domains: Iterable[str], customer_id: int | None) -> None:
    """Refuse addresses and domains that identify another customer (the directory must stay unambiguous)."""
    emails = [e for e, _ in contacts]
    for start in range(0, len(emails), 500):
        rows = (Contact.select(Contact.email, Contact.customer, Customer.name).join(Customer)
                .where(Contact.email.in_(emails[start:start + 500])).tuples())
        for email, cid, other in rows:
            if cid != customer_id:
                raise CustomerError("contact_taken", f"{email} already belongs to customer {other!r}",
                                    value=email, customer=other)
    domains = list(domains)
    if domains:
        rows = (CompanyDomain.select(CompanyDomain.domain, CompanyDomain.customer, Customer.name).join(Customer)
                .where(CompanyDomain.domain.in_(domains)).tuples())
        for domain, cid, other in rows:
            if cid != customer_id:
                raise CustomerError("domain_taken", f"{domain} already belongs to customer {other!r}",
                                    value=domain, customer=other)


def search_text_for(name: str, tags: str, contacts: Iterable[tuple[str, str]], domains: Iterable[str]) -> str:
    """The lowercased text the customer list searches (name, tags, addresses, contact names, domains)."""
    parts = [name, (tags or "").replace(",", " ")]
    parts += [f"{email} {cname}" for email, cname in contacts]
    parts += list(domains)
    return "\n".join(" ".join(p.split()).lower() for p in parts if p and p.strip())[:20000]


def refresh_search_text(customer_id: int) -> None:
    row = Customer.select(Customer.name, Customer.tags).where(Customer.id == customer_id).tuples().first()
    if row is None:
        return
    contacts = Contact.select(Contact.email, Contact.name).where(Contact.customer == customer_id).order_by(Contact.id)
    domains = CompanyDomain.select(CompanyDomain.domain).where(CompanyDomain.customer == customer_id)
    text = search_text_for(row[0], row[1], contacts.tuples(), [d for (d,) in domains.tuples()])
    Customer.update(search_text=text).where(Customer.id == customer_id).execute()


def new_customer(
    name: str,
    contacts: Iterable[str | tuple[str, str]] = (),
    domains: Iterable[str] = (),
    owners: Iterable[Employee] = (),
    public_domains: Iterable[str] = (),
    **fields: object,
) -> Customer:
    """Validate, then create_customer: clear CustomerErrors instead of database errors."""
    cleaned = _clean_fields({"name": name, **fields})
    contact_rows = _clean_contacts(contacts)
    domain_rows = _clean_domains(domains, public_domains)
    with write_transaction():
        _check_free(contact_rows, domain_rows, None)
        owners = list(owners)
        customer = create_customer(cleaned.pop("name"), contacts=contact_rows, domains=domain_rows, owners=owners,
                                   public_domains=public_domains, **cleaned)
        if not owners:
            Customer.update(pool_since=utcnow(), pool_reason="created").where(Customer.id == customer.id).execute()
    return Customer.get_by_id(customer.id)


def update_customer(
    customer: Customer,
    *,
    contacts: Iterable[str | tuple[str, str]] | None = None,
    domains: Iterable[str] | None = None,
    public_domains: Iterable[str] = (),
    **fields: object,
) -> Customer:
    """Change fields; ``contacts``/``domains`` given replace the customer's lists."""
    cleaned = _clean_fields(fields)
    contact_rows = _clean_contacts(contacts) if contacts is not None else None
    domain_rows = _clean_domains(domains, public_domains) if domains is not None else None
    with write_transaction():
        _check_free(contact_rows or [], domain_rows or [], customer.id)
        for key, value in cleaned.items():
            setattr(customer, key, value)
        customer.updated_at = utcnow()
        customer.save()
        if contact_rows is not None:
            keep = {e for e, _ in contact_rows}
            Contact.delete().where((Contact.customer == customer) & Contact.email.not_in(keep or {""})).execute()
            existing = {c.email: c for c in Contact.select().where(Contact.customer == customer)}
            for email, cname in contact_rows:
                row = existing.get(email)
                if row is None:
                    Contact.create(customer=customer, email=email, name=cname)
                elif row.name != cname:
                    row.name = cname
                    row.save()
        if domain_rows is not None:
            CompanyDomain.delete().where(
                (CompanyDomain.customer == customer) & CompanyDomain.domain.not_in(domain_rows or [""])).execute()
            existing_domains = {d for (d,) in CompanyDomain.select(CompanyDomain.domain)
                                .where(CompanyDomain.customer == customer).tuples()}
            for domain in domain_rows:
                if domain not in existing_domains:
                    CompanyDomain.create(customer=customer, domain=domain)
        changed(customer.id)
    return Customer.get_by_id(customer.id)


def merge_contacts_and_domains(
    customer: Customer,
    contacts: Iterable[str | tuple[str, str]] = (),
    domains: Iterable[str] = (),
    public_domains: Iterable[str] = (),
) -> int:
    """Add contacts and domains not yet on the customer (an import's overwrite); return how many."""
    contact_rows = _clean_contacts(contacts)
    domain_rows = _clean_domains(domains, public_domains)
    with write_transaction():
        _check_free(contact_rows, domain_rows, customer.id)
        have = {e for (e,) in Contact.select(Contact.email).where(Contact.customer == customer).tuples()}
        have_domains = {d for (d,) in CompanyDomain.select(CompanyDomain.domain)
                        .where(CompanyDomain.customer == customer).tuples()}
        added = 0
        for email, cname in contact_rows:
            if email not in have:
                Contact.create(customer=customer, email=email, name=cname)
                added += 1
        for domain in domain_rows:
            if domain not in have_domains:
                CompanyDomain.create(customer=customer, domain=domain)
                added += 1
        if added:
            Customer.update(updated_at=utcnow()).where(Customer.id == customer.id).execute()
            changed(customer.id)
    return added


def owner_ids(customer: Customer | int) -> set[int]:
    cid = customer if isinstance(customer, int) else customer.id
    return {e for (e,) in Ownership.select(Ownership.employee).where(Ownership.customer == cid).tuples()}


def _owned(customer_id: int, assigned: bool) -> None:
    """Mark a customer owned (it has at least one owner now); ``assigned`` restarts the pool clock."""
    values: dict = {Customer.pool: "owned", Customer.updated_at: utcnow(), Customer.pool_reason: ""}
    if assigned:
        values[Customer.assigned_at] = utcnow()
    Customer.update(values).where(Customer.id == customer_id).execute()
    Customer.update(assigned_at=utcnow()).where((Customer.id == customer_id) & Customer.assigned_at.is_null()).execute()


def add_owner(customer: Customer, employee: Employee) -> bool:
    """Add one more owner (添加负责人); the others stay.  False if already an owner."""
    with write_transaction():
        if employee.id in owner_ids(customer):
            return False
        Ownership.create(customer=customer, employee=employee)
        _owned(customer.id, assigned=False)
        changed(customer.id)
    return True


def remove_owner(customer: Customer, employee: Employee, reason: str = "owner removed") -> bool:
    """Remove one owner; a customer left without owners goes to the public pool."""
    with write_transaction():
        n = Ownership.delete().where((Ownership.customer == customer) & (Ownership.employee == employee)).execute()
        if n and not owner_ids(customer):
            _to_pool(customer.id, reason)
        elif n:
            Customer.update(updated_at=utcnow()).where(Customer.id == customer.id).execute()
        if n:
            changed(customer.id)
    return bool(n)


def transfer(customer: Customer, to: Employee) -> set[int]:
    """Transfer (转移): ``to`` becomes the only owner; returns the previous owners' ids."""
    with write_transaction():
        before = owner_ids(customer)
        Ownership.delete().where(Ownership.customer == customer).execute()
        Ownership.create(customer=customer, employee=to)
        _owned(customer.id, assigned=True)
        changed(customer.id)
    return before


def handover(leaving: Employee, to: Employee) -> list[int]:
    """Hand over (移交) every customer of a leaving employee; returns the customer ids."""
    if leaving.id == to.id:
        raise CustomerError("same_employee", "cannot hand customers over to the same employee")
    with write_transaction():
        ids = [c for (c,) in Ownership.select(Ownership.customer).where(Ownership.employee == leaving)
               .order_by(Ownership.customer).tuples()]
        already = {c for (c,) in Ownership.select(Ownership.customer)
                   .where((Ownership.employee == to) & Ownership.customer.in_(ids or [0])).tuples()}
        Ownership.delete().where(Ownership.employee == leaving).execute()
        for cid in ids:
            if cid not in already:
                Ownership.create(customer=cid, employee=to)
            _owned(cid, assigned=True)
            changed(cid)
    return ids


def _to_pool(customer_id: int, reason: str) -> None:
    Ownership.delete().where(Ownership.customer == customer_id).execute()
    Customer.update(pool="public", assigned_at=None, updated_at=utcnow(), pool_since=utcnow(),
                    pool_reason=reason[:200]).where(Customer.id == customer_id).execute()


def release(customer: Customer, reason: str = "returned by hand") -> None:
    """Return a customer to the public pool (退回公海): every owner removed."""
    with write_transaction():
        _to_pool(customer.id, reason)
        changed(customer.id)


def claim(customer: Customer | int, employee: Employee) -> None:
    """Take a public-pool customer (认领 by oneself, 分配 by a manager); refused if no longer public.

    The compare-and-set UPDATE makes two simultaneous claims safe: one wins, the other
    gets CustomerError("not_public").
    """
    cid = customer if isinstance(customer, int) else customer.id
    with write_transaction():
        now = utcnow()
        n = (Customer.update(pool="owned", assigned_at=now, updated_at=now, pool_reason="")
             .where((Customer.id == cid) & (Customer.pool == "public")).execute())
        if n != 1:
            raise CustomerError("not_public", "this customer is no longer in the public pool")
        Ownership.delete().where(Ownership.customer == cid).execute()
        Ownership.create(customer=cid, employee=employee)
        changed(cid)


def record_contact(addresses: Iterable[str], at: dt.datetime, public_domains: Iterable[str] | None = None) -> int:
    """Set last_contact_at = ``at`` on customers matched by exact contact address or company
    domain (never by a public mail domain); only moves the date forward.  Returns how many
    customers changed.  Not a directory change (last contact is not in the directory)."""
    if public_domains is None:
        from gateway.config import PUBLIC_MAIL_DOMAINS

        public_domains = PUBLIC_MAIL_DOMAINS
    public = {d.lower() for d in public_domains}
    addresses = sorted({a.strip().strip("<>").lower() for a in addresses if "@" in (a or "")})
    domains = sorted({a.rpartition("@")[2] for a in addresses} - public)
    ids: set[int] = set()
    for start in range(0, len(addresses), 500):
        ids.update(c for (c,) in Contact.select(Contact.customer)
                   .where(Contact.email.in_(addresses[start:start + 500])).tuples())
    for start in range(0, len(domains), 500):
        ids.update(c for (c,) in CompanyDomain.select(CompanyDomain.customer)
                   .where(CompanyDomain.domain.in_(domains[start:start + 500])).tuples())
    if not ids:
        return 0
    at = at.astimezone(dt.UTC).replace(tzinfo=None) if at.tzinfo else at
    older = Customer.last_contact_at.is_null() | (Customer.last_contact_at < at)
    return Customer.update(last_contact_at=at).where(Customer.id.in_(sorted(ids)) & older).execute()


def record_contacts(contacts: Iterable[tuple[str, dt.datetime]], public_domains: Iterable[str] | None = None) -> int:
    """``record_contact`` for many (address, moment) pairs at once (the archive's batch
    ingest): each matched customer's last contact moves to the latest moment of its
    addresses — one look-up for all, one UPDATE per distinct moment.  Returns how many
    customers changed."""
    if public_domains is None:
        from gateway.config import PUBLIC_MAIL_DOMAINS

        public_domains = PUBLIC_MAIL_DOMAINS
    public = {d.lower() for d in public_domains}
    latest: dict[str, dt.datetime] = {}
    for address, at in contacts:
        address = (address or "").strip().strip("<>").lower()
        if "@" not in address:
            continue
        at = at.astimezone(dt.UTC).replace(tzinfo=None) if at.tzinfo else at
        if address not in latest or latest[address] < at:
            latest[address] = at
    if not latest:
        return 0
    addresses = sorted(latest)
    by_domain: dict[str, dt.datetime] = {}
    for address, at in latest.items():
        domain = address.rpartition("@")[2]
        if domain not in public and (domain not in by_domain or by_domain[domain] < at):
            by_domain[domain] = at
    when: dict[int, dt.datetime] = {}

    def note(customer: int, at: dt.datetime) -> None:
        if customer not in when or when[customer] < at:
            when[customer] = at

    for start in range(0, len(addresses), 500):
        for customer, email in (Contact.select(Contact.customer, Contact.email)
                                .where(Contact.email.in_(addresses[start:start + 500])).tuples()):
            note(customer, latest[email.lower()])
    domains = sorted(by_domain)
    for start in range(0, len(domains), 500):
        for customer, domain in (CompanyDomain.select(CompanyDomain.customer, CompanyDomain.domain)
                                 .where(CompanyDomain.domain.in_(domains[start:start + 500])).tuples()):
            note(customer, by_domain[domain.lower()])
    groups: dict[dt.datetime, list[int]] = {}
    for customer, at in when.items():
        groups.setdefault(at, []).append(customer)
    changed = 0
    for at, ids in groups.items():
        older = Customer.last_contact_at.is_null() | (Customer.last_contact_at < at)
        changed += Customer.update(last_contact_at=at).where(Customer.id.in_(sorted(ids)) & older).execute()
    return changed


# -- employees, departments, aliases (panel) --
# Validated writes for the panel's employee pages.  Each raises EmployeeError (a
# DirectoryError with a code the panel translates) and records a directory change, so
# every gateway node reloads who may send as which address.

EMPLOYEE_ROLES = ("salesperson", "dept_head", "crm_admin", "auditor", "it_admin", "shared")
_ADDRESS = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@(?:(?!-)[a-z0-9-]{1,63}(?<!-)\.)+[a-z]{2,63}$")


class EmployeeError(RefusedWrite):
    """A refused employee/department write."""


def employee_address(value: str) -> str:
    """A sending address (employee e-mail or alias), lowercased; EmployeeError if malformed."""
    address = (value or "").strip().lower()
    local = address.partition("@")[0]
    if (len(address) > 320 or not _ADDRESS.match(address) or local.startswith(".") or local.endswith(".")
            or ".." in local):
        raise EmployeeError("bad_address", f"not a valid e-mail address: {value!r}", value=value)
    return address


def address_owner(address: str) -> Employee | None:
    """The employee who has ``address`` as main address or alias."""
    emp = Employee.get_or_none(Employee.email == address)
    if emp is not None:
        return emp
    alias = Alias.get_or_none(Alias.address == address)
    return alias.employee if alias is not None else None


def _check_address_free(address: str, employee_id: int | None) -> None:
    owner = address_owner(address)
    if owner is not None and owner.id != employee_id:
        raise EmployeeError("address_taken", f"{address} is already used by {owner.email}",
                            address=address, owner=owner.email)


def _clean_roles(roles: Iterable[str]) -> str:
    cleaned = sorted({r.strip() for r in roles if r.strip()})
    unknown = [r for r in cleaned if r not in EMPLOYEE_ROLES]
    if unknown:
        raise EmployeeError("bad_role", f"unknown role(s): {', '.join(unknown)}", roles=", ".join(unknown))
    return ",".join(cleaned)


def _clean_person_name(value: str) -> str:
    name = " ".join((value or "").split())
    if not name or len(name) > 200:
        raise EmployeeError("bad_name", "a name is 1-200 characters")
    return name


def _check_manager(employee_id: int | None, manager: Employee | None) -> None:
    """No one manages themselves, directly or through a chain."""
    seen: set[int] = set()
    current = manager
    while current is not None and current.id not in seen:
        if employee_id is not None and current.id == employee_id:
            raise EmployeeError("manager_cycle", "an employee cannot be their own (indirect) manager")
        seen.add(current.id)
        current = current.manager


def save_employee(
    employee: Employee | None,
    *,
    email: str,
    name: str,
    department: Department | None,
    manager: Employee | None,
    roles: Iterable[str],
    active: bool = True,
) -> tuple[Employee, dict[str, tuple[object, object]]]:
    """Create (``employee`` None) or update an employee.  Returns (row, {field: (old, new)})."""
    address = employee_address(email)
    name = _clean_person_name(name)
    role_text = _clean_roles(roles)
    with write_transaction():
        _check_address_free(address, employee.id if employee else None)
        _check_manager(employee.id if employee else None, manager)
        new = {"email": address, "name": name, "department": department.id if department else None,
               "manager": manager.id if manager else None, "roles": role_text, "active": bool(active)}
        if employee is None:
            employee = Employee.create(email=address, name=name, department=department, manager=manager,
                                       roles=role_text, active=bool(active))
            changes = {k: (None, v) for k, v in new.items()}
        else:
            old = {"email": employee.email, "name": employee.name, "department": employee.department_id,
                   "manager": employee.manager_id, "roles": employee.roles, "active": employee.active}
            changes = {k: (old[k], v) for k, v in new.items() if old[k] != v}
            if changes:
                employee.email, employee.name, employee.roles, employee.active = address, name, role_text, bool(active)
                employee.department, employee.manager = department, manager
                employee.save()
        if changes:
            changed(None)
    return employee, changes


def set_employee_active(employee: Employee, active: bool) -> bool:
    """Activate or deactivate; True if it changed.  Inactive employees cannot sign in or send."""
    if employee.active == active:
        return False
    with write_transaction():
        Employee.update(active=active).where(Employee.id == employee.id).execute()
        employee.active = active
        changed(None)
    return True


def add_alias(employee: Employee, address: str) -> Alias:
    """Let ``employee`` send as ``address``; refused if another employee uses it."""
    address = employee_address(address)
    with write_transaction():
        if address == employee.email or Alias.select().where(
                (Alias.address == address) & (Alias.employee == employee)).exists():
            raise EmployeeError("alias_exists", f"{employee.email} already has {address}", address=address)
        _check_address_free(address, employee.id)
        alias = Alias.create(employee=employee, address=address)
        changed(None)
    return alias


def remove_alias(alias: Alias) -> None:
    with write_transaction():
        alias.delete_instance()
        changed(None)


def _check_parent(department_id: int | None, parent: Department | None) -> None:
    seen: set[int] = set()
    current = parent
    while current is not None and current.id not in seen:
        if department_id is not None and current.id == department_id:
            raise EmployeeError("department_cycle", "a department cannot be inside itself")
        seen.add(current.id)
        current = current.parent


def save_department(
    department: Department | None, *, name: str, parent: Department | None, head: Employee | None
) -> tuple[Department, dict[str, tuple[object, object]]]:
    """Create (``department`` None) or update a department.  Returns (row, {field: (old, new)})."""
    name = _clean_person_name(name)
    with write_transaction():
        _check_parent(department.id if department else None, parent)
        new = {"name": name, "parent": parent.id if parent else None, "head": head.id if head else None}
        if department is None:
            department = Department.create(name=name, parent=parent, head_id=head.id if head else None)
            changes = {k: (None, v) for k, v in new.items()}
        else:
            old = {"name": department.name, "parent": department.parent_id, "head": department.head_id}
            changes = {k: (old[k], v) for k, v in new.items() if old[k] != v}
            if changes:
                department.name, department.parent = name, parent
                department.head_id = head.id if head else None
                department.save()
        if changes:
            changed(None)
    return department, changes


def delete_department(department: Department) -> None:
    """Delete an empty department (no employees, no sub-departments)."""
    with write_transaction():
        if Employee.select().where(Employee.department == department).exists() or \
                Department.select().where(Department.parent == department).exists():
            raise EmployeeError("department_not_empty", f"department {department.name} still has members",
                                name=department.name)
        department.delete_instance()
        changed(None)
