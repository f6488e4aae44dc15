"""The public pool (公海) over real HTTP: visibility, claim, assign, return by hand, roles, CSRF."""

from __future__ import annotations

import pytest

from tests.panel.conftest import PanelClient
from tests.panel.test_customers import emp, make_customer, uid

pytestmark = pytest.mark.usefixtures("panel_server")


def owners_of(cid: int) -> list[str]:
    from gateway.db.models import Customer

    return sorted(o.employee.email for o in Customer.get_by_id(cid).ownerships)


def test_pool_lists_public_customers_to_every_salesperson(http_as, panel_db) -> None:
    public = make_customer(f"Public {uid()}")
    owned = make_customer(f"Owned {uid()}", ("bob@acme.test",))
    for role in ("salesperson", "dept_head", "crm_admin"):
        text = http_as(role).get("/pool?q=" + public.name.split()[-1]).text
        assert public.name in text, role
    assert owned.name not in http_as("crm_admin").get("/pool?q=" + owned.name.split()[-1]).text
    for role in ("auditor", "it_admin"):
        assert http_as(role).get("/pool").status == 403


def test_claim_once_and_csrf(http_as, panel_db, panel_url) -> None:
    from gateway.db.models import AuditLog, Customer

    public = make_customer(f"Claim me {uid()}")
    alice = http_as("salesperson")
    assert alice.post(f"/pool/{public.id}/claim", csrf=False).status == 403
    assert Customer.get_by_id(public.id).pool == "public"
    resp = alice.post(f"/pool/{public.id}/claim")
    assert resp.status == 303
    c = Customer.get_by_id(public.id)
    assert c.pool == "owned" and c.assigned_at is not None and owners_of(c.id) == ["alice@acme.test"]
    assert AuditLog.select().where((AuditLog.action == "pool.claim") & (AuditLog.target == f"customer:{c.id}")
                                   & (AuditLog.actor == "alice@acme.test")).exists()
    # Bob comes second: refused with a clear message, Alice keeps it
    bob = PanelClient(panel_url)
    assert bob.login("bob@acme.test", "bob-pw").status == 303
    bob.get("/")
    resp = bob.post(f"/pool/{public.id}/claim", follow=True)
    assert "已不在公海中" in resp.text
    assert owners_of(public.id) == ["alice@acme.test"]
    # Bob no longer sees it (not his, not public)
    assert bob.get(f"/customers/{public.id}").status == 403


def test_assign_by_managers_only(http_as, panel_db) -> None:
    from gateway.db.models import Customer

    public = make_customer(f"Assign me {uid()}")
    bob_id = emp("bob@acme.test").id
    alice = http_as("salesperson")
    assert alice.post(f"/pool/{public.id}/assign", {"employee": str(bob_id)}).status == 403
    admin = http_as("crm_admin")
    listing = admin.get("/pool").text
    assert listing.count('name="employee"') == 1  # one employee choice for the page, not one per row
    assert f'formaction="/pool/{public.id}/assign"' in listing
    assert admin.post(f"/pool/{public.id}/claim").status == 403  # a local account owns no customers
    assert admin.post(f"/pool/{public.id}/assign", {"employee": "0"}).status == 403
    assert admin.post(f"/pool/{public.id}/assign", {"employee": str(bob_id)}).status == 303
    assert owners_of(public.id) == ["bob@acme.test"]
    assert Customer.get_by_id(public.id).pool == "owned"
    # a department head assigns to the department's people only
    other = make_customer(f"Assign other {uid()}")
    from gateway.customers import create_employee

    outsider = create_employee(f"outsider-{uid()}@acme.test", "Outsider", None)
    carol = http_as("dept_head")
    assert carol.post(f"/pool/{other.id}/assign", {"employee": str(outsider.id)}).status == 403
    assert carol.post(f"/pool/{other.id}/assign", {"employee": str(emp('alice@acme.test').id)}).status == 303
    assert owners_of(other.id) == ["alice@acme.test"]


def test_return_by_hand(http_as, panel_db) -> None:
    from gateway.db.models import AuditLog, Customer

    c = make_customer(f"Return me {uid()}", ("alice@acme.test",))
    alice = http_as("salesperson")
    assert alice.post(f"/customers/{c.id}/release", csrf=False).status == 403
    assert alice.post(f"/customers/{c.id}/release").status == 303
    row = Customer.get_by_id(c.id)
    assert row.pool == "public" and owners_of(c.id) == [] and row.pool_since is not None
    assert "alice@acme.test" in row.pool_reason
    assert AuditLog.select().where((AuditLog.action == "pool.release")
                                   & (AuditLog.target == f"customer:{c.id}")).exists()
    # now in the pool page for everyone, and released again it is refused
    assert c.name in http_as("dept_head").get("/pool?q=" + c.name.split()[-1]).text
    assert alice.post(f"/customers/{c.id}/release").status == 403


def test_sweep_now_is_crm_admin_only(http_as) -> None:
    assert http_as("salesperson").post("/pool/sweep").status == 403
    assert http_as("dept_head").post("/pool/sweep").status == 403
    page = http_as("crm_admin").get("/pool").text
    assert "自动退回公海设置" in page and "pool_*" in page
    assert http_as("crm_admin").post("/pool/sweep").status == 303
