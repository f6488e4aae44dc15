"""Employees and departments (员工与部门): the department tree and its heads, employees
(address, name, department, manager, roles, active) and their aliases.

Who may do what (checked on the server for every request):
  view   crm_admin, it_admin, auditor: everyone; dept_head: the departments they head
  edit   crm_admin, it_admin; granting or revoking it_admin/auditor: it_admin only
Every change goes to the operation log and the directory change feed (gateway nodes
reload who may send as which address); deactivating an employee ends their panel sessions.
"""

from __future__ import annotations

import bottle
from peewee import fn

from gateway import customers as directory_writes
from gateway.customers import EMPLOYEE_ROLES, EmployeeError
from gateway.db.models import Alias, Department, Employee, Ownership
from panel import i18n, sessions
from panel.customer_access import MANAGER_ROLES
from panel.scope import department_tree, headed_department_ids
from panel.web import (
    User,
    current_user,
    flash,
    forbidden,
    form_value,
    int_arg,
    not_found,
    oplog,
    paginate,
    panel_config,
    redirect,
    render,
    require,
    t,
)

VIEWERS = ("dept_head", "crm_admin", "it_admin", "auditor")
EDITORS = ("crm_admin", "it_admin")
PRIVILEGED_ROLES = {"it_admin", "auditor"}  # only an it_admin grants or revokes these

NAV = [("/employees", "nav.employees", VIEWERS)]

i18n.register({
    "zh-CN": {
        "nav.employees": "员工与部门",
        "emp.title": "员工",
        "emp.departments": "部门",
        "emp.all_departments": "全部部门",
        "emp.no_department": "未分配部门",
        "emp.head": "负责人",
        "emp.email": "邮箱",
        "emp.name": "姓名",
        "emp.department": "部门",
        "emp.manager": "直属上级",
        "emp.roles": "角色",
        "emp.active": "在职",
        "emp.inactive": "已停用",
        "emp.status": "状态",
        "emp.aliases": "别名（可代发地址）",
        "emp.alias_add": "添加别名",
        "emp.alias_remove": "移除",
        "emp.no_aliases": "没有别名。",
        "emp.new": "新建员工",
        "emp.edit": "编辑员工",
        "emp.search": "姓名或邮箱",
        "emp.filter_all": "全部",
        "emp.deactivate": "停用",
        "emp.activate": "启用",
        "emp.created": "员工 {email} 已创建。",
        "emp.updated": "员工 {email} 已更新。",
        "emp.deactivated": "员工 {email} 已停用。",
        "emp.activated": "员工 {email} 已启用。",
        "emp.owns_customers": ("名下还有 {n} 个客户。停用不会移走这些客户：同事给这些客户发信仍会被拦截，"
                               "直到把客户移交给接手的同事。"),
        "emp.owns_customers_ask": "请部门经理或 CRM 管理员在「客户 → 移交离职员工客户」中移交。",
        "emp.hand_over": "移交客户",
        "emp.alias_added": "别名 {address} 已添加。",
        "emp.alias_removed": "别名 {address} 已移除。",
        "emp.role.shared": "共享邮箱",
        "emp.manage_departments": "管理部门",
        "dept.title": "部门管理",
        "dept.new": "新建部门",
        "dept.name": "部门名称",
        "dept.parent": "上级部门",
        "dept.top": "（顶级）",
        "dept.members": "人数",
        "dept.created": "部门 {name} 已创建。",
        "dept.updated": "部门 {name} 已更新。",
        "dept.deleted": "部门 {name} 已删除。",
        "err.bad_address": "邮箱地址无效：{value}",
        "err.address_taken": "地址 {address} 已被 {owner} 使用。",
        "err.bad_role": "未知角色：{roles}",
        "err.bad_name": "名称必须为 1–200 个字符。",
        "err.manager_cycle": "员工不能成为自己的（间接）上级。",
        "err.alias_exists": "该员工已有地址 {address}。",
        "err.department_cycle": "部门不能放在自己下面。",
        "err.department_not_empty": "部门 {name} 仍有员工或下级部门，不能删除。",
        "err.not_company_domain": "员工邮箱必须属于公司域名（{domains}）。",
        "err.privileged_role": "只有 IT 管理员可以授予或撤销 IT 管理员和审计员角色。",
        "err.bad_reference": "所选部门或上级不存在。",
    },
    "en": {
        "nav.employees": "Employees",
        "emp.title": "Employees",
        "emp.departments": "Departments",
        "emp.all_departments": "All departments",
        "emp.no_department": "No department",
        "emp.head": "Head",
        "emp.email": "E-mail",
        "emp.name": "Name",
        "emp.department": "Department",
        "emp.manager": "Manager",
        "emp.roles": "Roles",
        "emp.active": "Active",
        "emp.inactive": "Inactive",
        "emp.status": "Status",
        "emp.aliases": "Aliases (may send as)",
        "emp.alias_add": "Add alias",
        "emp.alias_remove": "Remove",
        "emp.no_aliases": "No aliases.",
        "emp.new": "New employee",
        "emp.edit": "Edit employee",
        "emp.search": "Name or e-mail",
        "emp.filter_all": "All",
        "emp.deactivate": "Deactivate",
        "emp.activate": "Activate",
        "emp.created": "Employee {email} created.",
        "emp.updated": "Employee {email} updated.",
        "emp.deactivated": "Employee {email} deactivated.",
        "emp.activated": "Employee {email} activated.",
        "emp.owns_customers": ("Still owns {n} customers. Deactivating does not move them: colleagues stay blocked "
                               "from mailing them until they are handed over to a successor."),
        "emp.owns_customers_ask": "A department head or CRM admin hands them over under Customers → Hand over.",
        "emp.hand_over": "Hand over customers",
        "emp.alias_added": "Alias {address} added.",
        "emp.alias_removed": "Alias {address} removed.",
        "emp.role.shared": "Shared mailbox",
        "emp.manage_departments": "Manage departments",
        "dept.title": "Departments",
        "dept.new": "New department",
        "dept.name": "Department name",
        "dept.parent": "Parent department",
        "dept.top": "(top level)",
        "dept.members": "Members",
        "dept.created": "Department {name} created.",
        "dept.updated": "Department {name} updated.",
        "dept.deleted": "Department {name} deleted.",
        "err.bad_address": "Not a valid e-mail address: {value}",
        "err.address_taken": "The address {address} is already used by {owner}.",
        "err.bad_role": "Unknown role(s): {roles}",
        "err.bad_name": "A name is 1-200 characters.",
        "err.manager_cycle": "An employee cannot be their own (indirect) manager.",
        "err.alias_exists": "This employee already has {address}.",
        "err.department_cycle": "A department cannot be placed inside itself.",
        "err.department_not_empty": "Department {name} still has employees or sub-departments.",
        "err.not_company_domain": "An employee's address must be in a company domain ({domains}).",
        "err.privileged_role": "Only an IT administrator grants or revokes the IT administrator and auditor roles.",
        "err.bad_reference": "The chosen department or manager does not exist.",
    },
})


