"""Employees and departments (员工与部门) against the real panel process and DB: the tree,
heads, roles, aliases, active/inactive; every change in the operation log; who may do
what (403 for every lower role)."""

from __future__ import annotations

import itertools
import re

import pytest

from gateway.db.models import Alias, AuditLog, Department, DirectoryChange, Employee
from tests.panel.conftest import PanelClient

pytestmark = pytest.mark.integration

SEQ = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}{next(SEQ)}-{id(SEQ) % 10000}"


def last_log(action: str, target: str) -> AuditLog | None:
    return (AuditLog.select().where(AuditLog.action == action, AuditLog.target == target)
            .order_by(AuditLog.id.desc()).first())


def create(client: PanelClient, email: str, name: str = "Test Person", roles=("salesperson",), **extra: str):
    return client.post("/employees/new", {"email": email, "name": name, "department": extra.get("department", ""),
                                          "manager": extra.get("manager", ""), "roles": list(roles)})


def sales_europe() -> Department:
    return Department.get(Department.name == "Sales Europe")


# -- permissions ---------------------------------------------------------------------------------

def test_lower_roles_get_403_for_every_employee_permission(http_as, panel_db):
    alice = Employee.get(Employee.email == "alice@acme.test")
    dept = sales_europe()
    writes = [
        ("/employees/new", {"email": "x1@acme.test", "name": "X", "roles": "salesperson"}),
        (f"/employees/{alice.id}", {"email": alice.email, "name": "Renamed", "roles": "salesperson"}),
        (f"/employees/{alice.id}/active", {"active": "0"}),
        (f"/employees/{alice.id}/aliases", {"address": "alice.x@acme.test"}),
        (f"/employees/{alice.id}/aliases/1/delete", {}),
        ("/employees/departments/new", {"name": "Hacked"}),
        (f"/employees/departments/{dept.id}", {"name": "Hacked"}),
        (f"/employees/departments/{dept.id}/delete", {}),
    ]
    salesperson = http_as("salesperson")
    for path in ("/employees", f"/employees/{alice.id}", "/employees/new", "/employees/departments"):
        assert salesperson.get(path).status == 403, path
    for role in ("salesperson", "dept_head", "auditor"):
        client = http_as(role)
        for path, data in writes:
            assert client.post(path, data).status == 403, (role, path)
        assert client.get("/employees/new").status == 403
        assert client.get("/employees/departments").status == 403
    # nothing changed
    assert Employee.get_by_id(alice.id).name == alice.name and Employee.get_by_id(alice.id).active
    assert not Department.select().where(Department.name == "Hacked").exists()
    assert Department.get_by_id(dept.id).name == "Sales Europe"


def test_only_it_admin_grants_privileged_roles(http_as, panel_db):
    email = unique("priv") + "@acme.test"
    crm = http_as("crm_admin")
    r = create(crm, email, roles=("salesperson", "it_admin"))
    assert r.status == 403 and "IT 管理员" in r.text
    assert not Employee.select().where(Employee.email == email).exists()
    admin = http_as("it_admin")
    assert create(admin, email, roles=("salesperson", "auditor")).status == 303
    emp = Employee.get(Employee.email == email)
    assert emp.role_set == {"salesperson", "auditor"}
    # crm_admin may not deactivate or strip an auditor either
    assert crm.post(f"/employees/{emp.id}/active", {"active": "0"}).status == 403
    assert crm.post(f"/employees/{emp.id}", {"email": email, "name": "X", "roles": "salesperson"}).status == 403
    assert Employee.get_by_id(emp.id).active and Employee.get_by_id(emp.id).role_set == {"salesperson", "auditor"}


def test_dept_head_sees_only_the_departments_they_head(http_as, panel_db):
    from gateway.customers import create_department, create_employee

    other = create_department(unique("Elsewhere "))
    stranger = create_employee(unique("stranger") + "@acme.test", "Stranger Danger", other)
    carol = http_as("dept_head")
    page = carol.get("/employees?status=all")
    assert page.status == 200
    assert "alice@acme.test" in page.text and stranger.email not in page.text
    assert carol.get(f"/employees/{stranger.id}").status == 403
    alice = Employee.get(Employee.email == "alice@acme.test")
    detail = carol.get(f"/employees/{alice.id}")
    assert detail.status == 200 and 'id="employee-form"' not in detail.text  # read-only for a head
    auditor = http_as("auditor").get("/employees?status=all")
    assert auditor.status == 200 and stranger.email in auditor.text and 'href="/employees/new"' not in auditor.text


