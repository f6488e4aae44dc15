"""The public pool (公海客户): customers without an owner, visible to every salesperson.

  claim (认领)   a salesperson (or a department head) takes a pool customer as their own
  assign (分配)  a department head (to the department's people) or a CRM administrator
  sweep now      a CRM administrator applies the automatic return rules at once
Returning a customer to the pool by hand is on the customer page (/customers/<id>/release).
The automatic return rules are the ``[panel] pool_*`` config keys (shown here, read-only).
"""

from __future__ import annotations

from urllib.parse import urlencode

import bottle

from gateway import customers as cw
from gateway.customers import STAGES, CustomerError
from gateway.db.models import Customer, Employee
from panel import (
    customer_texts,  # noqa: F401 - registers the texts
    pool,
)
from panel.areas.customers import error_text, stage_label
from panel.customer_access import CUSTOMER_ROLES, MANAGER_ROLES, Access
from panel.customer_query import CustomerFilter, countries
from panel.customer_query import page as list_page
from panel.web import (
    current_user,
    flash,
    forbidden,
    form_value,
    int_arg,
    not_found,
    oplog,
    panel_config,
    redirect,
    render,
    require,
    t,
)

NAV = [("/pool", "nav.pool", CUSTOMER_ROLES)]


def routes(app: bottle.Bottle) -> None:
    @app.get("/pool")
    @require(*CUSTOMER_ROLES)
    def index() -> str:
        access = Access.of(current_user())
        params = dict(bottle.request.query.decode())
        params["pool"] = "public"
        f = CustomerFilter.from_params(params)
        result = list_page(access.scope, f, panel_config().panel.page_size)
        last_at, last_n = pool.last_sweep()
        return render("pool/index.html", f=f, result=result, access=access, stages=STAGES,
                      stage_label=stage_label, countries=countries(access.scope),
                      assignable=access.assignable(), can_claim=_can_claim(access),
                      rules=pool.PoolRules.from_config(panel_config().panel), last_at=last_at, last_n=last_n,
                      link=lambda **changes: "/pool?" + urlencode(f.params(pool="owned", **changes)))

    @app.post("/pool/<cid:int>/claim")
    @require("salesperson", "dept_head")
    def claim(cid: int) -> None:
        access = Access.of(current_user())
        customer = Customer.get_or_none(Customer.id == cid)
        if customer is None:
            not_found()
        if not _can_claim(access):
            forbidden()
        employee = Employee.get_by_id(access.user.employee_id)
        try:
            cw.claim(customer, employee)
        except CustomerError as exc:
            flash(error_text(exc))
            redirect("/pool")
        oplog("pool.claim", f"customer:{cid}", {"owner": employee.email})
        flash(t("pool.claimed", name=customer.name))
        redirect(_back(f"/customers/{cid}"))

    @app.post("/pool/<cid:int>/assign")
    @require(*MANAGER_ROLES)
    def assign(cid: int) -> None:
        access = Access.of(current_user())
        customer = Customer.get_or_none(Customer.id == cid)
        if customer is None:
            not_found()
        employee = Employee.get_or_none(Employee.id == int_arg(form_value("employee", max_length=20), 0))
        if employee is None or not access.can_assign_to(employee):
            forbidden(t("cust.bad_employee"))
        try:
            cw.claim(customer, employee)
        except CustomerError as exc:
            flash(error_text(exc))
            redirect("/pool")
        oplog("pool.assign", f"customer:{cid}", {"owner": employee.email})
        flash(t("pool.assigned", name=customer.name, to=employee.name))
        redirect(_back("/pool"))

    @app.post("/pool/sweep")
    @require("crm_admin")
    def sweep_now() -> None:
        rules = pool.PoolRules.from_config(panel_config().panel)
        n = pool.sweep(rules) if rules.active else 0
        oplog("pool.sweep", "pool", {"returned": n, "active": rules.active})
        flash(t("pool.settings.swept", n=n))
        redirect("/pool")


def _can_claim(access: Access) -> bool:
    return access.user.employee_id is not None and access.user.has("salesperson", "dept_head")


def _back(default: str) -> str:
    """Where to go after an action: the form's ``next`` if it is a local pool/customer page."""
    target = form_value("next", max_length=500)
    if target.startswith(("/pool", "/customers")) and "//" not in target and "\\" not in target:
        return target
    return default
