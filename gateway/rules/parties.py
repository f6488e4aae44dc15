"""Who an approver or notice recipient is: ``manager``, ``department_head``,
``role:NAME``, ``employee:ADDRESS`` (or a bare address), and ``sender``.

``check_party`` validates a spec when rules load; ``resolve_parties`` turns
specs into addresses for one sender (blocking: it may read the DB for
department heads and roles — call it from a worker thread).
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.directory import Directory, EmployeeInfo

KEYWORDS = ("manager", "department_head", "sender")


def check_party(spec: object, allow_sender: bool = False) -> str:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{spec!r}: expected manager, department_head, role:NAME or an employee address")
    spec = spec.strip()
    if spec in ("manager", "department_head") or (allow_sender and spec == "sender"):
        return spec
    if spec.startswith("role:") and spec[5:].strip():
        return spec
    address = spec.removeprefix("employee:").strip()
    if "@" in address and " " not in address:
        return spec
    raise ValueError(f"{spec!r}: expected manager, department_head, role:NAME or an employee address")


def resolve_parties(
    specs: Iterable[str], sender: EmployeeInfo | None, directory: Directory
) -> tuple[list[EmployeeInfo | str], list[str]]:
    """(resolved employees or plain addresses, problems) — de-duplicated, in order."""
    out: dict[str, EmployeeInfo | str] = {}
    problems: list[str] = []

    def add(emp: EmployeeInfo | None, what: str) -> None:
        if emp is None or not emp.active:
            problems.append(f"{what}: nobody (or inactive)")
        else:
            out.setdefault(emp.email, emp)

    for spec in specs:
        if spec == "sender":
            add(sender, "sender")
        elif spec == "manager":
            add(directory.employee(sender.manager_id) if sender and sender.manager_id else None, "manager")
        elif spec == "department_head":
            add(_department_head(sender, directory), "department_head")
        elif spec.startswith("role:"):
            found = _with_role(spec[5:].strip(), directory)
            if not found:
                problems.append(f"{spec}: no active employee has this role")
            for emp in found:
                add(emp, spec)
        else:
            address = spec.removeprefix("employee:").strip().lower()
            emp = directory.employee_for_address(address)
            if emp is not None:
                out.setdefault(emp.email, emp)
            else:
                out.setdefault(address, address)
    return list(out.values()), problems


def _department_head(sender: EmployeeInfo | None, directory: Directory) -> EmployeeInfo | None:
    if sender is None or sender.department_id is None:
        return None
    from gateway.db.models import Department

    dept = Department.get_or_none(Department.id == sender.department_id)
    # Walk up the tree: a sub-department without a head answers to its parent's head.
    while dept is not None:
        if dept.head_id and dept.head_id != sender.id:
            return directory.employee(dept.head_id)
        dept = Department.get_or_none(Department.id == dept.parent_id) if dept.parent_id else None
    return None


def _with_role(role: str, directory: Directory) -> list[EmployeeInfo]:
    from gateway.db.models import Employee

    rows = Employee.select(Employee.id).where(Employee.roles.contains(role), Employee.active == True)  # noqa: E712
    found = [directory.employee(eid) for (eid,) in rows.tuples()]
    return [e for e in found if e is not None and role in e.roles]
