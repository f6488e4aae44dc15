"""Customers (客户管理): list (search, filters, sort, pages), create, edit, delete,
contacts and company domains, owners (add, remove, transfer 转移, hand over 移交),
tags and stage; import (CSV/XLSX, mapping, duplicates, error report) and export.

Who may do what (panel.customer_access, checked on the server for every request):
  salesperson  own customers and the public pool; creates (owned by self or into the
               pool), edits and returns own customers to the pool; imports as owner
  dept_head    the department's customers: edit, delete, owners, transfer, hand over
  crm_admin    every customer
Every change goes to the operation log; contact/domain/owner writes go through
gateway.customers, which records the directory change feed (gateway nodes reload).
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from typing import Any
from urllib.parse import urlencode

import bottle

from gateway import customers as cw
from gateway.customers import STAGES, CustomerError
from gateway.db.models import Customer, Employee, utcnow
from panel import (
    customer_texts,  # noqa: F401 - registers the texts
    importer,
)
from panel.customer_access import CUSTOMER_ROLES, MANAGER_ROLES, Access
from panel.customer_query import MAX_OFFSET, CustomerFilter, countries, iter_rows
from panel.customer_query import page as list_page
from panel.customer_schema import ImportJob
from panel.web import (
    User,
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

NAV = [("/customers", "nav.customers", CUSTOMER_ROLES)]
EXPORT_LIMIT = 100_000
IMPORT_JOB_HOURS = 24


# -- helpers -------------------------------------------------------------------------

def error_text(exc: CustomerError) -> str:
    key = "cust.err." + exc.code
    text = t(key, **{k: str(v) for k, v in exc.params.items()})
    return str(exc) if text == key else text


def stage_label(stage: str) -> str:
    return t("cust.stage." + stage)


def public_domains() -> frozenset[str]:
    return panel_config().public_mail_domains


def _customer(cid: int) -> Customer:
    customer = Customer.get_or_none(Customer.id == cid)
    if customer is None:
        not_found()
    return customer


def _viewable(cid: int) -> tuple[Customer, Access]:
    customer = _customer(cid)
    access = Access.of(current_user())
    if not access.can_view(customer.id, customer.pool):
        forbidden()
    return customer, access


def _employee(value: str, access: Access) -> Employee | None:
    emp = Employee.get_or_none(Employee.id == int_arg(value, 0))
    if emp is None or not access.can_assign_to(emp):
        return None
    return emp


def parse_contacts(text: str) -> list[tuple[str, str]]:
    """Textarea lines "address, name" (or "Name <address>") -> [(address, name)]."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if "<" in line and line.endswith(">"):
            name, _, address = line[:-1].rpartition("<")
            out.append((address.strip(), name.strip().strip('"').strip()))
            continue
        address, _, name = line.replace("，", ",").replace("\t", ",").partition(",")
        out.append((address.strip(), name.strip()))
    return out


def _form_fields() -> dict[str, Any]:
    return {
        "name": form_value("name", max_length=1000),
        "stage": form_value("stage", "lead", 50),
        "tags": form_value("tags", max_length=2000),
        "country": form_value("country", max_length=200),
        "region": form_value("region", max_length=200),
        "source": form_value("source", max_length=200),
        "notes": form_value("notes", max_length=10000),
    }


def _contacts_text(customer: Customer) -> str:
    return "\n".join(f"{c.email}, {c.name}" if c.name else c.email
                     for c in customer.contacts.order_by(cw.Contact.id))


def _domains_text(customer: Customer) -> str:
    return "\n".join(d.domain for d in customer.domains.order_by(cw.CompanyDomain.id))


def _stage_aliases() -> dict[str, str]:
    """Stage cells may hold the key or its label in either language."""
    from panel.i18n import translate

    out = {}
    for stage in STAGES:
        for lang in ("zh-CN", "en"):
            out[translate("cust.stage." + stage, lang).lower()] = stage
        out[stage] = stage
    return out


def _job_owner(user: User) -> str:
    return f"{user.kind}:{user.id}"


def _job(token: str) -> ImportJob:
    job = ImportJob.get_or_none(ImportJob.token == token)
    if job is None or job.owner != _job_owner(current_user()):
        not_found(t("imp.gone"))
    return job


