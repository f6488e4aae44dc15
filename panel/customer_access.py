"""Who may see and change which customer (server-side checks for the customer and pool pages).

- salesperson: sees own customers and the public pool; creates customers (owned by
  self), edits and returns own customers, claims from the pool.
- dept_head: sees the department's customers (sub-departments included) and the pool;
  edits and deletes them; adds owners, transfers, hands over and assigns within the
  department.
- crm_admin: everything, and the pool settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.customers import owner_ids
from gateway.db.models import Employee
from panel.customer_query import Scope
from panel.scope import visible_employee_ids
from panel.web import User

CUSTOMER_ROLES = ("salesperson", "dept_head", "crm_admin")
MANAGER_ROLES = ("dept_head", "crm_admin")


@dataclass(frozen=True)
class Access:
    user: User
    visible: frozenset[int] | None  # employee ids; None: all

    @classmethod
    def of(cls, user: User) -> Access:
        ids = visible_employee_ids(user)
        return cls(user, None if ids is None else frozenset(ids))

    @property
    def admin(self) -> bool:
        return self.user.has("crm_admin")

    @property
    def head(self) -> bool:
        return self.user.has("dept_head")

    @property
    def scope(self) -> Scope:
        return Scope(self.visible, public_pool=True)

    def sees_employee(self, employee_id: int) -> bool:
        return self.visible is None or employee_id in self.visible

    def _in_scope(self, owners: set[int]) -> bool:
        return self.visible is None or bool(owners & self.visible)

    def can_view(self, customer_id: int, pool: str) -> bool:
        return self.admin or pool == "public" or self._in_scope(owner_ids(customer_id))

    def can_edit(self, customer_id: int, pool: str) -> bool:
        """Fields, contacts, domains, tags, stage, return to the pool."""
        if self.admin:
            return True
        if pool == "public":
            return False
        owners = owner_ids(customer_id)
        if self.head and self._in_scope(owners):
            return True
        return self.user.employee_id is not None and self.user.employee_id in owners

    def can_manage(self, customer_id: int, pool: str) -> bool:
        """Delete, add owners, transfer (department heads within the department, administrators)."""
        if self.admin:
            return True
        if not self.head:
            return False
        return pool == "public" or self._in_scope(owner_ids(customer_id))

    def can_assign_to(self, employee: Employee) -> bool:
        """Whether a new owner (assign, transfer, add owner, hand over) may be ``employee``."""
        if not employee.active or not ({"salesperson", "dept_head", "crm_admin"} & employee.role_set):
            return False
        return self.admin or (self.head and self.sees_employee(employee.id))

    def assignable(self) -> list[Employee]:
        """Employees this user may pick as a new owner."""
        if not (self.admin or self.head):
            return []
        query = Employee.select().where(Employee.active == True).order_by(Employee.name)  # noqa: E712
        if self.visible is not None:
            query = query.where(Employee.id.in_(sorted(self.visible) or [0]))
        return [e for e in query if {"salesperson", "dept_head", "crm_admin"} & e.role_set]