# -- changes and the operation log ---------------------------------------------------------------

def test_create_edit_alias_deactivate_each_logged(http_as, panel_db):
    crm = http_as("crm_admin")
    email = unique("new.hire") + "@acme.test"
    dept = sales_europe()
    carol = Employee.get(Employee.email == "carol@acme.test")
    feed_before = DirectoryChange.select().count()

    r = create(crm, email, "New Hire 新同事", department=str(dept.id), manager=str(carol.id))
    assert r.status == 303
    emp = Employee.get(Employee.email == email)
    assert r.header("location").endswith(f"/employees/{emp.id}")
    assert emp.department_id == dept.id and emp.manager_id == carol.id and emp.role_set == {"salesperson"}
    assert last_log("employee.create", f"employee:{email}").actor == "local:crm"
    page = crm.get(f"/employees/{emp.id}")
    assert "员工 " + email + " 已创建" in page.text  # the flash

    r = crm.post(f"/employees/{emp.id}", {"email": email, "name": "New Hire Renamed", "department": str(dept.id),
                                          "manager": "", "roles": ["salesperson", "dept_head"], "active": "1"})
    assert r.status == 303
    emp = Employee.get_by_id(emp.id)
    assert emp.name == "New Hire Renamed" and emp.manager_id is None and emp.role_set == {"salesperson", "dept_head"}
    entry = last_log("employee.update", f"employee:{email}")
    assert entry is not None and "New Hire Renamed" in entry.details and "dept_head" in entry.details

    alias = unique("hire.alias") + "@acme.test"
    assert crm.post(f"/employees/{emp.id}/aliases", {"address": alias.upper()}).status == 303
    row = Alias.get(Alias.address == alias)
    assert row.employee_id == emp.id
    assert alias in last_log("employee.alias.add", f"employee:{email}").details
    # the same alias for someone else is refused with a clear message
    alice = Employee.get(Employee.email == "alice@acme.test")
    r = crm.post(f"/employees/{alice.id}/aliases", {"address": alias})
    assert r.status == 400 and alias in r.text and "已被" in r.text
    assert crm.post(f"/employees/{emp.id}/aliases/{row.id}/delete", {}).status == 303
    assert Alias.get_or_none(Alias.id == row.id) is None
    assert alias in last_log("employee.alias.remove", f"employee:{email}").details

    assert crm.post(f"/employees/{emp.id}/active", {"active": "0"}).status == 303
    assert not Employee.get_by_id(emp.id).active
    assert last_log("employee.deactivate", f"employee:{email}") is not None
    link = f'href="/employees/{emp.id}"'
    assert link not in crm.get("/employees").text  # the list shows active employees by default
    assert link in crm.get("/employees?status=inactive").text
    assert crm.post(f"/employees/{emp.id}/active", {"active": "1"}).status == 303
    assert Employee.get_by_id(emp.id).active and last_log("employee.activate", f"employee:{email}") is not None
    # gateway nodes hear about every directory write
    assert DirectoryChange.select().count() > feed_before


def test_validation_messages(http_as, panel_db):
    crm = http_as("crm_admin")
    r = create(crm, unique("outsider") + "@gmail.com")
    assert r.status == 400 and "公司域名" in r.text
    r = create(crm, "not an address")
    assert r.status == 400 and "邮箱地址无效" in r.text
    r = create(crm, "alice@acme.test")
    assert r.status == 400 and "alice@acme.test" in r.text
    r = create(crm, unique("noname") + "@acme.test", name="")
    assert r.status == 400


