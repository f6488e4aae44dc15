"""Customers (客户管理) over real HTTP against the real panel: roles, scope, CSRF,
validation, owners (add, transfer, hand over), export, and the directory feed."""

from __future__ import annotations

import csv
import io
import re
import uuid
from urllib.parse import quote

import openpyxl
import pytest

pytestmark = pytest.mark.usefixtures("panel_server")


def uid() -> str:
    return uuid.uuid4().hex[:8]


def emp(email: str):  # noqa: ANN201
    from gateway.db.models import Employee

    return Employee.get(Employee.email == email)


def make_customer(name: str, owners: tuple[str, ...] = (), **fields):  # noqa: ANN003, ANN201
    from gateway.config import PUBLIC_MAIL_DOMAINS
    from gateway.customers import new_customer

    tag = uid()
    return new_customer(name, contacts=[(f"buyer-{tag}@{tag}.example", "Buyer")], domains=[f"{tag}.example"],
                        owners=[emp(o) for o in owners], public_domains=PUBLIC_MAIL_DOMAINS, **fields)


def created_id(resp) -> int:  # noqa: ANN001
    assert resp.status == 303, (resp.status, resp.text[:800])
    found = re.search(r"/customers/(\d+)$", resp.header("location"))
    assert found, resp.header("location")
    return int(found.group(1))


def test_lower_roles_get_403(http_as) -> None:
    for role in ("auditor", "it_admin"):
        client = http_as(role)
        assert client.get("/customers").status == 403
        assert client.get("/customers/new").status == 403
        assert client.get("/customers/export.csv").status == 403
        assert client.post("/customers/new", {"name": "x"}).status == 403
    sales = http_as("salesperson")
    assert sales.get("/customers/handover").status == 403
    assert sales.post("/customers/handover", {"from": "1", "to": "2"}).status == 403


def test_signed_out_is_sent_to_login(anon_client) -> None:
    resp = anon_client.get("/customers")
    assert resp.status == 303 and "/login?next=/customers" in resp.header("location")


def test_salesperson_scope(http_as, panel_db) -> None:
    bobs = make_customer(f"Bob only {uid()}", ("bob@acme.test",))
    alices = make_customer(f"Alice own {uid()}", ("alice@acme.test",))
    public = make_customer(f"Pool one {uid()}")
    alice = http_as("salesperson")
    listing = alice.get("/customers?pool=all").text
    assert alices.name in listing and public.name in listing
    assert bobs.name not in listing
    assert alice.get(f"/customers/{bobs.id}").status == 403
    assert alice.get(f"/customers/{bobs.id}/edit").status == 403
    assert alice.post(f"/customers/{bobs.id}/edit", {"name": "stolen"}).status == 403
    assert alice.post(f"/customers/{bobs.id}/release").status == 403
    assert alice.get(f"/customers/{public.id}").status == 200
    # search for Bob's contact address finds nothing for Alice, the customer for the dept head
    address = bobs.contacts[0].email
    assert bobs.name not in alice.get(f"/customers?pool=all&q={address}").text
    assert bobs.name in http_as("dept_head").get(f"/customers?q={address}").text
    assert bobs.name in http_as("crm_admin").get(f"/customers?q={address}").text
    # a department head sees the department, not other departments' customers
    from gateway.customers import create_employee

    outsider = create_employee(f"elsewhere-{uid()}@acme.test", "Elsewhere", None)
    theirs = make_customer(f"Elsewhere's {uid()}", (outsider.email,))
    assert http_as("dept_head").get(f"/customers/{theirs.id}").status == 403
    assert theirs.name not in http_as("dept_head").get("/customers?pool=all&q=" + quote(theirs.name)).text
    assert http_as("crm_admin").get(f"/customers/{theirs.id}").status == 200
    # a salesperson does not delete, add owners or transfer
    assert alice.post(f"/customers/{alices.id}/delete").status == 403
    assert alice.post(f"/customers/{alices.id}/transfer", {"employee": str(emp("bob@acme.test").id)}).status == 403
    assert alice.post(f"/customers/{alices.id}/owners", {"employee": str(emp("bob@acme.test").id)}).status == 403


