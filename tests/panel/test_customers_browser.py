"""Customers and the public pool in a real browser (Debian's Chromium via Playwright):
create, edit, import an XLSX, transfer, claim, and an XSS attempt rendered inert."""

from __future__ import annotations

import io

import openpyxl
import pytest

from tests.panel.test_customers import make_customer, uid

pytestmark = pytest.mark.usefixtures("panel_server")

XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'


def test_create_edit_and_xss_inert(page_as, panel_url: str, panel_db) -> None:
    tag = uid()
    name = f"XSS {tag} {XSS}"
    page = page_as("salesperson")
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(panel_url + "/customers")
    page.click("a[href='/customers/new']")
    page.fill("input[name=name]", name)
    page.fill("textarea[name=contacts]", f"anna@xss-{tag}.example, Anna")
    page.fill("textarea[name=domains]", f"xss-{tag}.example")
    page.fill("input[name=tags]", "vip")
    page.click("#customer-form button[type=submit]")
    page.wait_for_url("**/customers/*")
    assert page.inner_text("#customer-title") == name  # shown as text
    assert page.locator("#customer-title img, #customer-title script").count() == 0
    assert page.evaluate("window.__xss") is None
    # the list shows it too, still inert
    page.goto(panel_url + f"/customers?q={tag}")
    assert page.inner_text("#customers a.customer-name") == name
    assert page.evaluate("window.__xss") is None and dialogs == []
    # edit: stage and a public domain refused with the reason, then a valid save
    page.click("#customers a.customer-name")
    page.click("a.button.primary:has-text('编辑')")
    page.fill("textarea[name=domains]", "qq.com")
    page.click("#customer-form button[type=submit]")
    assert "qq.com 是公共邮箱域名" in page.inner_text("#form-error")
    page.fill("textarea[name=domains]", f"xss-{tag}.example")
    page.select_option("select[name=stage]", "won")
    page.click("#customer-form button[type=submit]")
    page.wait_for_url("**/customers/*")
    assert page.inner_text("#customer-stage") == "已成交"
    assert page.evaluate("window.__xss") is None


def test_import_xlsx(page_as, panel_url: str, panel_db) -> None:
    from gateway.db.models import Customer

    tag = uid()
    wb = openpyxl.Workbook()
    for row in (["客户名称", "联系人邮箱", "公司域名", "国家"],
                [f"Recife Trading {tag}", f"compras@recife-{tag}.br", f"recife-{tag}.br", "BR"],
                [f"Recife Trading {tag}", f"diretor@recife-{tag}.br", f"recife-{tag}.br", "BR"],
                ["", "nobody@x.example", "", ""]):
        wb.active.append(row)
    data = io.BytesIO()
    wb.save(data)
    page = page_as("salesperson")
    page.goto(panel_url + "/customers")
    page.click("a[href='/customers/import']")
    page.set_input_files("input[name=file]", files=[{"name": "import.xlsx", "buffer": data.getvalue(),
                                                     "mimeType": "application/octet-stream"}])
    page.click("#import-upload button[type=submit]")
    page.wait_for_selector("#import-map")
    assert page.locator("select[name=map_name] option:checked").inner_text() == "客户名称"
    page.click("#import-map button[type=submit]")
    summary = page.inner_text("#import-summary")
    assert "新建 1 个客户" in summary and "失败 1 行" in summary
    assert "请填写客户名称" in page.inner_text("#import-errors")
    with page.expect_download() as info:
        page.click("a:has-text('下载错误报告（Excel）')")
    assert info.value.suggested_filename.endswith(".xlsx")
    report = openpyxl.load_workbook(io.BytesIO(info.value.path().read_bytes()))
    assert [r[1] for r in report.active.iter_rows(min_row=2, values_only=True)] == ["4"]
    c = Customer.get(Customer.name == f"Recife Trading {tag}")
    assert c.contacts.count() == 2 and c.country == "BR"


def test_transfer_by_dept_head(page_as, panel_url: str, panel_db) -> None:
    c = make_customer(f"Browser transfer {uid()}", ("alice@acme.test",))
    page = page_as("dept_head")
    page.goto(panel_url + f"/customers/{c.id}")
    page.select_option("#transfer select[name=employee]", label="Bob Li 李波 <bob@acme.test>")
    page.click("#transfer button[type=submit]")
    page.wait_for_selector(".flash")
    owners = page.inner_text("#owners")
    assert "bob@acme.test" in owners and "alice@acme.test" not in owners


def test_claim_from_pool(page_as, panel_url: str, panel_db) -> None:
    c = make_customer(f"Browser claim {uid()}")
    page = page_as("salesperson")
    page.click("nav a[href='/pool']")
    page.fill("#customer-filters input[name=q]", c.name)
    page.click("#customer-filters button[type=submit]")
    row = page.locator("#pool tr", has_text=c.name)
    row.locator("button:has-text('认领')").click()
    page.wait_for_url(f"**/customers/{c.id}")
    assert "alice@acme.test" in page.inner_text("#owners")
    assert "已认领客户" in page.inner_text(".flash")
