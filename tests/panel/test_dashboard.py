"""The dashboard against the real panel: mail sent and received per person, blocked
sends, pending approvals, customers without contact for N days, charts as server-drawn
SVG; scoped per role (self / department / everyone); it_admin and auditor get 403."""

from __future__ import annotations

import datetime as dt
import itertools
import re

import pytest

from gateway.customers import create_customer
from gateway.db.models import Approval, ArchiveRecord, Employee, utcnow

pytestmark = pytest.mark.integration

SEQ = itertools.count()


def archive(emp: Employee, when: dt.datetime, direction: str = "outbound", verdict: str = "accepted",
            subject: str = "s", reason: str = "") -> ArchiveRecord:
    return ArchiveRecord.create(created_at=when, direction=direction, sha256=f"dash{next(SEQ):060x}",
                                blob_path="x", size=1, employee=emp, verdict=verdict, subject=subject,
                                reason=reason, mail_from=emp.email, recipients='["x@example.com"]')


def person_row(text: str, emp: Employee) -> dict[str, int] | None:
    row = re.search(rf'<tr data-employee="{emp.id}">(.*?)</tr>', text, re.S)
    if row is None:
        return None
    return {k: int(v) for k, v in re.findall(r'class="(sent|received|blocked|held)">(\d+)<', row.group(1))}


@pytest.fixture(scope="module")
def traffic(panel_server):
    """Mail for a dedicated employee in Carol's department (exact counts: other tests may add mail
    for Alice and Bob), for Alice, and for a stranger outside Carol's department; once per module."""
    from gateway.customers import create_department, create_employee
    from gateway.db import connect

    db = connect(panel_server.db_url, migrate=False)
    alice = Employee.get(Employee.email == "alice@acme.test")
    bob = Employee.get(Employee.email == "bob@acme.test")
    counted = create_employee("dash.counted@acme.test", "Dash Counted", alice.department, manager=alice.manager)
    other = create_department("Dashboard elsewhere")
    stranger = create_employee("dash.stranger@acme.test", "Dash Stranger", other)
    now = utcnow() - dt.timedelta(minutes=5)
    for _ in range(4):
        archive(counted, now)
    archive(counted, now - dt.timedelta(days=2))
    for _ in range(2):
        archive(counted, now, direction="inbound")
    archive(counted, now, verdict="refused", subject="to Bob's customer <b>x</b>", reason="send-conflict")
    archive(counted, now - dt.timedelta(days=40))  # outside every window but 90 days
    archive(alice, now)
    archive(bob, now)
    archive(stranger, now)
    archive(stranger, now, verdict="refused", subject="stranger's blocked send")
    stale = create_customer("Dashboard Stale GmbH", domains=["dash-stale.de"], owners=[alice])
    stale.last_contact_at = now - dt.timedelta(days=45)
    stale.created_at = now - dt.timedelta(days=400)
    stale.save()
    pending = Approval.create(queue_id="dash-pending-1", employee=stranger, mail_from=stranger.email,
                              state="pending", expires_at=now + dt.timedelta(days=1))
    yield {"counted": counted, "alice": alice, "bob": bob, "stranger": stranger, "stale": stale, "pending": pending}
    db.close()


@pytest.mark.parametrize("role", ["it_admin", "auditor"])
def test_other_roles_get_403(http_as, role):
    r = http_as(role).get("/dashboard")
    assert r.status == 403 and "chart-days" not in r.text


def test_crm_admin_sees_everyone(http_as, traffic, panel_db):
    page = http_as("crm_admin").get("/dashboard").text
    assert person_row(page, traffic["counted"]) == {"sent": 5, "received": 2, "blocked": 1, "held": 0}
    assert person_row(page, traffic["bob"])["sent"] >= 1
    assert person_row(page, traffic["stranger"]) == {"sent": 1, "received": 0, "blocked": 1, "held": 0}
    assert "Dashboard Stale GmbH" in page  # 45 days > 30
    assert "stranger&#39;s blocked send" in page or "stranger&#x27;s blocked send" in page
    assert "to Bob&#39;s customer &lt;b&gt;x&lt;/b&gt;" in page  # escaped
    assert "x@example.com" in page and "[&#34;x@example.com" not in page  # recipients as text, not JSON
    pending = int(re.search(r'id="stat-pending"[^>]*><span class="num">(\d+)<', page).group(1))
    assert pending >= 1
    # 90 days include the 40-day-old message
    assert person_row(http_as("crm_admin").get("/dashboard?days=90").text, traffic["counted"])["sent"] == 6
    # N = 60: the 45-day-old contact is not stale any more
    assert "Dashboard Stale GmbH" not in http_as("crm_admin").get("/dashboard?stale=60").text


def test_charts_are_svg_without_inline_script_or_style(http_as, traffic):
    r = http_as("crm_admin").get("/dashboard?days=7")
    page = r.text
    chart = re.search(r'<svg class="chart" id="chart-days".*?</svg>', page, re.S).group(0)
    bars = re.findall(r'<rect class="bar (sent|received|blocked)" x="[\d.]+" y="[\d.]+" width="[\d.]+" '
                      r'height="([\d.]+)"', chart)
    assert len(bars) == 7 * 3
    assert any(float(h) > 0 for series, h in bars if series == "sent")
    assert "chart-people" in page
    assert "<script" not in page and "style=" not in page and "<style" not in page
    assert "script-src 'self'" in r.header("content-security-policy")


def test_salesperson_sees_only_herself(http_as, traffic):
    page = http_as("salesperson").get("/dashboard").text
    assert person_row(page, traffic["alice"])["sent"] >= 1
    assert person_row(page, traffic["counted"]) is None
    assert person_row(page, traffic["bob"]) is None and person_row(page, traffic["stranger"]) is None
    assert "stranger&#39;s blocked send" not in page and "stranger&#x27;s blocked send" not in page
    assert "我自己" in page


def test_dept_head_sees_the_department(http_as, traffic):
    page = http_as("dept_head").get("/dashboard").text
    assert person_row(page, traffic["counted"])["sent"] == 5 and person_row(page, traffic["bob"]) is not None
    assert person_row(page, traffic["stranger"]) is None
    assert "Dashboard Stale GmbH" in page and "本部门" in page


def test_phone_width_renders(page_as, traffic):
    page = page_as("dept_head", 390, 844)
    page.goto(page.url.rstrip("/") + "/dashboard")
    assert page.locator("#chart-days rect.bar").count() == 14 * 3
    # the chart keeps a readable size and scrolls sideways inside its box
    box = page.locator("#chart-days").bounding_box()
    wrap = page.locator(".chart-wrap").first.bounding_box()
    assert box is not None and box["width"] >= 600 and wrap is not None and wrap["width"] <= 390
    # no horizontal scrolling of the whole page at phone width
    assert page.evaluate("document.documentElement.scrollWidth") <= 390 + 1