def test_create_edit_validation_and_oplog(http_as, panel_db) -> None:
    from gateway.db.models import AuditLog, Customer, DirectoryChange

    alice = http_as("salesperson")
    tag = uid()
    before_changes = DirectoryChange.select().count()
    form = {"name": f"Sevilla Tools {tag}", "stage": "quoted", "tags": "vip, fair-2025",
            "country": "ES", "contacts": f"compras@sevilla-{tag}.es, Lucía\nLead <lead@sevilla-{tag}.es>",
            "domains": f"sevilla-{tag}.es", "owner": "self"}
    assert alice.post("/customers/new", form, csrf=False).status == 403  # CSRF checked
    assert not Customer.select().where(Customer.name == form["name"]).exists()
    cid = created_id(alice.post("/customers/new", form))
    c = Customer.get_by_id(cid)
    assert (c.stage, c.tags, c.pool) == ("quoted", "vip,fair-2025", "owned")
    assert sorted(x.email for x in c.contacts) == [f"compras@sevilla-{tag}.es", f"lead@sevilla-{tag}.es"]
    assert [o.employee.email for o in c.ownerships] == ["alice@acme.test"]
    assert DirectoryChange.select().count() > before_changes  # gateway nodes reload
    # the list search finds it by name, contact address, domain and tag
    for q in (f"sevilla tools {tag}", f"compras@sevilla-{tag}.es", f"sevilla-{tag}.es"):
        assert form["name"] in alice.get("/customers?q=" + quote(q)).text
    assert form["name"] in alice.get("/customers?tag=fair-2025").text
    # a public mail domain is refused as a company domain, with the reason
    resp = alice.post(f"/customers/{cid}/edit", {**form, "domains": "gmail.com"})
    assert resp.status == 400
    assert "gmail.com 是公共邮箱域名" in resp.text
    assert [d.domain for d in Customer.get_by_id(cid).domains] == [f"sevilla-{tag}.es"]
    resp = alice.post(f"/customers/{cid}/edit", {**form, "name": "  "})
    assert resp.status == 400 and "请填写客户名称" in resp.text
    resp = alice.post(f"/customers/{cid}/edit", {**form, "contacts": "not-an-address"})
    assert resp.status == 400 and "不是有效的邮箱地址" in resp.text
    resp = alice.post(f"/customers/{cid}/edit", {**form, "stage": "bogus"})
    assert resp.status == 400
    # an address of another customer is refused (the directory stays unambiguous)
    resp = alice.post(f"/customers/{cid}/edit", {**form, "contacts": "einkauf@hamburg-tools.de"})
    assert resp.status == 400 and "Hamburg Tools GmbH" in resp.text
    # a valid edit
    resp = alice.post(f"/customers/{cid}/edit", {**form, "stage": "won", "tags": "vip"})
    assert resp.status == 303
    assert Customer.get_by_id(cid).stage == "won"
    entry = (AuditLog.select().where((AuditLog.action == "customer.update") & (AuditLog.target == f"customer:{cid}"))
             .order_by(AuditLog.id.desc()).first())
    assert entry is not None and entry.actor == "alice@acme.test" and "won" in entry.details
    assert AuditLog.select().where((AuditLog.action == "customer.create")
                                   & (AuditLog.target == f"customer:{cid}")).exists()


def test_owner_add_transfer_delete_by_dept_head(http_as, panel_db) -> None:
    from gateway.db.models import AuditLog, Customer

    c = make_customer(f"Transfer me {uid()}", ("alice@acme.test",))
    carol = http_as("dept_head")
    bob_id = emp("bob@acme.test").id
    assert carol.post(f"/customers/{c.id}/owners", {"employee": str(bob_id)}).status == 303
    assert sorted(o.employee.email for o in Customer.get_by_id(c.id).ownerships) == \
        ["alice@acme.test", "bob@acme.test"]
    assert carol.post(f"/customers/{c.id}/transfer", {"employee": str(bob_id)}).status == 303
    assert [o.employee.email for o in Customer.get_by_id(c.id).ownerships] == ["bob@acme.test"]
    assert AuditLog.select().where((AuditLog.action == "customer.transfer")
                                   & (AuditLog.target == f"customer:{c.id}")).exists()
    # an unknown or foreign employee is refused
    assert carol.post(f"/customers/{c.id}/transfer", {"employee": "999999"}).status == 403
    assert carol.post(f"/customers/{c.id}/delete", {"confirm": "1"}, csrf="wrong").status == 403
    assert carol.post(f"/customers/{c.id}/delete", {"confirm": "1"}).status == 303
    assert Customer.get_or_none(Customer.id == c.id) is None


def _options(page: str, form_id: str) -> list[str] | None:
    """The employee choices of the form ``form_id`` on a customer page (None: no such form)."""
    found = re.search(rf'<form[^>]*id="{form_id}".*?</form>', page, re.S)
    return re.findall(r'<option value="(\d+)"', found.group(0)) if found else None


