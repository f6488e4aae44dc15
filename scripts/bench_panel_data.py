"""Synthetic customer data for scripts/bench_panel.py (fast bulk insert into a fresh DB).

100k customers, 3 contacts each (300k), a company domain for two in three, 200
salespeople in 10 departments (2 heads, 1 CRM administrator), 70 % owned (some by two
people), 30 % in the public pool, spread over stages, countries and tags.
"""

from __future__ import annotations

import datetime as dt
import random

from gateway.customers import STAGES, search_text_for
from gateway.db.models import CompanyDomain, Contact, Customer, Department, Employee, Ownership, database

COUNTRIES = ["DE", "FR", "US", "GB", "JP", "BR", "NG", "PE", "IN", "AE", "TR", "VN", "MX", "PL", "IT", "ES"]
TAGS = ["vip", "distributor", "oem", "retail", "fair-2025", "sample-sent", "price-sensitive", "重点客户"]
WORDS = ["Tools", "Machinery", "Trading", "Imports", "Hardware", "Industrial", "Global", "Supply", "Electric",
         "Parts", "Metal", "Export", "Systems", "Group", "Holdings", "Ferretería", "Handel", "商贸", "机械"]
CITIES = ["Hamburg", "Lagos", "Osaka", "Lima", "Lyon", "Austin", "Leeds", "Pune", "Dubai", "Izmir", "Hanoi",
          "Puebla", "Gdansk", "Milano", "Sevilla", "Recife"]


def build(customers: int = 100_000, contacts_per_customer: int = 3, employees: int = 200,
          seed: int = 7) -> dict[str, object]:
    """Fill the bound (migrated, empty) database; returns ids useful to the benchmark."""
    rnd = random.Random(seed)
    now = dt.datetime(2026, 11, 1)
    with database.atomic():
        depts = [Department.create(name=f"Sales {i}") for i in range(10)]
        Employee.insert_many([
            {"email": f"sales{i}@acme.test", "name": f"Sales {i}", "department": depts[i % 10].id,
             "roles": "salesperson,dept_head" if i < 10 else "salesperson"}
            for i in range(employees)
        ]).execute()
        admin = Employee.create(email="crm-admin@acme.test", name="CRM Admin", department=None,
                                roles="salesperson,crm_admin")
        for i, d in enumerate(depts):
            d.head_id = Employee.get(Employee.email == f"sales{i}@acme.test").id
            d.save()
    emp_ids = [e for (e,) in Employee.select(Employee.id).where(Employee.email.startswith("sales"))
               .order_by(Employee.id).tuples()]
    batch = 5000
    for start in range(0, customers, batch):
        rows, contacts, domains, owners = [], [], [], []
        for i in range(start, min(start + batch, customers)):
            cid = i + 1
            name = f"{rnd.choice(CITIES)} {rnd.choice(WORDS)} {rnd.choice(WORDS)} {i}"
            tags = ",".join(sorted(rnd.sample(TAGS, rnd.randint(0, 2))))
            domain = f"c{i}.example" if i % 3 else ""
            cs = [(f"buyer{k}.{i}@{domain or 'gmail.com'}", f"Buyer {k} {i}") for k in range(contacts_per_customer)]
            public = rnd.random() < 0.3
            created = now - dt.timedelta(days=rnd.randint(0, 900), seconds=rnd.randint(0, 86400))
            last = None if rnd.random() < 0.2 else created + dt.timedelta(days=rnd.randint(0, 200))
            rows.append({
                "id": cid, "name": name, "stage": rnd.choice(STAGES), "tags": tags,
                "country": rnd.choice(COUNTRIES), "pool": "public" if public else "owned",
                "last_contact_at": last, "assigned_at": None if public else created,
                "created_at": created, "updated_at": created + dt.timedelta(days=rnd.randint(0, 100)),
                "search_text": search_text_for(name, tags, cs, [domain] if domain else []),
                "pool_since": created if public else None,
            })
            contacts += [{"customer": cid, "email": e, "name": n} for e, n in cs]
            if domain:
                domains.append({"customer": cid, "domain": domain})
            if not public:
                first = rnd.choice(emp_ids)
                owners.append({"customer": cid, "employee": first})
                if rnd.random() < 0.1:
                    second = rnd.choice(emp_ids)
                    if second != first:
                        owners.append({"customer": cid, "employee": second})
        with database.atomic():
            Customer.insert_many(rows).execute()
            for chunk in range(0, len(contacts), 2000):
                Contact.insert_many(contacts[chunk:chunk + 2000]).execute()
            CompanyDomain.insert_many(domains).execute()
            Ownership.insert_many(owners).execute()
    head = Employee.get(Employee.email == "sales0@acme.test")
    sales = Employee.get(Employee.email == "sales42@acme.test")
    return {"admin": admin.id, "head": head.id, "salesperson": sales.id, "employees": emp_ids}
