"""The customer list's query: scope, search, filters, sorting, pages (shared by list and export).

Built to stay fast at 100k customers / 300k contacts on SQLite and PostgreSQL:

- search is a substring match over ``customer.search_text`` (name, tags, contact addresses
  and names, domains, lowercased; kept by ``gateway.customers.changed``) instead of joins,
  through a trigram index (SQLite FTS5 / PostgreSQL pg_trgm, migration 352) for 3+
  characters; shorter text scans;
- the user's scope is written per pool so a salesperson's list starts from their
  ownership rows;
- every sort is (column, id) and has an index paired with ``pool`` (the default filter);
- pages are offset pages, bounded: past ``MAX_OFFSET`` rows the user narrows the filters;
- the total is counted up to ``COUNT_CAP`` rows only ("more than 1000" beyond).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

from peewee import OP, SQL, Expression, NodeList, Select, Value

from gateway.customers import STAGES
from gateway.db import is_postgres
from gateway.db.models import CompanyDomain, Contact, Customer, Employee, Ownership, database
from panel.customer_schema import FTS_TABLE

COUNT_CAP = 1_000
MANY_HITS = 2_000
MAX_OFFSET = 10_000
MAX_QUERY = 100
POOLS = ("owned", "public", "all")

# sort key -> column (id breaks ties)
SORTS = {
    "updated": Customer.updated_at,
    "created": Customer.created_at,
    "name": Customer.name,
    "last_contact": Customer.last_contact_at,
}


@dataclass(frozen=True)
class Scope:
    """Which customers a user may see.

    ``employee_ids`` None: every customer.  Otherwise customers owned by one of these
    employees, plus the public pool when ``public_pool``.
    """

    employee_ids: frozenset[int] | None
    public_pool: bool = True


@dataclass(frozen=True)
class CustomerFilter:
    q: str = ""
    owner: int | None = None
    stage: str = ""
    tag: str = ""
    country: str = ""
    pool: str = "owned"
    sort: str = "updated"
    desc: bool = True
    page: int = 1

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> CustomerFilter:
        """Tolerant parsing of query-string values: anything odd falls back to the default."""
        def get(key: str) -> str:
            return " ".join(str(params.get(key, "") or "").split())

        owner = get("owner")
        page = get("page")
        pool = get("pool")
        sort = get("sort")
        stage = get("stage")
        return cls(
            q=get("q")[:MAX_QUERY],
            owner=int(owner) if owner.isdigit() and len(owner) < 12 else None,
            stage=stage if stage in STAGES else "",
            tag=get("tag")[:40],
            country=get("country")[:100],
            pool=pool if pool in POOLS else "owned",
            sort=sort if sort in SORTS else "updated",
            desc=get("dir") != "asc",
            page=max(1, int(page)) if page.isdigit() and len(page) < 9 else 1,
        )

    def params(self, **changes: object) -> dict[str, str]:
        """Query-string values (non-default ones) for links, with ``changes`` applied."""
        f = replace(self, **changes) if changes else self
        out = {"q": f.q, "stage": f.stage, "tag": f.tag, "country": f.country,
               "owner": str(f.owner) if f.owner else "", "pool": f.pool if f.pool != "owned" else "",
               "sort": f.sort if f.sort != "updated" else "", "dir": "" if f.desc else "asc",
               "page": str(f.page) if f.page > 1 else ""}
        return {k: v for k, v in out.items() if v}


@dataclass
class CustomerRow:
    id: int
    name: str
    stage: str
    tags: list[str]
    country: str
    pool: str
    last_contact_at: dt.datetime | None
    updated_at: dt.datetime
    created_at: dt.datetime
    owners: list[tuple[int, str]] = field(default_factory=list)
    contacts: list[tuple[str, str]] = field(default_factory=list)
    contact_count: int = 0
    domains: list[str] = field(default_factory=list)


@dataclass
class Page:
    rows: list[CustomerRow]
    page: int
    page_size: int
    total: int  # counted up to COUNT_CAP
    total_capped: bool  # True: there are more than ``total``
    has_next: bool
    too_deep: bool  # the page asked for is past MAX_OFFSET

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.page_size))


def _like(column, text: str):
    """``column LIKE '%text%'`` with the wildcards in ``text`` escaped."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return NodeList((column, SQL("LIKE"), f"%{escaped}%", SQL("ESCAPE '\\'")))


