"""The operation log area (操作日记) against the real panel: every panel change and approval
decision listed, filterable by actor, action and date; it_admin, crm_admin and auditor
read it, salespeople and department heads get 403."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from gateway import oplog
from gateway.db.models import utcnow

pytestmark = pytest.mark.integration


def entry_ids(text: str) -> list[int]:
    return [int(x) for x in re.findall(r'data-entry="(\d+)"', text)]


@pytest.mark.parametrize("role", ["salesperson", "dept_head"])
def test_lower_roles_get_403(http_as, role):
    r = http_as(role).get("/oplog")
    assert r.status == 403 and 'id="oplog-table"' not in r.text


@pytest.mark.parametrize("role", ["it_admin", "crm_admin", "auditor"])
def test_readers_see_the_log(http_as, role):
    r = http_as(role).get("/oplog")
    assert r.status == 200 and 'id="oplog-table"' in r.text and "panel.signin" in r.text


def test_filters_by_actor_action_and_date(http_as, panel_db):
    marker = f"filter-test-{utcnow():%H%M%S%f}"
    a = oplog.record("zoe@acme.test", "customer.update", f"customer:{marker}", {"stage": {"old": "lead", "new": "won"}})
    b = oplog.record("local:crm", "customer.delete", f"customer:{marker}")
    c = oplog.record("zoe@acme.test", "approval.approve", f"approval:{marker}", {"reason": "<b>ok</b>"})

    client = http_as("auditor")
    ids = entry_ids(client.get(f"/oplog?target={marker}").text)
    assert ids == [c.id, b.id, a.id]  # newest first
    assert entry_ids(client.get(f"/oplog?target={marker}&actor=zoe@ACME.test").text) == [c.id, a.id]
    assert entry_ids(client.get(f"/oplog?target={marker}&action=customer.delete").text) == [b.id]
    # a prefix ending in "." selects the whole area
    assert entry_ids(client.get(f"/oplog?target={marker}&action=customer.").text) == [b.id, a.id]
    # inclusive dates (UTC days); the log is append-only, so the entries are all from today
    today = utcnow().date()
    day = dt.timedelta(days=1)
    assert entry_ids(client.get(f"/oplog?target={marker}&from={today}&to={today}").text) == [c.id, b.id, a.id]
    assert entry_ids(client.get(f"/oplog?target={marker}&from={today + day}").text) == []
    assert entry_ids(client.get(f"/oplog?target={marker}&to={today - day}").text) == []
    # details are shown, escaped
    page = client.get(f"/oplog?target=approval:{marker}").text
    assert "&lt;b&gt;ok&lt;/b&gt;" in page and "<b>ok</b>" not in page
    # a bad date is a clear 400, not a traceback
    r = client.get("/oplog?from=2025-13-45")
    assert r.status == 400 and "YYYY-MM-DD" in r.text


def test_panel_changes_show_up(http_as, panel_db):
    admin = http_as("it_admin")
    name = f"Oplog dept {utcnow():%H%M%S%f}"
    assert admin.post("/employees/departments/new", {"name": name, "parent": "", "head": ""}).status == 303
    page = admin.get("/oplog?action=department.create&actor=local:admin").text
    assert f"name: — → {name}" in page  # a change is shown as old → new


def test_integrity_check(http_as):
    r = http_as("it_admin").get("/oplog?verify=1")
    assert r.status == 200 and 'id="oplog-intact"' in r.text