def test_owner_forms_offer_only_choices_that_change_something(http_as, panel_db) -> None:
    alice, bob = str(emp("alice@acme.test").id), str(emp("bob@acme.test").id)
    carol = http_as("dept_head")
    c = make_customer(f"Owned by Alice {uid()}", ("alice@acme.test",))
    page = carol.get(f"/customers/{c.id}").text
    assert bob in _options(page, "add-owner") and alice not in _options(page, "add-owner")
    assert bob in _options(page, "transfer") and alice not in _options(page, "transfer")
    assert _options(page, "assign") is None
    both = make_customer(f"Owned by two {uid()}", ("alice@acme.test", "bob@acme.test"))
    page = carol.get(f"/customers/{both.id}").text
    assert alice not in _options(page, "add-owner") and bob not in _options(page, "add-owner")
    assert {alice, bob} <= set(_options(page, "transfer"))  # keep one of the two
    pooled = make_customer(f"In the pool {uid()}")
    page = carol.get(f"/customers/{pooled.id}").text
    assert {alice, bob} <= set(_options(page, "assign"))  # the pool's own way, not three forms
    assert _options(page, "add-owner") is None and _options(page, "transfer") is None


def test_handover_moves_every_customer(http_as, panel_db) -> None:
    from gateway.customers import create_employee
    from gateway.db.models import Customer, Department, Ownership

    dept = Department.get(Department.name == "Sales Europe")
    leaving = create_employee(f"leaving-{uid()}@acme.test", "Leaving Person", dept)
    taker = create_employee(f"taker-{uid()}@acme.test", "Taking Over", dept)
    ids = [make_customer(f"Handover {i} {uid()}", (leaving.email,)).id for i in range(3)]
    admin = http_as("crm_admin")
    assert "移交" in admin.get("/customers/handover").text
    resp = admin.post("/customers/handover", {"from": str(leaving.id), "to": str(taker.id)})
    assert resp.status == 303
    assert not Ownership.select().where(Ownership.employee == leaving).exists()
    for cid in ids:
        assert [o.employee_id for o in Customer.get_by_id(cid).ownerships] == [taker.id]


def test_filters_sort_and_pages(http_as, panel_db) -> None:
    tag = uid()
    for i in range(3):
        make_customer(f"Zeta {tag} {i}", ("alice@acme.test",), country="PE", stage="sample", tags=f"t{tag}")
    admin = http_as("crm_admin")
    text = admin.get(f"/customers?q={tag}&sort=name&dir=asc&stage=sample&country=PE").text
    positions = [text.index(f"Zeta {tag} {i}") for i in range(3)]
    assert positions == sorted(positions)
    assert f"Zeta {tag}" not in admin.get(f"/customers?q={tag}&stage=lead").text
    assert f"Zeta {tag}" not in admin.get(f"/customers?q={tag}&country=DE").text
    assert f"Zeta {tag}" in admin.get(f"/customers?tag=t{tag}").text
    assert f"Zeta {tag}" in admin.get(f"/customers?q={tag}&owner={emp('alice@acme.test').id}").text
    assert f"Zeta {tag}" not in admin.get(f"/customers?q={tag}&owner={emp('bob@acme.test').id}").text
    # odd parameters fall back to defaults instead of failing
    assert admin.get("/customers?page=abc&sort=';drop&stage=x&owner=-1").status == 200
    assert admin.get("/customers?page=99999").status == 200


def test_export_current_filter_csv_and_xlsx(http_as, panel_db) -> None:
    tag = uid()
    for i in range(2):
        make_customer(f"=cmd|' Export {tag} {i}", ("alice@acme.test",))
    bobs = make_customer(f"Export {tag} bob", ("bob@acme.test",))
    alice = http_as("salesperson")
    resp = alice.get(f"/customers/export.csv?q={tag}")
    assert resp.status == 200 and resp.header("content-type").startswith("text/csv")
    rows = list(csv.reader(io.StringIO(resp.text.lstrip("\ufeff"))))
    names = sorted(r[0] for r in rows[1:])
    assert names == [f"'=cmd|' Export {tag} 0", f"'=cmd|' Export {tag} 1"]  # formula defused, Bob's absent
    assert bobs.name not in resp.text
    client = http_as("crm_admin")
    import urllib.request

    req = urllib.request.Request(client.base_url + f"/customers/export.xlsx?q={tag}")
    with client._plain.open(req) as raw:
        wb = openpyxl.load_workbook(io.BytesIO(raw.read()))
    values = [r[0] for r in wb.active.iter_rows(min_row=2, values_only=True)]
    assert len(values) == 3 and f"Export {tag} bob" in values
