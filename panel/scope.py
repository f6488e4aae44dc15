"""Who sees whose data.  Areas filter with these; the role checks are in panel.web.require.

``visible_employee_ids(user)``:
  crm_admin                → None (no restriction: every employee)
  dept_head                → every employee of the departments the user heads (incl.
                             sub-departments; if they head none, their own department), plus self
  salesperson              → {self}
  others (it_admin, auditor, a local account without crm_admin) → empty set
Roles add up: a salesperson who is also dept_head sees the department.
"""

from __future__ import annotations

from peewee import Expression, Field

from gateway.db.models import Department, Employee
from panel.web import User


def department_tree(root_ids: set[int]) -> set[int]:
    """``root_ids`` and every department below them."""
    children: dict[int | None, list[int]] = {}
    for dept in Department.select(Department.id, Department.parent):
        children.setdefault(dept.parent_id, []).append(dept.id)
    seen: set[int] = set()
    todo = list(root_ids)
    while todo:
        d = todo.pop()
        if d in seen:
            continue
        seen.add(d)
        todo.extend(children.get(d, ()))
    return seen


def headed_department_ids(user: User) -> set[int]:
    """Departments a dept_head answers for (with sub-departments)."""
    if user.employee_id is None or not user.has("dept_head"):
        return set()
    roots = {d.id for d in Department.select(Department.id).where(Department.head_id == user.employee_id)}
    if not roots and user.department_id is not None:
        roots = {user.department_id}
    return department_tree(roots)


def visible_employee_ids(user: User) -> set[int] | None:
    """Employee ids whose data ``user`` may see; None = all (see the module doc)."""
    if user.has("crm_admin"):
        return None
    ids: set[int] = set()
    if user.employee_id is not None and user.has("salesperson", "dept_head"):
        ids.add(user.employee_id)
    depts = headed_department_ids(user)
    if depts:
        ids |= {e.id for e in Employee.select(Employee.id).where(Employee.department.in_(depts))}
    return ids


def employee_filter(user: User, field: Field) -> Expression | bool:
    """A where-clause restricting ``field`` (an employee id column) to what ``user`` may see.

    ``query.where(employee_filter(user, Ownership.employee))``; True means no restriction.
    """
    ids = visible_employee_ids(user)
    if ids is None:
        return True
    if not ids:
        return field.is_null(True) & field.is_null(False)  # matches nothing, valid SQL everywhere
    return field.in_(sorted(ids))


def can_see_employee(user: User, employee_id: int) -> bool:
    ids = visible_employee_ids(user)
    return ids is None or employee_id in ids