# -- helpers ---------------------------------------------------------------------------

def _error_text(exc: EmployeeError) -> str:
    return t("err." + exc.code, **exc.params)


def _visible_departments(user: User) -> set[int] | None:
    """None = all departments."""
    if user.has("crm_admin", "it_admin", "auditor"):
        return None
    return headed_department_ids(user)


def _can_view_employee(user: User, emp: Employee) -> bool:
    depts = _visible_departments(user)
    return depts is None or emp.department_id in depts or emp.id == user.employee_id


def _tree() -> list[tuple[Department, int, int]]:
    """(department, depth, member count) in tree order."""
    depts = list(Department.select().order_by(Department.name))
    counts = dict(Employee.select(Employee.department, fn.COUNT(Employee.id))
                  .where(Employee.active == True).group_by(Employee.department).tuples())  # noqa: E712
    children: dict[int | None, list[Department]] = {}
    ids = {d.id for d in depts}
    for d in depts:
        children.setdefault(d.parent_id if d.parent_id in ids else None, []).append(d)
    out: list[tuple[Department, int, int]] = []
    seen: set[int] = set()

    def walk(parent: int | None, depth: int) -> None:
        for d in children.get(parent, []):
            if d.id in seen:
                continue
            seen.add(d.id)
            out.append((d, depth, counts.get(d.id, 0)))
            walk(d.id, depth + 1)

    walk(None, 0)
    return out


