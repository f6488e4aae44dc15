"""Customer import (panel/importer.py): reading CSV/XLSX safely, mapping, duplicates, error rows."""

from __future__ import annotations

import io
import zipfile

import openpyxl
import pytest

from gateway.config import PUBLIC_MAIL_DOMAINS
from gateway.customers import CustomerError, create_department, create_employee, new_customer
from gateway.db.models import Customer
from panel import importer
from panel.importer import ImportFileError, Options, Table, read_table, run_import, suggest_mapping


def xlsx(rows: list[list[object]]) -> bytes:
    wb = openpyxl.Workbook()
    for row in rows:
        wb.active.append(row)
    out = io.BytesIO()
    wb.save(out)
    return out.getvalue()


def test_read_csv_utf8_gbk_and_semicolons() -> None:
    table = read_table("客户名称,邮箱\nA公司,a@a.example\n".encode("gb18030"), "x.csv")
    assert table.headers == ["客户名称", "邮箱"] and table.rows == [["A公司", "a@a.example"]]
    table = read_table("\ufeffname;email\nB;b@b.example\n\n".encode(), "x.csv")
    assert table.rows == [["B", "b@b.example"]]


def test_read_xlsx_numbers_and_short_rows() -> None:
    table = read_table(xlsx([["name", "zip", "note"], ["A", 20095.0], ["B", 1, "x"]]), "x.xlsx")
    assert table.rows == [["A", "20095", ""], ["B", "1", "x"]]
    assert table.row_number(0) == 2


@pytest.mark.parametrize(("data", "name", "code"), [
    (b"", "x.csv", "empty"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 50, "x.xls", "xls"),
    (b"PK\x03\x04nonsense", "x.xlsx", "bad_xlsx"),
    (b"name\n", "x.csv", "no_rows"),
    (b"a\x00b", "x.csv", "not_text"),
])
def test_bad_files(data: bytes, name: str, code: str) -> None:
    with pytest.raises(ImportFileError) as exc:
        read_table(data, name)
    assert exc.value.code == code


def test_zip_bomb_refused_unread() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("xl/workbook.xml", "<x/>")
        zf.writestr("xl/big.xml", b"\0" * (importer.MAX_XLSX_UNPACKED + 1))
    with pytest.raises(ImportFileError) as exc:
        read_table(out.getvalue(), "bomb.xlsx")
    assert exc.value.code == "too_big"


def test_too_many_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importer, "MAX_ROWS", 3)
    with pytest.raises(ImportFileError) as exc:
        read_table(b"name\n" + b"x\n" * 10, "x.csv")
    assert exc.value.code == "too_many_rows"


def test_suggest_mapping_by_alias_and_label() -> None:
    mapping = suggest_mapping(["公司名称", "E-Mail", "联系人", "Webseite", "Tags"], {"domain": ["Webseite"]})
    assert (mapping["name"], mapping["contact_email"], mapping["contact_name"], mapping["domain"],
            mapping["tags"]) == (0, 1, 2, 3, 4)
    assert mapping["owner"] is None


def test_safe_cells_defuse_formulas() -> None:
    data = importer.table_bytes("csv", ["h"], [["=1+1"], ["+x"], ["-y"], ["@z"], ["ok"]])
    assert data.decode("utf-8-sig").splitlines() == ["h", "'=1+1", "'+x", "'-y", "'@z", "ok"]
    wb = openpyxl.load_workbook(io.BytesIO(importer.table_bytes("xlsx", ["h"], [["=HYPERLINK(\"x\")"]])))
    assert wb.active["A2"].value == "'=HYPERLINK(\"x\")" and wb.active["A2"].data_type == "s"


@pytest.fixture
def owner(db):
    return create_employee("a@acme.test", "A", create_department("Sales"))


def _run(rows: list[list[str]], options: Options, owner, allowed: bool = True):  # noqa: ANN001, ANN202
    table = Table(["name", "email", "domain", "stage", "owner"], rows)
    mapping = {f: None for f in importer.FIELDS} | {"name": 0, "contact_email": 1, "domain": 2, "stage": 3,
                                                     "owner": 4}

    def resolve(address: str):  # noqa: ANN202
        if address == owner.email:
            return owner
        raise CustomerError("owner_unknown", "no", value=address)

    return run_import(table, mapping, options, default_owner=owner, resolve_owner=resolve,
                      can_overwrite=lambda c: allowed, public_domains=PUBLIC_MAIL_DOMAINS,
                      stage_aliases={"已报价": "quoted"})


def test_import_rows_merge_skip_and_errors(owner) -> None:
    new_customer("Existing", contacts=["old@exist.example"], domains=["exist.example"], owners=[owner],
                 public_domains=PUBLIC_MAIL_DOMAINS)
    result = _run([
        ["New One", "a@new.example", "new.example", "已报价", ""],
        ["New One", "b@new.example", "new.example", "", ""],  # same customer, second contact
        ["Existing again", "old@exist.example", "", "", ""],  # duplicate by contact: skipped
        ["Public", "p@qq.com", "qq.com", "", ""],  # public domain
        ["Owner?", "o@o.example", "", "", "nobody@acme.test"],  # unknown owner
        ["Stage?", "s@s.example", "", "bogus", ""],
    ], Options("contact", "skip"), owner)
    assert (result.created, result.merged, result.skipped, result.failed) == (1, 1, 1, 3)
    codes = {e.row: e.code for e in result.errors}
    assert codes == {4: "duplicate_skipped", 5: "public_domain", 6: "owner_unknown", 7: "bad_stage"}
    new = Customer.get(Customer.name == "New One")
    assert new.stage == "quoted" and sorted(c.email for c in new.contacts) == ["a@new.example", "b@new.example"]
    assert not Customer.select().where(Customer.name.in_(["Public", "Owner?", "Stage?"])).exists()


def test_import_overwrite_by_domain_and_permission(owner) -> None:
    c = new_customer("Dom", contacts=["x@dom.example"], domains=["dom.example"], owners=[owner],
                     public_domains=PUBLIC_MAIL_DOMAINS)
    refused = _run([["Dom New", "y@dom.example", "DOM.example", "won", ""]], Options("domain", "overwrite"), owner,
                   allowed=False)
    assert refused.failed == 1 and refused.errors[0].code == "duplicate_not_yours"
    result = _run([["Dom New", "y@dom.example", "DOM.example", "won", ""]], Options("domain", "overwrite"), owner)
    assert result.updated == 1 and result.customer_ids == [c.id]
    row = Customer.get_by_id(c.id)
    assert (row.name, row.stage) == ("Dom New", "won")
    assert sorted(x.email for x in row.contacts) == ["x@dom.example", "y@dom.example"]


def test_error_report_keeps_original_cells(owner) -> None:
    table = Table(["name", "email", "domain", "stage", "owner"], [["", "e@x.example", "", "", ""]])
    result = _run(table.rows, Options(), owner)
    data = importer.error_report("csv", table, result.errors, "reason", lambda e: e.code)
    lines = data.decode("utf-8-sig").splitlines()
    assert lines[0] == "reason,#,name,email,domain,stage,owner"
    assert lines[1] == "name_required,2,,e@x.example,,,"
