"""Customer import and tabular files: CSV/XLSX parsing, the template, column mapping,
duplicate handling and the per-row error report.  No bottle here: the customer area
calls it and translates the codes.

Steps (like the products our users know): upload a file (≤ MAX_BYTES, ≤ MAX_ROWS rows)
-> map its columns to fields (suggested from the header names) -> import.  Rows naming
a customer already created from this file add their contacts to it (one customer,
several contacts).  A duplicate of an existing customer, found by contact address or by
company domain, is skipped or overwritten (non-empty mapped cells replace the fields,
new contacts and domains are added).  Every row that is not imported is reported with
its reason; the report downloads as CSV or XLSX with the original cells.

Safety: files are bounded before parsing (XLSX: the zip's declared sizes are checked
first, so a zip bomb is refused unread); cells beginning with = + - @ are prefixed
with ' in every file we write (formula injection).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from gateway.customers import (
    CustomerError,
    merge_contacts_and_domains,
    new_customer,
    normalize_domain,
    normalize_email,
    update_customer,
)
from gateway.db.models import CompanyDomain, Contact, Customer, Employee, database

MAX_BYTES = 10 * 1024 * 1024
MAX_ROWS = 20_000
MAX_COLUMNS = 100
MAX_CELL = 5000
MAX_XLSX_UNPACKED = 200 * 1024 * 1024
MAX_XLSX_MEMBERS = 2000
BATCH = 200

FIELDS = ("name", "contact_email", "contact_name", "domain", "stage", "tags", "country", "region", "source",
          "notes", "owner")
REQUIRED = ("name",)

# Header names recognised without mapping by hand (lowercased, spaces and * removed).
ALIASES: dict[str, tuple[str, ...]] = {
    "name": ("name", "customer", "customername", "company", "companyname", "客户名称", "客户", "公司名称", "公司"),
    "contact_email": ("email", "e-mail", "contactemail", "contactaddress", "mail", "邮箱", "联系人邮箱", "电子邮件",
                      "邮件地址", "邮箱地址"),
    "contact_name": ("contact", "contactname", "联系人", "联系人姓名", "姓名", "联系人名称"),
    "domain": ("domain", "companydomain", "website", "域名", "公司域名", "网址", "官网"),
    "stage": ("stage", "customerstage", "客户阶段", "阶段"),
    "tags": ("tags", "tag", "标签", "客户标签"),
    "country": ("country", "国家", "国家/地区", "国家地区"),
    "region": ("region", "state", "city", "地区", "省份", "城市"),
    "source": ("source", "客户来源", "来源"),
    "notes": ("notes", "note", "remark", "remarks", "备注"),
    "owner": ("owner", "owneremail", "salesperson", "负责人", "负责人邮箱", "业务员", "业务员邮箱"),
}


class ImportFileError(ValueError):
    """The file cannot be read; ``code``/``params`` for the panel's message."""

    def __init__(self, code: str, message: str, **params: object):
        super().__init__(message)
        self.code = code
        self.params = params


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]  # rows[i] is file row i + 2 (row 1 holds the headers)

    def row_number(self, index: int) -> int:
        return index + 2


@dataclass
class RowError:
    row: int  # row number in the file
    code: str
    params: dict
    message: str  # English, for logs and tests
    skipped: bool = False  # a duplicate skipped on purpose (not a failure)


@dataclass
class Options:
    dedupe_by: str = "contact"  # "contact" | "domain"
    on_duplicate: str = "skip"  # "skip" | "overwrite"


@dataclass
class Result:
    created: int = 0
    updated: int = 0
    merged: int = 0  # rows that added a contact to a customer created from an earlier row
    skipped: int = 0
    failed: int = 0
    errors: list[RowError] = field(default_factory=list)
    customer_ids: list[int] = field(default_factory=list)


# -- reading --------------------------------------------------------------------------


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, dt.datetime):
        value = value.isoformat(sep=" ", timespec="seconds")
    text = str(value).replace("\x00", "").strip()
    return text[:MAX_CELL]