def _download(data: bytes, filename: str, fmt: str) -> bytes:
    bottle.response.content_type = ("text/csv; charset=utf-8" if fmt == "csv" else
                                    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet")
    bottle.response.set_header("Content-Disposition", f'attachment; filename="{filename}"')
    bottle.response.set_header("Cache-Control", "no-store")
    return data


def _field_labels() -> dict[str, str]:
    return {f: t("imp.field." + f) for f in importer.FIELDS}


# -- routes ----------------------------------------------------------------------------

def routes(app: bottle.Bottle) -> None:  # noqa: C901 - one closure per route
    @app.get("/customers")
    @require(*CUSTOMER_ROLES)
    def index() -> str:
        access = Access.of(current_user())
        f = CustomerFilter.from_params(bottle.request.query.decode())
        result = list_page(access.scope, f, panel_config().panel.page_size)
        owners = (access.assignable() if (access.admin or access.head) else [])
        return render("customers/index.html", f=f, result=result, access=access, stages=STAGES,
                      stage_label=stage_label, countries=countries(access.scope), owners=owners,
                      link=lambda **changes: "/customers?" + urlencode(f.params(**changes)),
                      export=lambda fmt: f"/customers/export.{fmt}?" + urlencode(f.params(page=1)),
                      max_offset=MAX_OFFSET)

    # -- create / edit / delete --

    def _owner_choices(access: Access) -> list[Employee]:
        return access.assignable() if (access.admin or access.head) else []

    @app.get("/customers/new")
    @require(*CUSTOMER_ROLES)
    def new_form() -> str:
        access = Access.of(current_user())
        return render("customers/edit.html", customer=None, values={"stage": "lead"}, contacts="", domains="",
                      error="", stages=STAGES, stage_label=stage_label, owners=_owner_choices(access),
                      access=access, owner_choice="self" if access.user.employee_id else "pool")

    @app.post("/customers/new")
    @require(*CUSTOMER_ROLES)
    def create() -> str:
        user = current_user()
        access = Access.of(user)
        values = _form_fields()
        contacts_text = form_value("contacts", max_length=100_000)
        domains_text = form_value("domains", max_length=20_000)
        choice = form_value("owner", "self", 20)
        owners: list[Employee] = []
        if choice == "self" and user.employee_id is not None:
            owners = [Employee.get_by_id(user.employee_id)]
        elif choice not in ("pool", "self"):
            emp = _employee(choice, access)
            if emp is None:
                forbidden(t("cust.bad_employee"))
            owners = [emp]
        try:
            customer = cw.new_customer(values.pop("name"), contacts=parse_contacts(contacts_text),
                                       domains=domains_text.split(), owners=owners,
                                       public_domains=public_domains(), **values)
        except CustomerError as exc:
            bottle.response.status = 400
            return render("customers/edit.html", customer=None, values=_form_fields(), contacts=contacts_text,
                          domains=domains_text, error=error_text(exc), stages=STAGES, stage_label=stage_label,
                          owners=_owner_choices(access), access=access, owner_choice=choice)
        oplog("customer.create", f"customer:{customer.id}",
              {"name": customer.name, "owners": [e.email for e in owners], "pool": customer.pool})
        flash(t("cust.created"))
        redirect(f"/customers/{customer.id}")

    @app.get("/customers/<cid:int>")
    @require(*CUSTOMER_ROLES)
    def detail(cid: int) -> str:
        customer, access = _viewable(cid)
        owners = list(Employee.select().join(cw.Ownership).where(cw.Ownership.customer == customer)
                      .order_by(Employee.name))
        return render("customers/detail.html", c=customer, owners=owners, stage_label=stage_label,
                      contacts=list(customer.contacts.order_by(cw.Contact.id)),
                      domains=list(customer.domains.order_by(cw.CompanyDomain.id)),
                      can_edit=access.can_edit(customer.id, customer.pool),
                      can_manage=access.can_manage(customer.id, customer.pool),
                      can_claim=customer.pool == "public" and access.user.employee_id is not None
                      and access.user.has("salesperson", "dept_head"),
                      assignable=_owner_choices(access), tags=[x for x in customer.tags.split(",") if x])

    @app.get("/customers/<cid:int>/edit")
    @require(*CUSTOMER_ROLES)
    def edit_form(cid: int) -> str:
        customer, access = _viewable(cid)
        if not access.can_edit(customer.id, customer.pool):
            forbidden()
        values = {k: getattr(customer, k) for k in ("name", "stage", "tags", "country", "region", "source", "notes")}
        return render("customers/edit.html", customer=customer, values=values, contacts=_contacts_text(customer),
                      domains=_domains_text(customer), error="", stages=STAGES, stage_label=stage_label,
                      owners=[], access=access, owner_choice="")

    @app.post("/customers/<cid:int>/edit")
    @require(*CUSTOMER_ROLES)
    def update(cid: int) -> str:
        customer, access = _viewable(cid)
        if not access.can_edit(customer.id, customer.pool):
            forbidden()
        values = _form_fields()
        contacts_text = form_value("contacts", max_length=100_000)
        domains_text = form_value("domains", max_length=20_000)
        before = {k: getattr(customer, k) for k in values}
        before_contacts, before_domains = _contacts_text(customer), _domains_text(customer)
        try:
            updated = cw.update_customer(customer, contacts=parse_contacts(contacts_text),
                                         domains=domains_text.split(), public_domains=public_domains(), **values)
        except CustomerError as exc:
            bottle.response.status = 400
            return render("customers/edit.html", customer=customer, values=values, contacts=contacts_text,
                          domains=domains_text, error=error_text(exc), stages=STAGES, stage_label=stage_label,
                          owners=[], access=access, owner_choice="")
        changes = {k: [before[k], getattr(updated, k)] for k in values if before[k] != getattr(updated, k)}
        if _contacts_text(updated) != before_contacts:
            changes["contacts"] = [before_contacts.splitlines(), _contacts_text(updated).splitlines()]
        if _domains_text(updated) != before_domains:
            changes["domains"] = [before_domains.split(), _domains_text(updated).split()]
        if changes:
            oplog("customer.update", f"customer:{cid}", changes)
        flash(t("cust.updated"))
        redirect(f"/customers/{cid}")

    @app.post("/customers/<cid:int>/delete")
    @require(*MANAGER_ROLES)
    def delete(cid: int) -> None:
        customer, access = _viewable(cid)
        if not access.can_manage(customer.id, customer.pool):
            forbidden()
        details = {"name": customer.name, "contacts": [c.email for c in customer.contacts],
                   "domains": [d.domain for d in customer.domains]}
        cw.delete_customer(customer)
        oplog("customer.delete", f"customer:{cid}", details)
        flash(t("cust.deleted"))
        redirect("/customers")

    # -- owners --

    @app.post("/customers/<cid:int>/owners")
    @require(*MANAGER_ROLES)
    def add_owner(cid: int) -> None:
        customer, access = _viewable(cid)
        emp = _employee(form_value("employee", max_length=20), access)
        if not access.can_manage(customer.id, customer.pool) or emp is None:
            forbidden(t("cust.bad_employee"))
        if cw.add_owner(customer, emp):
            oplog("customer.owner_add", f"customer:{cid}", {"owner": emp.email})
        flash(t("cust.owner_added"))
        redirect(f"/customers/{cid}")

    @app.post("/customers/<cid:int>/owners/<eid:int>/remove")
    @require(*MANAGER_ROLES)
    def remove_owner(cid: int, eid: int) -> None:
        customer, access = _viewable(cid)
        if not access.can_manage(customer.id, customer.pool):
            forbidden()
        emp = Employee.get_or_none(Employee.id == eid)
        if emp is not None and cw.remove_owner(customer, emp, reason=f"owner {emp.email} removed"):
            oplog("customer.owner_remove", f"customer:{cid}", {"owner": emp.email})
        flash(t("cust.owner_removed"))
        redirect(f"/customers/{cid}")

    @app.post("/customers/<cid:int>/transfer")
    @require(*MANAGER_ROLES)
    def transfer(cid: int) -> None:
        customer, access = _viewable(cid)
        emp = _employee(form_value("employee", max_length=20), access)
        if not access.can_manage(customer.id, customer.pool) or emp is None:
            forbidden(t("cust.bad_employee"))
        before = cw.transfer(customer, emp)
        names = {e.id: e.email for e in Employee.select().where(Employee.id.in_(sorted(before) or [0]))}
        oplog("customer.transfer", f"customer:{cid}", {"from": sorted(names.values()), "to": emp.email})
        flash(t("cust.transferred", name=emp.name))
        redirect(f"/customers/{cid}")

    @app.post("/customers/<cid:int>/release")
    @require(*CUSTOMER_ROLES)
    def release(cid: int) -> None:
        customer, access = _viewable(cid)
        if customer.pool == "public" or not access.can_edit(customer.id, customer.pool):
            forbidden()
        before = sorted(cw.owner_ids(customer))
        cw.release(customer, "returned by " + access.user.actor)
        oplog("pool.release", f"customer:{cid}", {"owners": before})
        flash(t("cust.released"))
        redirect(f"/customers/{cid}")

    @app.get("/customers/handover")
    @require(*MANAGER_ROLES)
    def handover_form() -> str:
        access = Access.of(current_user())
        leaving = [e for e in Employee.select().order_by(Employee.name) if access.sees_employee(e.id)]
        chosen = bottle.request.query.get("from", "")  # from an employee's page
        return render("customers/handover.html", leaving=leaving, takers=access.assignable(), error="",
                      chosen=int(chosen) if chosen.isdigit() else None)

    @app.post("/customers/handover")
    @require(*MANAGER_ROLES)
    def handover() -> None:
        access = Access.of(current_user())
        leaving = Employee.get_or_none(Employee.id == int_arg(form_value("from", max_length=20), 0))
        to = _employee(form_value("to", max_length=20), access)
        if leaving is None or to is None or not access.sees_employee(leaving.id):
            forbidden(t("cust.bad_employee"))
        try:
            ids = cw.handover(leaving, to)
        except CustomerError as exc:
            flash(error_text(exc))
            redirect("/customers/handover")
        oplog("customer.handover", f"employee:{leaving.id}",
              {"from": leaving.email, "to": to.email, "customers": ids[:1000], "count": len(ids)})
        flash(t("cust.handover.done", n=len(ids), from_name=leaving.name, to_name=to.name))
        redirect(f"/customers?owner={to.id}")

    # -- export --

    @app.get("/customers/export.<fmt:re:csv|xlsx>")
    @require(*CUSTOMER_ROLES)
    def export(fmt: str) -> bytes:
        access = Access.of(current_user())
        f = CustomerFilter.from_params(bottle.request.query.decode())
        headers = [t("cust.col.name"), t("imp.field.contact_email"), t("imp.field.contact_name"),
                   t("cust.col.domains"), t("cust.col.owners"), t("cust.col.stage"), t("cust.col.tags"),
                   t("cust.col.country"), t("cust.col.last_contact"), t("cust.col.pool"), t("cust.col.created")]
        rows = []
        for r in iter_rows(access.scope, f, EXPORT_LIMIT):
            rows.append([r.name, "\n".join(e for e, _ in r.contacts), "\n".join(n for _, n in r.contacts),
                         "\n".join(r.domains), "\n".join(n for _, n in r.owners), stage_label(r.stage),
                         ",".join(r.tags), r.country,
                         r.last_contact_at.strftime("%Y-%m-%d %H:%M") if r.last_contact_at else "",
                         t("cust.pool." + r.pool), r.created_at.strftime("%Y-%m-%d")])
        oplog("customer.export", "customers", {"format": fmt, "filters": f.params(page=1), "rows": len(rows)})
        data = importer.table_bytes(fmt, headers, rows, sheet="customers")
        return _download(data, f"customers-{utcnow():%Y%m%d-%H%M}.{fmt}", fmt)

    # -- import --

    @app.get("/customers/import")
    @require(*CUSTOMER_ROLES)
    def import_form() -> str:
        return render("customers/import.html", error="", mb=importer.MAX_BYTES >> 20, rows=importer.MAX_ROWS)

    @app.get("/customers/import/template.<fmt:re:csv|xlsx>")
    @require(*CUSTOMER_ROLES)
    def import_template(fmt: str) -> bytes:
        example = {"name": "Hamburg Tools GmbH", "contact_email": "anna@hamburg-tools.example",
                   "contact_name": "Anna Schmidt", "domain": "hamburg-tools.example", "stage": stage_label("lead"),
                   "tags": "vip,fair-2025", "country": "DE", "region": "Hamburg", "source": "Canton Fair",
                   "notes": "", "owner": ""}
        notes = [[t("imp.notes.stages"), ", ".join(stage_label(s) for s in STAGES)],
                 [t("imp.notes.tags"), ""], [t("imp.notes.owner"), ""]]
        data = importer.template_bytes(fmt, _field_labels(), example, notes)
        return _download(data, f"customer-import-template.{fmt}", fmt)

    @app.post("/customers/import")
    @require(*CUSTOMER_ROLES)
    def import_upload() -> str:
        user = current_user()
        upload = bottle.request.files.get("file")
        if upload is None or not upload.raw_filename:
            bottle.response.status = 400
            return render("customers/import.html", error=t("imp.err.no_file"), mb=importer.MAX_BYTES >> 20,
                          rows=importer.MAX_ROWS)
        data = upload.file.read(importer.MAX_BYTES + 1)
        filename = (upload.raw_filename or "upload")[-200:]
        try:
            importer.read_table(data, filename)
        except importer.ImportFileError as exc:
            bottle.response.status = 400
            return render("customers/import.html", error=t("imp.err." + exc.code, **exc.params),
                          mb=importer.MAX_BYTES >> 20, rows=importer.MAX_ROWS)
        ImportJob.delete().where(ImportJob.created_at < utcnow() - dt.timedelta(hours=IMPORT_JOB_HOURS)).execute()
        token = secrets.token_urlsafe(24)
        ImportJob.create(token=token, owner=_job_owner(user), filename=filename, content=data)
        redirect(f"/customers/import/{token}")

    def _mapping_page(job: ImportJob, error: str = "", status: int = 200) -> str:
        table = importer.read_table(bytes(job.content), job.filename)
        access = Access.of(current_user())
        mapping = importer.suggest_mapping(table.headers, {f: [t("imp.field." + f)] for f in importer.FIELDS})
        bottle.response.status = status
        return render("customers/import_map.html", job=job, table=table, mapping=mapping, fields=importer.FIELDS,
                      labels=_field_labels(), preview=table.rows[:5], error=error,
                      owners=_owner_choices(access), access=access)

    @app.get("/customers/import/<token>")
    @require(*CUSTOMER_ROLES)
    def import_mapping(token: str) -> str:
        job = _job(token)
        if job.state == "done":
            return _result_page(job)
        return _mapping_page(job)

    @app.post("/customers/import/<token>")
    @require(*CUSTOMER_ROLES)
    def import_run(token: str) -> str:
        user = current_user()
        access = Access.of(user)
        job = _job(token)
        if job.state == "done":
            redirect(f"/customers/import/{token}")
        table = importer.read_table(bytes(job.content), job.filename)
        mapping: dict[str, int | None] = {}
        for name in importer.FIELDS:
            raw = form_value("map_" + name, max_length=10)
            index = int_arg(raw, -1)
            mapping[name] = index if 0 <= index < len(table.headers) else None
        options = importer.Options(
            dedupe_by="domain" if form_value("dedupe_by", max_length=10) == "domain" else "contact",
            on_duplicate="overwrite" if form_value("on_duplicate", max_length=10) == "overwrite" else "skip")
        choice = form_value("owner", "self", 20)
        default_owner: Employee | None = None
        if access.admin or access.head:
            if choice == "self" and user.employee_id is not None:
                default_owner = Employee.get_by_id(user.employee_id)
            elif choice not in ("self", "pool"):
                default_owner = _employee(choice, access)
                if default_owner is None:
                    forbidden(t("cust.bad_employee"))
        elif user.employee_id is not None:
            default_owner = Employee.get_by_id(user.employee_id)  # a salesperson imports own customers

        def resolve_owner(address: str) -> Employee:
            emp = Employee.get_or_none(Employee.email == address.strip().lower())
            if emp is None or not (access.can_assign_to(emp) or emp.id == user.employee_id):
                raise CustomerError("owner_unknown", f"owner {address!r} unknown or not assignable", value=address)
            return emp

        try:
            result = importer.run_import(
                table, mapping, options, default_owner=default_owner, resolve_owner=resolve_owner,
                can_overwrite=lambda c: access.can_edit(c.id, c.pool), public_domains=public_domains(),
                stage_aliases=_stage_aliases())
        except importer.ImportFileError as exc:
            return _mapping_page(job, t("imp.err." + exc.code, **exc.params), 400)
        summary = {"created": result.created, "updated": result.updated, "merged": result.merged,
                   "skipped": result.skipped, "failed": result.failed, "dedupe_by": options.dedupe_by,
                   "on_duplicate": options.on_duplicate}
        job.state = "done"
        job.result = json.dumps(summary)
        job.errors = json.dumps([[e.row, e.code, e.params, e.message] for e in result.errors])
        job.save()
        oplog("customer.import", f"import:{job.id}",
              {**summary, "file": job.filename, "customers": result.customer_ids[:1000]})
        redirect(f"/customers/import/{token}")

    def _row_errors(job: ImportJob) -> list[importer.RowError]:
        return [importer.RowError(row, code, params, message, code == "duplicate_skipped")
                for row, code, params, message in json.loads(job.errors or "[]")]

    def _describe(error: importer.RowError) -> str:
        return error_text(CustomerError(error.code, error.message, **error.params))

    def _result_page(job: ImportJob) -> str:
        errors = _row_errors(job)
        return render("customers/import_result.html", job=job, summary=json.loads(job.result or "{}"),
                      errors=errors[:500], more=max(0, len(errors) - 500), describe=_describe)

    @app.get("/customers/import/<token>/report.<fmt:re:csv|xlsx>")
    @require(*CUSTOMER_ROLES)
    def import_report(token: str, fmt: str) -> bytes:
        job = _job(token)
        table = importer.read_table(bytes(job.content), job.filename)
        data = importer.error_report(fmt, table, _row_errors(job), t("imp.reason"), _describe)
        return _download(data, f"import-errors-{job.id}.{fmt}", fmt)