def _scope_condition(scope: Scope, pool: str = "all"):
    """Which rows ``scope`` may see, written per pool so that SQLite's planner starts from the
    user's ownership rows (a few hundred) instead of walking every owned customer."""
    if scope.employee_ids is None:
        return None
    owned = Customer.id.in_(
        Ownership.select(Ownership.customer).where(Ownership.employee.in_(sorted(scope.employee_ids) or [0]))
    )
    if pool == "owned" or not scope.public_pool:
        return owned
    if pool == "public":
        return None  # the pool condition itself; everyone with a scope sees the public pool
    return owned | Expression(_unindexed(Customer.pool), OP.EQ, "public")


def _unindexed(column):
    """``+column``: SQLite then does not drive the query by this column's indexes (the plan
    must not depend on ANALYZE having run); elsewhere the same value."""
    return column if is_postgres() else NodeList((SQL("+"), column), glue="")


_FTS_CACHE: dict[tuple[int, str], bool] = {}


def _has_fts() -> bool:
    """Whether this SQLite database has the trigram index of panel.customer_schema (migration 352)."""
    if is_postgres():
        return False
    db = database.obj
    key = (id(db), str(getattr(db, "database", "")))
    if key not in _FTS_CACHE:
        _FTS_CACHE[key] = db.table_exists(FTS_TABLE)
    return _FTS_CACHE[key]


def _contains(text: str):
    """search_text contains ``text``: through the trigram index when there is one (3+ characters)."""
    like = _like(Customer.search_text, text)
    if len(text) >= 3 and _has_fts():
        phrase = '"' + text.replace('"', '""') + '"'
        hits = SQL(f"(SELECT rowid FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH ?)", [phrase])
        # Few hits: fetch them by id and sort them.  Many: walk the sort order's index and
        # test membership ("+id" keeps SQLite from driving by the hits and sorting them all).
        many = database.execute_sql(
            f"SELECT COUNT(*) FROM (SELECT rowid FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH ? LIMIT ?)",
            (phrase, MANY_HITS)).fetchone()[0] >= MANY_HITS
        column = _unindexed(Customer.id) if many else Customer.id
        return Expression(column, OP.IN, hits) & like
    return like


def base_query(scope: Scope, f: CustomerFilter, *columns) -> Select:
    """Customers visible in ``scope`` matching ``f`` (no order, no limit)."""
    query = Customer.select(*(columns or (Customer.id,)))
    conditions = []
    visible = _scope_condition(scope, f.pool)
    if visible is not None:
        conditions.append(visible)
    if f.pool != "all":
        # a salesperson's or head's own customers: start from their ownership rows, not the pool index
        column = _unindexed(Customer.pool) if visible is not None and f.pool == "owned" else Customer.pool
        conditions.append(Expression(column, OP.EQ, f.pool))
    if f.q:
        conditions.append(_contains(" ".join(f.q.lower().split())))
    if f.stage:
        conditions.append(Customer.stage == f.stage)
    if f.country:
        conditions.append(Customer.country == f.country)
    if f.tag:
        tag = f.tag.replace(",", "")
        exact = _like(Value(",").concat(Customer.tags).concat(","), f",{tag},")
        conditions.append(_contains(" ".join(tag.lower().split())) & exact if len(tag) >= 3 else exact)
    if f.owner is not None:
        conditions.append(Customer.id.in_(Ownership.select(Ownership.customer).where(Ownership.employee == f.owner)))
    for condition in conditions:
        query = query.where(condition)
    return query


def ordered(query: Select, f: CustomerFilter) -> Select:
    column = SORTS[f.sort]
    if f.desc:
        first = column.desc(nulls="LAST") if is_postgres() and f.sort == "last_contact" else column.desc()
        return query.order_by(first, Customer.id.desc())
    first = column.asc(nulls="LAST") if f.sort == "last_contact" else column.asc()
    return query.order_by(first, Customer.id.asc())