def test_department_tree_heads_and_delete(http_as, panel_db):
    admin = http_as("it_admin")
    carol = Employee.get(Employee.email == "carol@acme.test")
    top, sub = unique("Asia "), unique("Japan desk ")
    assert admin.post("/employees/departments/new", {"name": top, "parent": "", "head": str(carol.id)}).status == 303
    top_row = Department.get(Department.name == top)
    assert top_row.head_id == carol.id
    assert last_log("department.create", f"department:{top}") is not None
    assert admin.post("/employees/departments/new", {"name": sub, "parent": str(top_row.id), "head": ""}).status == 303
    sub_row = Department.get(Department.name == sub)
    assert sub_row.parent_id == top_row.id
    page = admin.get("/employees/departments")
    assert page.status == 200
    # tree order: the sub-department comes right after its parent, indented one level
    assert page.text.index(top) < page.text.index(sub)
    # a department cannot be placed under its own child
    r = admin.post(f"/employees/departments/{top_row.id}", {"name": top, "parent": str(sub_row.id),
                                                            "head": str(carol.id)})
    assert r.status == 400 and "不能放在自己下面" in r.text
    # not empty: refused
    r = admin.post(f"/employees/departments/{top_row.id}/delete", {})
    assert r.status == 400 and top in r.text
    assert admin.post(f"/employees/departments/{sub_row.id}/delete", {}).status == 303
    assert admin.post(f"/employees/departments/{top_row.id}/delete", {}).status == 303
    assert not Department.select().where(Department.name.in_([top, sub])).exists()
    assert last_log("department.delete", f"department:{sub}") is not None


def test_deactivating_an_employee_ends_their_panel_session(http_as, panel_url, panel_db):
    bob = Employee.get(Employee.email == "bob@acme.test")
    client = PanelClient(panel_url)
    assert client.login("bob@acme.test", "bob-pw").status == 303
    assert client.get("/").status == 200
    crm = http_as("crm_admin")
    try:
        assert crm.post(f"/employees/{bob.id}/active", {"active": "0"}).status == 303
        r = client.get("/")
        assert r.status == 303 and "/login" in r.header("location")
        again = PanelClient(panel_url)
        assert again.login("bob@acme.test", "bob-pw").status in (401, 403)  # inactive: no access
        assert again.cookie("mg_session") is None
    finally:
        crm.post(f"/employees/{bob.id}/active", {"active": "1"})
    assert Employee.get_by_id(bob.id).active


def test_search_and_department_filter(http_as, panel_db):
    crm = http_as("crm_admin")
    page = crm.get("/employees?q=alice")
    assert "alice@acme.test" in page.text and "bob@acme.test" not in page.text
    dept = sales_europe()
    page = crm.get(f"/employees?dept={dept.id}")
    assert "carol@acme.test" in page.text
    assert re.search(r"Sales Europe", page.text)


@pytest.mark.browser
def test_script_in_an_employee_name_is_inert(http_as, page_as, panel_db):
    email = unique("xss") + "@acme.test"
    payload = "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script>"
    assert create(http_as("crm_admin"), email, name="Eve " + payload[:150]).status == 303
    emp = Employee.get(Employee.email == email)
    page = page_as("crm_admin")
    base = page.url.rstrip("/")
    for path in (f"/employees?q={email}", f"/employees/{emp.id}", "/oplog?action=employee.create"):
        page.goto(base + path)
        assert page.title() != "pwned"
        assert page.locator("img[src=x], main script").count() == 0
    page.goto(base + f"/employees/{emp.id}")
    assert "<script>" in page.locator("input[name=name]").input_value()  # shown as text, kept as typed


def test_a_leavers_page_says_their_customers_need_a_handover(http_as, panel_db):
    from gateway.customers import new_customer

    email = f"{unique('leaver')}@acme.test"
    assert create(http_as("it_admin"), email, "Leaving Person").status == 303
    leaver = Employee.get(Employee.email == email)
    page = http_as("crm_admin").get(f"/employees/{leaver.id}").text
    assert 'id="owned-customers"' not in page  # nothing to hand over
    new_customer(f"Customer of {email}", contacts=[(f"buyer@{leaver.id}-leaver.example", "Buyer")], owners=[leaver])
    page = http_as("crm_admin").get(f"/employees/{leaver.id}").text
    assert 'id="owned-customers"' in page and "名下还有 1 个客户" in page
    assert f'href="/customers/handover?from={leaver.id}"' in page
    handover = http_as("crm_admin").get(f"/customers/handover?from={leaver.id}").text
    assert re.search(rf'<option value="{leaver.id}" selected>', handover)
    page = http_as("it_admin").get(f"/employees/{leaver.id}").text  # no access to customers: told whom to ask
    assert "名下还有 1 个客户" in page and "/customers/handover" not in page and "CRM 管理员" in page