def read_table(data: bytes, filename: str) -> Table:
    """Parse an uploaded CSV or XLSX file into headers and rows (clear errors for bad files)."""
    if not data:
        raise ImportFileError("empty", "the file is empty")
    if len(data) > MAX_BYTES:
        raise ImportFileError("too_big", f"the file is larger than {MAX_BYTES // (1024 * 1024)} MB",
                              limit_mb=MAX_BYTES // (1024 * 1024))
    lower = filename.lower()
    if data[:4] == b"PK\x03\x04":
        raw = _read_xlsx(data)
    elif data[:8] == b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" or lower.endswith(".xls"):
        raise ImportFileError("xls", "old .xls files are not supported: save as .xlsx or .csv")
    elif lower.endswith(".xlsx"):
        raise ImportFileError("bad_xlsx", "this .xlsx file is damaged or not an Excel workbook")
    else:
        raw = _read_csv(data)
    rows = [r for r in raw if any(c for c in r)]
    if not rows:
        raise ImportFileError("no_rows", "the file has no rows")
    headers = rows[0]
    while headers and not headers[-1]:
        headers.pop()
    if not any(headers):
        raise ImportFileError("no_header", "the first row must hold the column names")
    if len(headers) > MAX_COLUMNS:
        raise ImportFileError("too_many_columns", f"more than {MAX_COLUMNS} columns", limit=MAX_COLUMNS)
    body = [(r + [""] * len(headers))[:len(headers)] for r in rows[1:]]
    if len(body) > MAX_ROWS:
        raise ImportFileError("too_many_rows", f"more than {MAX_ROWS} rows: split the file", limit=MAX_ROWS)
    if not body:
        raise ImportFileError("no_rows", "the file has no rows below the header")
    return Table([h or f"#{i + 1}" for i, h in enumerate(headers)], body)


def _read_csv(data: bytes) -> list[list[str]]:
    if b"\x00" in data[:4096]:
        raise ImportFileError("not_text", "this is not a CSV text file (save the sheet as CSV or XLSX)")
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            text = data.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    else:
        raise ImportFileError("encoding", "the file is neither UTF-8 nor GB18030 text")
    sample = text[:8192]
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    rows = []
    try:
        for row in csv.reader(io.StringIO(text, newline=""), dialect):
            rows.append([_cell(c) for c in row[:MAX_COLUMNS + 1]])
            if len(rows) > MAX_ROWS + 1:
                raise ImportFileError("too_many_rows", f"more than {MAX_ROWS} rows: split the file", limit=MAX_ROWS)
    except csv.Error as exc:
        raise ImportFileError("bad_csv", f"the CSV file cannot be read: {exc}", detail=str(exc)) from None
    return rows


def _read_xlsx(data: bytes) -> list[list[str]]:
    import openpyxl

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_XLSX_MEMBERS or sum(i.file_size for i in infos) > MAX_XLSX_UNPACKED:
                raise ImportFileError("too_big", "the workbook unpacks to more than allowed", limit_mb=MAX_BYTES >> 20)
            if "xl/workbook.xml" not in {i.filename for i in infos}:
                raise ImportFileError("bad_xlsx", "this .xlsx file is damaged or not an Excel workbook")
    except zipfile.BadZipFile:
        raise ImportFileError("bad_xlsx", "this .xlsx file is damaged or not an Excel workbook") from None
    try:
        wb = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises many kinds for broken files
        raise ImportFileError("bad_xlsx", f"this .xlsx file cannot be read ({type(exc).__name__})") from None
    try:
        ws = wb.worksheets[0]
        rows = []
        for values in ws.iter_rows(values_only=True):
            rows.append([_cell(v) for v in values[:MAX_COLUMNS + 1]])
            if len(rows) > MAX_ROWS + 1:
                raise ImportFileError("too_many_rows", f"more than {MAX_ROWS} rows: split the file", limit=MAX_ROWS)
        return rows
    finally:
        wb.close()


def _norm_header(text: str) -> str:
    return "".join(text.lower().replace("*", "").replace("（", "(").replace("）", ")").split())


def suggest_mapping(headers: Sequence[str], labels: dict[str, Iterable[str]] | None = None) -> dict[str, int | None]:
    """field -> column index for headers named like a field (or like its label in ``labels``)."""
    wanted: dict[str, str] = {}
    for name in FIELDS:
        for alias in (*ALIASES[name], name, *((labels or {}).get(name, ()))):
            wanted.setdefault(_norm_header(alias), name)
    mapping: dict[str, int | None] = dict.fromkeys(FIELDS)
    for index, header in enumerate(headers):
        name = wanted.get(_norm_header(header))
        if name and mapping[name] is None:
            mapping[name] = index
    return mapping


# -- writing ---------------------------------------------------------------------------


def safe_cell(value: object) -> str:
    """A cell for a file we hand out: text, with formula-looking text defused."""
    text = _cell(value) if not isinstance(value, str) else value
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def table_bytes(fmt: str, headers: Sequence[str], rows: Iterable[Sequence[object]], sheet: str = "Sheet1",
                extra_sheets: Sequence[tuple[str, Sequence[Sequence[str]]]] = ()) -> bytes:
    """A CSV (UTF-8 with BOM, for Excel) or XLSX file of ``rows``."""
    if fmt == "csv":
        out = io.StringIO(newline="")
        writer = csv.writer(out)
        writer.writerow([safe_cell(h) for h in headers])
        for row in rows:
            writer.writerow([safe_cell(c) for c in row])
        return out.getvalue().encode("utf-8-sig")
    if fmt != "xlsx":
        raise ValueError(f"unknown format {fmt!r}")
    import openpyxl

    wb = openpyxl.Workbook(write_only=True)
    ws = wb.create_sheet(sheet[:31])
    ws.append([safe_cell(h) for h in headers])
    for row in rows:
        ws.append([safe_cell(c) for c in row])
    for name, lines in extra_sheets:
        extra = wb.create_sheet(name[:31])
        for line in lines:
            extra.append([safe_cell(c) for c in line])
    out = io.BytesIO()
    wb.save(out)
    return out.getvalue()


def template_bytes(fmt: str, header_labels: dict[str, str], example: dict[str, str],
                   notes: Sequence[Sequence[str]] = ()) -> bytes:
    """The downloadable template: one header row (labels), one example row, notes sheet (XLSX)."""
    headers = [header_labels[f] for f in FIELDS]
    rows = [[example.get(f, "") for f in FIELDS]]
    return table_bytes(fmt, headers, rows, sheet="customers", extra_sheets=[("notes", notes)] if notes else ())


def error_report(fmt: str, table: Table, errors: Sequence[RowError], reason_header: str,
                 describe: Callable[[RowError], str]) -> bytes:
    """The rows that were not imported, their original cells and the reason."""
    headers = [reason_header, "#", *table.headers]
    rows = [[describe(e), str(e.row), *table.rows[e.row - 2]] for e in errors if 0 <= e.row - 2 < len(table.rows)]
    return table_bytes(fmt, headers, rows, sheet="errors")


# -- importing -------------------------------------------------------------------------


def _values(row: Sequence[str], mapping: dict[str, int | None]) -> dict[str, str]:
    return {name: (row[i] if i is not None and i < len(row) else "") for name, i in mapping.items()}


def _existing(values: dict[str, str], options: Options) -> Customer | None:
    if options.dedupe_by == "domain":
        if values["domain"]:
            row = CompanyDomain.get_or_none(CompanyDomain.domain == normalize_domain(values["domain"]))
            return row.customer if row else None
        return None
    if values["contact_email"]:
        row = Contact.get_or_none(Contact.email == normalize_email(values["contact_email"]))
        return row.customer if row else None
    return None


def run_import(
    table: Table,
    mapping: dict[str, int | None],
    options: Options,
    *,
    default_owner: Employee | None,
    resolve_owner: Callable[[str], Employee],
    can_overwrite: Callable[[Customer], bool],
    public_domains: Iterable[str],
    stage_aliases: dict[str, str] | None = None,
) -> Result:
    """Import every row; returns counts and one RowError per row not imported.

    ``resolve_owner(address)`` returns the employee for an owner cell or raises
    CustomerError (unknown, or not one the importer may assign); ``can_overwrite``
    says whether the importing user may change an existing customer.
    """
    if mapping.get("name") is None:
        raise ImportFileError("name_unmapped", "map a column to the customer name")
    if options.dedupe_by not in ("contact", "domain") or options.on_duplicate not in ("skip", "overwrite"):
        raise ValueError("bad import options")
    public = frozenset(d.lower() for d in public_domains)
    stages = {k.lower(): v for k, v in (stage_aliases or {}).items()}
    result = Result()
    in_file: dict[str, int] = {}  # customer key (domain or lowercased name) -> id created from this file
    for start in range(0, len(table.rows), BATCH):
        with database.atomic():
            for index in range(start, min(start + BATCH, len(table.rows))):
                row_no = table.row_number(index)
                values = _values(table.rows[index], mapping)
                try:
                    with database.atomic():
                        _import_row(values, options, result, in_file, default_owner, resolve_owner, can_overwrite,
                                    public, stages)
                except CustomerError as exc:
                    skipped = exc.code == "duplicate_skipped"
                    result.errors.append(RowError(row_no, exc.code, exc.params, str(exc), skipped))
                    if skipped:
                        result.skipped += 1
                    else:
                        result.failed += 1
    return result


def _import_row(values: dict[str, str], options: Options, result: Result, in_file: dict[str, int],
                default_owner: Employee | None, resolve_owner: Callable[[str], Employee],
                can_overwrite: Callable[[Customer], bool], public: frozenset[str], stages: dict[str, str]) -> None:
    name = " ".join(values["name"].split())
    if not name:
        raise CustomerError("name_required", "the customer name is required")
    contacts = [(values["contact_email"], values["contact_name"])] if values["contact_email"] else []
    if values["contact_name"] and not values["contact_email"]:
        raise CustomerError("contact_without_email", "a contact name needs the contact's e-mail address")
    domains = [values["domain"]] if values["domain"] else []
    fields: dict[str, object] = {}
    if values["stage"]:
        fields["stage"] = stages.get(values["stage"].lower(), values["stage"].lower())
    for key in ("tags", "country", "region", "source", "notes"):
        if values[key]:
            fields[key] = values[key]
    domain_key = normalize_domain(values["domain"]) if values["domain"] else ""
    key = domain_key or "name:" + name.lower()
    if key in in_file:  # another row of a customer created from this file: add its contact
        customer = Customer.get_by_id(in_file[key])
        merge_contacts_and_domains(customer, contacts, domains, public)
        result.merged += 1
        return
    existing = _existing(values, options)
    if existing is not None:
        if options.on_duplicate == "skip":
            raise CustomerError("duplicate_skipped", f"duplicate of customer {existing.name!r}: skipped",
                                customer=existing.name)
        if not can_overwrite(existing):
            raise CustomerError("duplicate_not_yours", f"duplicate of customer {existing.name!r}, "
                                "which you may not change", customer=existing.name)
        update_customer(existing, public_domains=public, name=name, **fields)
        merge_contacts_and_domains(existing, contacts, domains, public)
        result.updated += 1
        result.customer_ids.append(existing.id)
        return
    owner = resolve_owner(values["owner"]) if values["owner"] else default_owner
    customer = new_customer(name, contacts=contacts, domains=domains, owners=[owner] if owner else [],
                            public_domains=public, **fields)
    in_file[key] = customer.id
    if domain_key:
        in_file["name:" + name.lower()] = customer.id
    result.created += 1
    result.customer_ids.append(customer.id)
