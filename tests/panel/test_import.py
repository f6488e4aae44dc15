"""Customer import over real HTTP: template, XLSX upload, column mapping, duplicates
(skip / overwrite, by contact or domain), the per-row error report, roles and CSRF."""

from __future__ import annotations

import io
import re
import urllib.error
import urllib.request
import uuid
from urllib.parse import urlsplit

import openpyxl
import pytest

from tests.panel.conftest import PanelClient, Response
from tests.panel.test_customers import uid

pytestmark = pytest.mark.usefixtures("panel_server")


def upload(client: PanelClient, filename: str, data: bytes, csrf: bool = True) -> Response:
    boundary = "----mg" + uuid.uuid4().hex
    parts = []
    if csrf:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="csrf_token"\r\n\r\n{client.csrf}\r\n'
                     .encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(client.base_url + "/customers/import", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with client._plain.open(req, timeout=30) as resp:
            return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()},
                            resp.read().decode("utf-8", "replace"), resp.url)
    except urllib.error.HTTPError as exc:
        return Response(exc.code, {k.lower(): v for k, v in exc.headers.items()},
                        exc.read().decode("utf-8", "replace"), exc.url)


def download(client: PanelClient, path: str) -> tuple[int, bytes]:
    req = urllib.request.Request(client.base_url + path)
    try:
        with client._plain.open(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def xlsx(rows: list[list[str]]) -> bytes:
    wb = openpyxl.Workbook()
    for row in rows:
        wb.active.append(row)
    out = io.BytesIO()
    wb.save(out)
    return out.getvalue()


def test_template_downloads(http_as) -> None:
    client = http_as("salesperson")
    status, data = download(client, "/customers/import/template.xlsx")
    assert status == 200
    headers = [c.value for c in next(openpyxl.load_workbook(io.BytesIO(data)).active.iter_rows(max_row=1))]
    assert headers[0] == "客户名称*" and "联系人邮箱" in headers and "公司域名" in headers
    status, data = download(client, "/customers/import/template.csv")
    assert status == 200 and data.decode("utf-8-sig").startswith("客户名称*,")
    assert download(http_as("auditor"), "/customers/import/template.xlsx")[0] == 403


def test_import_xlsx_with_duplicates_and_error_report(http_as, panel_db) -> None:
    from gateway.db.models import AuditLog, Contact, Customer

    tag = uid()
    rows = [
        ["Company", "E-mail", "Contact person", "Website", "阶段", "Tags"],
        [f"Izmir Makina {tag}", f"ali@izmir-{tag}.com.tr", "Ali", f"izmir-{tag}.com.tr", "已报价", "oem"],
        [f"Izmir Makina {tag}", f"veli@izmir-{tag}.com.tr", "Veli", f"izmir-{tag}.com.tr", "", ""],  # 2nd contact
        ["Hamburg Tools GmbH (again)", "einkauf@hamburg-tools.de", "", "", "", ""],  # duplicate: skipped
        [f"Gmail Co {tag}", f"x{tag}@gmail.com", "", "gmail.com", "", ""],  # public domain refused
        ["", f"noname@{tag}.example", "", "", "", ""],  # name missing
        [f"Bad mail {tag}", "not-an-address", "", "", "", ""],
    ]
    alice = http_as("salesperson")
    assert upload(alice, "customers.xlsx", xlsx(rows), csrf=False).status == 403
    resp = upload(alice, "customers.xlsx", xlsx(rows))
    assert resp.status == 303, resp.text[:500]
    job_path = urlsplit(resp.header("location")).path
    assert re.match(r"^/customers/import/[\w-]+$", job_path)
    page = alice.get(job_path)
    # the mapping form suggests columns from the header names
    assert re.search(r'name="map_name">.*?<option value="0" selected>', page.text, re.S)
    assert re.search(r'name="map_domain">.*?<option value="3" selected>', page.text, re.S)
    # another user cannot see or run this job
    assert http_as("dept_head").get(job_path).status == 404
    mapping = {"map_name": "0", "map_contact_email": "1", "map_contact_name": "2", "map_domain": "3",
               "map_stage": "4", "map_tags": "5", "dedupe_by": "contact", "on_duplicate": "skip"}
    resp = alice.post(job_path, mapping)
    assert resp.status == 303
    result = alice.get(job_path).text
    assert "新建 1 个客户" in result and "追加联系人 1 行" in result and "跳过重复 1 行" in result
    assert "失败 3 行" in result
    izmir = Customer.get(Customer.name == f"Izmir Makina {tag}")
    assert izmir.stage == "quoted" and izmir.tags == "oem"
    assert sorted(c.email for c in izmir.contacts) == [f"ali@izmir-{tag}.com.tr", f"veli@izmir-{tag}.com.tr"]
    assert [o.employee.email for o in izmir.ownerships] == ["alice@acme.test"]
    assert Contact.get(Contact.email == "einkauf@hamburg-tools.de").customer.name == "Hamburg Tools GmbH"
    assert not Customer.select().where(Customer.name == f"Gmail Co {tag}").exists()
    assert AuditLog.select().where(AuditLog.action == "customer.import").exists()
    # the per-row error report: original cells and the reason, per failed or skipped row
    status, data = download(alice, job_path + "/report.xlsx")
    assert status == 200
    report = list(openpyxl.load_workbook(io.BytesIO(data)).active.iter_rows(values_only=True))
    assert report[0][:3] == ("错误原因", "#", "Company")
    by_row = {int(r[1]): r for r in report[1:]}
    assert set(by_row) == {4, 5, 6, 7}
    assert "重复" in by_row[4][0]
    assert "gmail.com 是公共邮箱域名" in by_row[5][0]
    assert "客户名称" in by_row[6][0]
    assert "not-an-address" in by_row[7][0] and by_row[7][3] == "not-an-address"
    status, data = download(alice, job_path + "/report.csv")
    assert status == 200 and "not-an-address" in data.decode("utf-8-sig")
    # run twice: refused (the job is done), nothing imported again
    alice.post(job_path, mapping)
    assert Customer.select().where(Customer.name == f"Izmir Makina {tag}").count() == 1


def test_import_overwrite_by_domain(http_as, panel_db) -> None:
    from gateway.db.models import Customer

    tag = uid()
    admin = http_as("crm_admin")
    rows = [["客户名称", "公司域名", "国家", "标签"], [f"Pune Steel {tag}", f"pune-{tag}.in", "IN", "a"]]
    job = urlsplit(upload(admin, "a.xlsx", xlsx(rows)).header("location")).path
    assert admin.post(job, {"map_name": "0", "map_domain": "1", "map_country": "2", "map_tags": "3",
                            "owner": "pool"}).status == 303
    c = Customer.get(Customer.name == f"Pune Steel {tag}")
    assert c.pool == "public"
    rows = [["客户名称", "公司域名", "国家", "标签"], [f"Pune Steel Ltd {tag}", f"PUNE-{tag}.in", "", "b"]]
    job = urlsplit(upload(admin, "b.xlsx", xlsx(rows)).header("location")).path
    admin.post(job, {"map_name": "0", "map_domain": "1", "map_country": "2", "map_tags": "3",
                     "dedupe_by": "domain", "on_duplicate": "overwrite"})
    assert "更新 1 个" in admin.get(job).text
    c = Customer.get_by_id(c.id)
    assert (c.name, c.country, c.tags) == (f"Pune Steel Ltd {tag}", "IN", "b")  # empty cells keep the field


def test_bad_files_are_refused_clearly(http_as) -> None:
    client = http_as("salesperson")
    resp = upload(client, "old.xls", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 100)
    assert resp.status == 400 and "不支持旧版 .xls" in resp.text
    resp = upload(client, "broken.xlsx", b"PK\x03\x04garbage")
    assert resp.status == 400 and "无法读取这个 Excel 文件" in resp.text
    resp = upload(client, "empty.csv", b"")
    assert resp.status == 400