def _employee_names(ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    return {e.id: e.name for e in Employee.select(Employee.id, Employee.name).where(Employee.id.in_(sorted(ids)))}


def _form_choices() -> dict:
    return {
        "departments": _tree(),
        "managers": list(Employee.select(Employee.id, Employee.name, Employee.email)
                         .where(Employee.active == True).order_by(Employee.name)),  # noqa: E712
        "all_roles": EMPLOYEE_ROLES,
    }


def _lookup(model: type, raw: str) -> object | None:
    """The row chosen in a <select> ("" = none); EmployeeError if the id does not exist."""
    if not raw:
        return None
    row = model.get_or_none(model.id == int_arg(raw, -1))
    if row is None:
        raise EmployeeError("bad_reference", "no such department or employee")
    return row


def _role_label(role: str) -> str:
    return t("emp.role.shared") if role == "shared" else t("role." + role)



def _check_privileged(user: User, old_roles: set[str], new_roles: set[str]) -> None:
    if (old_roles ^ new_roles) & PRIVILEGED_ROLES and not user.has("it_admin"):
        forbidden(t("err.privileged_role"))


def _get_employee(eid: int) -> Employee:
    emp = Employee.get_or_none(Employee.id == eid)
    if emp is None:
        not_found()
    return emp


def _get_department(did: int) -> Department:
    dept = Department.get_or_none(Department.id == did)
    if dept is None:
        not_found()
    return dept


# -- routes ----------------------------------------------------------------------------

def routes(app: bottle.Bottle) -> None:
    @app.get("/employees")
    @require(*VIEWERS)
    def index() -> str:
        user = current_user()
        q = bottle.request.query
        visible = _visible_departments(user)
        query = Employee.select()
        if visible is not None:
            query = query.where(Employee.department.in_(sorted(visible)) | (Employee.id == (user.employee_id or 0)))
        dept_id = int_arg(q.get("dept"), 0)
        if dept_id:
            query = query.where(Employee.department.in_(sorted(department_tree({dept_id}))))
        text = (q.getunicode("q") or "").strip()[:200]
        if text:
            query = query.where(Employee.name.contains(text) | Employee.email.contains(text.lower()))
        status = q.get("status", "active")
        if status == "active":
            query = query.where(Employee.active == True)  # noqa: E712
        elif status == "inactive":
            query = query.where(Employee.active == False)  # noqa: E712
        page = paginate(query.order_by(Employee.name, Employee.id), q.get("page"))
        tree = [row for row in _tree() if visible is None or row[0].id in visible]
        dept_names = {d.id: d.name for d, _, _ in _tree()}
        heads = _employee_names({d.head_id for d, _, _ in tree if d.head_id})
        aliases: dict[int, list[str]] = {}
        ids = [e.id for e in page.items]
        if ids:
            for a in Alias.select().where(Alias.employee.in_(ids)).order_by(Alias.address):
                aliases.setdefault(a.employee_id, []).append(a.address)
        return render("employees/index.html", page=page, tree=tree, heads=heads, dept_names=dept_names,
                      dept_id=dept_id, text=text, status=status, aliases=aliases,
                      can_edit=user.has(*EDITORS), role_label=_role_label)

    @app.get("/employees/new")
    @require(*EDITORS)
    def new_form() -> str:
        return render("employees/edit.html", emp=None, form={"roles": ["salesperson"], "active": True},
                      aliases=[], error="", can_edit=True, role_label=_role_label, **_form_choices())

    @app.post("/employees/new")
    @require(*EDITORS)
    def create() -> str:
        return _save(None)

    @app.get("/employees/<eid:int>")
    @require(*VIEWERS)
    def show(eid: int) -> str:
        user = current_user()
        emp = _get_employee(eid)
        if not _can_view_employee(user, emp):
            forbidden()
        return _edit_page(emp, user)

    @app.post("/employees/<eid:int>")
    @require(*EDITORS)
    def update(eid: int) -> str:
        return _save(_get_employee(eid))

    @app.post("/employees/<eid:int>/active")
    @require(*EDITORS)
    def set_active(eid: int) -> None:
        user = current_user()
        emp = _get_employee(eid)
        active = form_value("active") == "1"
        if not active and PRIVILEGED_ROLES & emp.role_set and not user.has("it_admin"):
            forbidden(t("err.privileged_role"))
        if directory_writes.set_employee_active(emp, active):
            if not active:
                sessions.delete_for_user("employee", emp.id)
            oplog("employee.activate" if active else "employee.deactivate", f"employee:{emp.email}")
            flash(t("emp.activated" if active else "emp.deactivated", email=emp.email))
        redirect(f"/employees/{emp.id}")

    @app.post("/employees/<eid:int>/aliases")
    @require(*EDITORS)
    def alias_add(eid: int) -> str:
        user = current_user()
        emp = _get_employee(eid)
        address = form_value("address", max_length=400)
        try:
            alias = directory_writes.add_alias(emp, address)
        except EmployeeError as exc:
            bottle.response.status = 400
            return _edit_page(emp, user, alias_error=_error_text(exc), alias_value=address)
        oplog("employee.alias.add", f"employee:{emp.email}", {"alias": alias.address})
        flash(t("emp.alias_added", address=alias.address))
        redirect(f"/employees/{emp.id}")

    @app.post("/employees/<eid:int>/aliases/<aid:int>/delete")
    @require(*EDITORS)
    def alias_remove(eid: int, aid: int) -> None:
        emp = _get_employee(eid)
        alias = Alias.get_or_none((Alias.id == aid) & (Alias.employee == emp))
        if alias is None:
            not_found()
        address = alias.address
        directory_writes.remove_alias(alias)
        oplog("employee.alias.remove", f"employee:{emp.email}", {"alias": address})
        flash(t("emp.alias_removed", address=address))
        redirect(f"/employees/{emp.id}")

    @app.get("/employees/departments")
    @require(*EDITORS)
    def departments() -> str:
        return _departments_page()

    @app.post("/employees/departments/new")
    @require(*EDITORS)
    def department_create() -> str:
        return _save_department(None)

    @app.post("/employees/departments/<did:int>")
    @require(*EDITORS)
    def department_update(did: int) -> str:
        return _save_department(_get_department(did))

    @app.post("/employees/departments/<did:int>/delete")
    @require(*EDITORS)
    def department_delete(did: int) -> str:
        dept = _get_department(did)
        name = dept.name
        try:
            directory_writes.delete_department(dept)
        except EmployeeError as exc:
            bottle.response.status = 400
            return _departments_page(error=_error_text(exc))
        oplog("department.delete", f"department:{name}")
        flash(t("dept.deleted", name=name))
        redirect("/employees/departments")


def _edit_page(emp: Employee, user: User, error: str = "", form: dict | None = None,
               alias_error: str = "", alias_value: str = "") -> str:
    if form is None:
        form = {"email": emp.email, "name": emp.name, "department": emp.department_id or "",
                "manager": emp.manager_id or "", "roles": sorted(emp.role_set), "active": emp.active}
    aliases = list(Alias.select().where(Alias.employee == emp).order_by(Alias.address))
    owned = Ownership.select().where(Ownership.employee == emp).count()  # a leaver's customers need a handover
    return render("employees/edit.html", emp=emp, form=form, aliases=aliases, error=error, owned=owned,
                  can_hand_over=user.has(*MANAGER_ROLES),
                  alias_error=alias_error, alias_value=alias_value, can_edit=user.has(*EDITORS),
                  role_label=_role_label, dept_name=emp.department.name if emp.department_id else "",
                  manager_name=emp.manager.name if emp.manager_id else "", **_form_choices())


def _save(emp: Employee | None) -> str:
    user = current_user()
    cfg = panel_config()
    form = {
        "email": form_value("email", max_length=400),
        "name": form_value("name", max_length=400),
        "department": form_value("department"),
        "manager": form_value("manager"),
        "roles": [r for r in bottle.request.forms.getall("roles") if r][:20],
        "active": form_value("active") == "1" if emp is not None else True,
    }
    old_roles = emp.role_set if emp is not None else set()
    _check_privileged(user, old_roles, set(form["roles"]))
    error = ""
    try:
        address = directory_writes.employee_address(form["email"])
        domains = [d.lower() for d in cfg.company.domains]
        if address.rpartition("@")[2] not in domains:
            raise EmployeeError("not_company_domain", "not a company domain", domains=", ".join(domains))
        department = _lookup(Department, form["department"])
        manager = _lookup(Employee, form["manager"])
        saved, changes = directory_writes.save_employee(
            emp, email=address, name=form["name"], department=department, manager=manager,
            roles=form["roles"], active=form["active"])
    except EmployeeError as exc:
        error = _error_text(exc)
    if error:
        bottle.response.status = 400
        if emp is None:
            return render("employees/edit.html", emp=None, form=form, aliases=[], error=error, can_edit=True,
                          role_label=_role_label, **_form_choices())
        return _edit_page(emp, user, error=error, form=form)
    if changes:
        if emp is not None and "active" in changes and not saved.active:
            sessions.delete_for_user("employee", saved.id)
        oplog("employee.create" if emp is None else "employee.update", f"employee:{saved.email}",
              {k: {"old": old, "new": new} for k, (old, new) in changes.items()})
    flash(t("emp.created" if emp is None else "emp.updated", email=saved.email))
    redirect(f"/employees/{saved.id}")


def _departments_page(error: str = "", form: dict | None = None) -> str:
    tree = _tree()
    heads = _employee_names({d.head_id for d, _, _ in tree if d.head_id})
    employees = list(Employee.select(Employee.id, Employee.name, Employee.email)
                     .where(Employee.active == True).order_by(Employee.name))  # noqa: E712
    return render("employees/departments.html", tree=tree, heads=heads, employees=employees, error=error,
                  form=form or {})


def _save_department(dept: Department | None) -> str:
    form = {"name": form_value("name", max_length=400), "parent": form_value("parent"),
            "head": form_value("head")}
    try:
        parent = _lookup(Department, form["parent"])
        head = _lookup(Employee, form["head"])
        saved, changes = directory_writes.save_department(dept, name=form["name"], parent=parent, head=head)
    except EmployeeError as exc:
        bottle.response.status = 400
        return _departments_page(error=_error_text(exc), form=form if dept is None else None)
    if changes:
        oplog("department.create" if dept is None else "department.update", f"department:{saved.name}",
              {k: {"old": old, "new": new} for k, (old, new) in changes.items()})
    flash(t("dept.created" if dept is None else "dept.updated", name=saved.name))
    redirect("/employees/departments")