def count(scope: Scope, f: CustomerFilter, cap: int = COUNT_CAP) -> tuple[int, bool]:
    """How many match, counting at most ``cap + 1`` rows: (count, more_than_cap)."""
    inner = base_query(scope, f).limit(cap + 1)
    n = Customer.select(SQL("COUNT(*)")).from_(inner.alias("matching")).scalar()
    return (cap, True) if n > cap else (n, False)


def page(scope: Scope, f: CustomerFilter, page_size: int = 50) -> Page:
    offset = (f.page - 1) * page_size
    total, capped = count(scope, f)
    if offset > MAX_OFFSET:
        return Page([], f.page, page_size, total, capped, False, True)
    cols = (Customer.id, Customer.name, Customer.stage, Customer.tags, Customer.country, Customer.pool,
            Customer.last_contact_at, Customer.updated_at, Customer.created_at)
    query = ordered(base_query(scope, f, *cols), f).limit(page_size + 1).offset(offset)
    rows = [CustomerRow(r[0], r[1], r[2], _tags(r[3]), r[4], r[5], r[6], r[7], r[8]) for r in query.tuples()]
    has_next = len(rows) > page_size
    rows = rows[:page_size]
    decorate(rows)
    return Page(rows, f.page, page_size, total, capped, has_next, False)


def _tags(text: str) -> list[str]:
    return [t for t in (text or "").split(",") if t]


def decorate(rows: list[CustomerRow], contacts_per_row: int = 3) -> None:
    """Owners, the first contacts and the domains of a page of rows (three small queries)."""
    by_id = {r.id: r for r in rows}
    if not by_id:
        return
    ids = sorted(by_id)
    owners = (Ownership.select(Ownership.customer, Employee.id, Employee.name).join(Employee)
              .where(Ownership.customer.in_(ids)).order_by(Ownership.customer, Employee.name).tuples())
    for cid, eid, name in owners:
        by_id[cid].owners.append((eid, name))
    contacts = (Contact.select(Contact.customer, Contact.email, Contact.name)
                .where(Contact.customer.in_(ids)).order_by(Contact.customer, Contact.id).tuples())
    for cid, email, name in contacts:
        row = by_id[cid]
        row.contact_count += 1
        if len(row.contacts) < contacts_per_row:
            row.contacts.append((email, name))
    domains = (CompanyDomain.select(CompanyDomain.customer, CompanyDomain.domain)
               .where(CompanyDomain.customer.in_(ids)).order_by(CompanyDomain.customer, CompanyDomain.id).tuples())
    for cid, domain in domains:
        by_id[cid].domains.append(domain)


def iter_rows(scope: Scope, f: CustomerFilter, limit: int, batch: int = 500) -> Iterator[CustomerRow]:
    """Every matching row in list order, up to ``limit``, decorated in batches (for export)."""
    cols = (Customer.id, Customer.name, Customer.stage, Customer.tags, Customer.country, Customer.pool,
            Customer.last_contact_at, Customer.updated_at, Customer.created_at)
    query = ordered(base_query(scope, f, *cols), f).limit(limit)
    pending: list[CustomerRow] = []
    for r in query.tuples().iterator():
        pending.append(CustomerRow(r[0], r[1], r[2], _tags(r[3]), r[4], r[5], r[6], r[7], r[8]))
        if len(pending) >= batch:
            decorate(pending, contacts_per_row=MAX_CONTACTS_EXPORTED)
            yield from pending
            pending = []
    decorate(pending, contacts_per_row=MAX_CONTACTS_EXPORTED)
    yield from pending


MAX_CONTACTS_EXPORTED = 50


def is_visible(scope: Scope, customer_id: int) -> bool:
    query = Customer.select(Customer.id).where(Customer.id == customer_id)
    visible = _scope_condition(scope)
    if visible is not None:
        query = query.where(visible)
    return query.exists()


def countries(scope: Scope, limit: int = 300) -> list[str]:
    """Countries in use (for the filter's choices)."""
    query = (Customer.select(Customer.country).where(Customer.country != "").distinct()
             .order_by(Customer.country).limit(limit))
    return [c for (c,) in query.tuples()]
