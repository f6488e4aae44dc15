"""Run a parsed archive query against the index: newest first, paginated, scoped.

``search(text, user_scope=None, page=1, per_page=20)`` → ``Results``.  ``user_scope``
is None for the whole archive (auditors) or the employee ids whose mail may be seen.
Pagination fetches one row more than a page to know whether another page exists (no
count of the whole match set: a common word matches most of a million messages).

SQLite: terms of ≥ 3 characters go to the FTS5 trigram table, which yields rowids
(= time-ordered docids) newest first, so a page is read without sorting the match set;
shorter terms go to the short-gram table.  PostgreSQL, chosen per term: ASCII words and
phrases match the word index (``tsv @@ to_tsquery('simple', 'invoice:*')`` — word starts;
a phrase ``'price <-> list'`` — whole words in order, narrowed by the word-pair index
``pairs @> '{"price list"}'``; SQLite matches them anywhere in a word); anything
else ILIKE on the ``doc`` column, its candidates from the pg_trgm GIN index on the text outside
CJK (``latin``) and the short grams of its CJK runs (``_pg_substring``); ``grams @>`` (GIN) for short terms;
``from:``/``to:`` with a whole address the address rows.  A GIN index cannot say how
many of its candidates really match (a phrase, a substring), so the plan is chosen from
evidence (``_pg_text_rows``): the ``PG_WINDOW`` newest documents first; a few matches
there — walk newest first; fewer — gather from the index and sort.
Blocking: call from a worker thread.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Collection
from dataclasses import dataclass, field

from peewee import fn

from gateway.archive.documents import docid_for
from gateway.archive.query import Query, QueryError, parse
from gateway.archive.terms import CJK, term_grams
from gateway.db import is_postgres
from gateway.db.models import Alias, CompanyDomain, Contact, Customer, Employee, database

MAX_PER_PAGE = 200
MAX_OFFSET = 10_000  # deeper pages: narrow the query instead
_COLUMN = {"from": "sender", "to": "rcpt", "subject": "subject"}
# PostgreSQL: text queries first look at this many newest documents (see ``search``).
PG_WINDOW = 2000
# ... and walk newest first when that window held at least this many matches (see _pg_text_rows).
PG_WALK_MIN = 3
# SQLite: a customer with at most this many documents is intersected with the text matches
# by FTS5 rowid probes; a bigger one by walking the matches (see ``_build``).
FTS_PROBE_LIMIT = 300
_PG_SOURCE = "archivesearchdoc d"


@dataclass
class Hit:
    record_id: int
    docid: int
    created_at: dt.datetime
    direction: str
    employee_id: int | None
    has_attachment: bool
    subject: str = ""
    sender: str = ""
    rcpt: str = ""


@dataclass
class Results:
    hits: list[Hit]
    page: int
    per_page: int
    has_more: bool
    query: Query = field(default_factory=Query)


@dataclass
class CustomerAddresses:
    customer: Customer
    addresses: list[str]
    domains: list[str]


def resolve_customer(value: str) -> CustomerAddresses:
    """customer:<id or name> → its contact addresses and company domains."""
    value = value.strip()
    customer = None
    if value.lstrip("#").isdigit():
        customer = Customer.get_or_none(Customer.id == int(value.lstrip("#")))
    if customer is None:
        exact = list(Customer.select().where(fn.LOWER(Customer.name) == value.lower()).limit(2))
        if len(exact) == 1:
            customer = exact[0]
        else:
            like = list(Customer.select().where(Customer.name.contains(value)).order_by(Customer.name).limit(6))
            if len(like) == 1:
                customer = like[0]
            elif like or exact:
                names = ", ".join(f"{c.name} (#{c.id})" for c in (exact or like)[:5])
                raise QueryError(f"customer:{value} matches several customers: {names} — use customer:<id>")
    if customer is None:
        raise QueryError(f"customer:{value} — no such customer")
    addresses = [c.email.lower() for c in Contact.select(Contact.email).where(Contact.customer == customer)]
    domains = [d.domain.lower() for d in CompanyDomain.select(CompanyDomain.domain)
               .where(CompanyDomain.customer == customer)]
    return CustomerAddresses(customer, addresses, domains)


def resolve_employee(value: str) -> Employee:
    value = value.strip().lower()
    emp = None
    if value.isdigit():
        emp = Employee.get_or_none(Employee.id == int(value))
    if emp is None and "@" in value:
        emp = Employee.get_or_none(Employee.email == value)
        if emp is None:
            alias = Alias.get_or_none(Alias.address == value)
            emp = alias.employee if alias else None
    if emp is None:
        raise QueryError(f"employee:{value} — no such employee (use the e-mail address)")
    return emp


def _like(value: str) -> str:
    return "%" + value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _fts_phrase(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


class _Sql:
    """WHERE clauses and parameters, written once for both placeholder styles."""

    def __init__(self) -> None:
        self.pg = is_postgres()
        self.mark = "%s" if self.pg else "?"
        self.where: list[str] = []
        self.params: list[object] = []
        self.text = False  # PostgreSQL: the query has text conditions
        # PostgreSQL: conditions that only narrow what a GIN index gathers (the word pairs);
        # a walk newest first skips them (they cost a detoast per row and decide nothing).
        self.narrow: list[str] = []
        self.narrow_params: list[object] = []
        self.below: int | None = None  # before: as a docid bound (PostgreSQL's window probe starts there)

    def add(self, clause: str, *params: object) -> None:
        self.where.append(clause.replace("?", self.mark))
        self.params.extend(params)

    def marks(self, n: int) -> str:
        return ", ".join([self.mark] * n)


def search(query_text: str | Query, *, user_scope: Collection[int] | None = None, page: int = 1,
           per_page: int = 20) -> Results:
    """Newest first.  Raises QueryError for bad syntax or unknown employees/customers."""
    q = query_text if isinstance(query_text, Query) else parse(query_text)
    per_page = max(1, min(int(per_page), MAX_PER_PAGE))
    page = max(1, int(page))
    offset = (page - 1) * per_page
    if offset > MAX_OFFSET:
        raise QueryError(f"page {page} is too deep (at most {MAX_OFFSET} results): narrow the query")
    if user_scope is not None and not user_scope:
        return Results([], page, per_page, False, q)
    sql = _Sql()
    base = _build(sql, q, user_scope)
    limit = f" LIMIT {per_page + 1} OFFSET {offset}"
    if sql.pg and sql.text and offset + per_page < PG_WINDOW:
        rows = _pg_text_rows(sql, base, offset, per_page)
    else:
        rows = database.obj.execute_sql(base + limit, sql.params).fetchall()
    hits = [Hit(record_id=r[1], docid=r[0], created_at=_as_datetime(r[2]), direction=r[3], employee_id=r[4],
                has_attachment=bool(r[5])) for r in rows[:per_page]]
    _fill_text(hits)
    return Results(hits, page, per_page, len(rows) > per_page, q)


def _pg_text_rows(sql: _Sql, base: str, offset: int, per_page: int) -> list[tuple]:
    """A page of a PostgreSQL text query, with the plan chosen from evidence rather than
    left to estimates (a GIN index cannot tell how many of its candidates match a phrase or
    a substring, and a wrong guess either rechecks most of the archive or walks all of it):

    1. the newest ``PG_WINDOW`` documents (before ``before:``): common terms fill the page here;
    2. at least ``PG_WALK_MIN`` matches there, not a page: dense enough to walk the
       documents newest first and stop at the page (bitmap scans off: no GIN gathering);
    3. fewer: rare (one recent hit of an order number says little) — gather them from the
       GIN indexes and sort (no walk, which would read every document to find them)."""
    db = database.obj
    need = offset + per_page + 1
    # before: the newest documents of the range (the archive's newest lie past its end: a
    # probe there found nothing and sent a dense month to the sort-everything plan)
    below = f" WHERE docid < {int(sql.below)}" if sql.below is not None else ""
    window = base.replace(_PG_SOURCE, f"(SELECT * FROM archivesearchdoc{below} ORDER BY docid DESC"
                                      f" LIMIT {PG_WINDOW}) d", 1)
    seen = db.execute_sql(f"{window} LIMIT {need}", sql.params).fetchall()
    if len(seen) == need:
        return seen[offset:]
    walk = len(seen) >= PG_WALK_MIN
    params = list(sql.params)
    if walk:
        text = base
    else:
        narrow = "".join(f" AND {c}" for c in sql.narrow)
        text = base.replace(" ORDER BY d.docid DESC", f"{narrow} ORDER BY d.docid + 0 DESC")
        params += sql.narrow_params
    with database.atomic():  # SET LOCAL ends with this transaction (or savepoint), error or not
        db.execute_sql("SET LOCAL enable_seqscan = off")
        if walk:
            db.execute_sql("SET LOCAL enable_bitmapscan = off")
        rows = db.execute_sql(f"{text} LIMIT {per_page + 1} OFFSET {offset}", params).fetchall()
        db.execute_sql("SET LOCAL enable_seqscan = DEFAULT")  # a caller's outer transaction goes on
        db.execute_sql("SET LOCAL enable_bitmapscan = DEFAULT")
    return rows


def _as_datetime(value: object) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value))


def _build(sql: _Sql, q: Query, user_scope: Collection[int] | None) -> str:
    long_terms = [t for t in q.terms if len(t) >= 3]
    short_terms = [t for t in q.terms if len(t) < 3]
    long_fields = [(_COLUMN[f], v) for f, v in q.fields if len(v) >= 3]
    short_fields = [(_COLUMN[f], v) for f, v in q.fields if len(v) < 3]
    grams = [g for t in (*short_terms, *(v for _, v in short_fields)) for g in term_grams(t)]
    if short_terms or short_fields:
        if not grams:  # punctuation only: nothing a short term could match
            raise QueryError("a term of one or two characters must contain a letter, digit or CJK character")
    cols = "d.docid, d.record_id, d.created_at, d.direction, d.employee_id, d.has_attachment"
    if sql.pg:
        key = "d.docid"
        source = _PG_SOURCE
        if long_terms or long_fields or grams:
            source += " JOIN archivesearchtext t ON t.docid = d.docid"
            sql.text = True
        for term in long_terms:
            _pg_text(sql, term)
        for column, value in long_fields:
            if column in _ROLE and _ADDRESS.fullmatch(value):
                # A whole address: its rows in archivesearchaddr, not the trigram index (whose
                # posting lists for "com", "exa" … hold nearly every document at a million).
                sql.add("d.docid IN (SELECT docid FROM archivesearchaddr WHERE role = ? AND address = ?)",
                        _ROLE[column], value.lower())
                continue
            _pg_text(sql, value)
            sql.add(f"t.{column} ILIKE ?", _like(value))
        if grams:
            sql.add("t.grams @> ?::text[]", list(dict.fromkeys(grams)))
        for column, value in short_fields:
            sql.add(f"t.{column} ILIKE ?", _like(value))
    else:
        if long_terms or long_fields:
            match = " AND ".join([_fts_phrase(t) for t in long_terms]
                                 + [f"{c} : {_fts_phrase(v)}" for c, v in long_fields])
            source = "archivefts JOIN archivesearchdoc d ON d.docid = archivefts.rowid"
            key = "archivefts.rowid"
            sql.add("archivefts MATCH ?", match)
            if grams:
                sql.add("EXISTS (SELECT 1 FROM archivegrams WHERE archivegrams MATCH ?"
                        " AND archivegrams.rowid = archivefts.rowid)",
                        " AND ".join(_fts_phrase(g) for g in dict.fromkeys(grams)))
        elif grams:
            source = "archivegrams JOIN archivesearchdoc d ON d.docid = archivegrams.rowid"
            key = "archivegrams.rowid"
            sql.add("archivegrams MATCH ?", " AND ".join(_fts_phrase(g) for g in dict.fromkeys(grams)))
        else:
            source = "archivesearchdoc d"
            key = "d.docid"
        for column, value in short_fields:
            sql.add(f"EXISTS (SELECT 1 FROM archivefts f WHERE f.rowid = {key} AND instr(lower(f.{column}), ?) > 0)",
                    value.lower())
    if q.after:
        sql.add(f"{key} >= ?", docid_for(dt.datetime.combine(q.after, dt.time()), 0))
    if q.before:
        sql.below = docid_for(dt.datetime.combine(q.before, dt.time()), 0)
        sql.add(f"{key} < ?", sql.below)
    if q.has_attachment:
        sql.add("d.has_attachment = ?", True)
    if q.direction or q.employee:
        conds, params = [], []
        if q.direction:
            conds.append(("direction", q.direction, {"in": "inbound", "out": "outbound"}[q.direction]))
        if q.employee:
            employee_id = resolve_employee(q.employee).id
            conds.append(("employee_id", employee_id, employee_id))
        _add_seen(sql, conds)
    if user_scope is not None:
        ids = sorted({int(i) for i in user_scope})
        marks = sql.marks(len(ids))
        probe = _PROBE if sql.pg else ""
        sql.add(f"(EXISTS (SELECT 1 FROM archivesearchseen s WHERE s.docid = d.docid AND s.employee_id IN ({marks})"
                f"{probe}) OR EXISTS (SELECT 1 FROM archivesighting g WHERE g.record_id = d.record_id"
                f" AND {'' if sql.pg else _NO_INDEX}g.employee_id IN ({marks}){probe}))", *ids, *ids)
    if q.customer:
        c = resolve_customer(q.customer)
        if not c.addresses and not c.domains:
            sql.add("1 = 0")
        else:
            parts, params = [], []
            if c.addresses:
                parts.append(f"SELECT docid FROM archivesearchaddr WHERE address IN ({sql.marks(len(c.addresses))})")
                params += c.addresses
            if c.domains:
                parts.append(f"SELECT docid FROM archivesearchaddr WHERE domain IN ({sql.marks(len(c.domains))})")
                params += c.domains
            members = " UNION ".join(parts)
            plus = ""
            if not sql.pg and key != "d.docid" and _at_least(f"SELECT docid FROM ({members})", params,
                                                                FTS_PROBE_LIMIT + 1):
                # SQLite would hand the customer's set to FTS5 as rowid constraints, one index
                # probe per member (0.6 s for a big customer at 100k); the unary + makes it
                # walk the text matches newest first and test membership instead.
                plus = "+"
            sql.where.append(f"{plus}{key} IN ({members})")
            sql.params.extend(params)
    where = (" WHERE " + " AND ".join(sql.where)) if sql.where else ""
    return f"SELECT {cols} FROM {source}{where} ORDER BY {key} DESC"


# SQLite: a unary + keeps a column's own index out of a correlated sighting look-up, which
# must go by record_id.  Without ANALYZE statistics (the gateway never runs it) SQLite took
# the employee_id or direction index instead and scanned every sighting of that employee or
# direction once per candidate document: 2–6 s at 130k.
_NO_INDEX = "+"
# PostgreSQL: OFFSET 0 keeps a correlated EXISTS a per-row index probe.  Without it the
# planner may hash the whole uncorrelated set instead (every inbound sighting, every sighting
# of an employee: 53k rows and 0.6 s at 118k, growing with the archive) when it expects
# few outer rows — as it does for the newest-documents window.
_PROBE = " OFFSET 0"
_ROLE = {"sender": "from", "rcpt": "to"}
_ADDRESS = re.compile(r"[^@\s\"<>]+@[^@\s\"<>]+\.[A-Za-z]{2,63}")
_LATIN_WORDS = re.compile(r"[A-Za-z0-9]+(?: [A-Za-z0-9]+)*")


def pg_tsquery(term: str) -> str | None:
    """The word query for a term of ASCII letters and digits, or None when the term has
    anything else (CJK, punctuation, addresses: the trigram index answers it).  One word
    matches word starts (``invoice`` → ``invoice:*``, "invoices" too); a phrase matches its
    whole words in this order (``price list`` → ``price <-> list``)."""
    if not _LATIN_WORDS.fullmatch(term):
        return None
    words = term.lower().split(" ")
    if len(words) == 1:
        return f"{words[0]}:*"
    return " <-> ".join(words)


def word_pairs(term: str) -> list[str]:
    """The adjacent word pairs of a phrase ("a b c" → ["a b", "b c"]), as migration 153's
    ``archive_word_pairs`` stores them for every document."""
    words = term.lower().split(" ")
    return list(dict.fromkeys(f"{a} {b}" for a, b in zip(words, words[1:], strict=False)))


def _pg_text(sql: _Sql, term: str) -> None:
    """One text condition on PostgreSQL, chosen per term: Latin words from the word index
    (``tsv``, GIN; a phrase also from the word-pair index, whose GIN candidates are nearly
    the matches — the word index alone cannot tell a rare phrase of common words from its
    words), anything else from the trigram index (``doc``)."""
    words = pg_tsquery(term)
    if words is None:
        _pg_substring(sql, term)
        return
    pairs = word_pairs(term)
    if pairs:
        sql.narrow.append("t.pairs @> %s::text[]")
        sql.narrow_params.append(pairs)
    sql.add("t.tsv @@ to_tsquery('simple', ?)", words)


MAX_TERM_PAIRS = 12  # CJK pairs of one term that narrow its candidates (a pasted sentence has dozens)


def _pg_substring(sql: _Sql, term: str) -> None:
    """A substring term on PostgreSQL (CJK, punctuation, addresses): ``doc ILIKE`` decides;
    conditions the GIN indexes answer come with it (migration 163) — the trigram index on
    ``latin`` (the text outside CJK) for each piece of the term between its CJK runs (≥ 3
    characters: pg_trgm has nothing shorter), the short grams for each CJK run (its
    character, or its adjacent pairs).  Each holds for every document the term is a
    substring of, so they only narrow; they are ordinary conditions, not ``narrow`` ones,
    because the newest-documents window needs them as much as the gathering does: without an
    index behind any of its conditions the window's plan would run ``ILIKE`` over all of its
    2000 documents (4 → 70 ms for a rare order number at 100k)."""
    sql.add("t.doc ILIKE ?", _like(term))
    for piece in CJK.split(term):
        if len(piece.strip()) >= 3:
            sql.add("t.latin ILIKE ?", _like(piece))
    grams = [g for run in CJK.findall(term)
             for g in ([run] if len(run) == 1 else [run[i:i + 2] for i in range(len(run) - 1)])]
    if grams:
        sql.add("t.grams @> ?::text[]", list(dict.fromkeys(grams))[:MAX_TERM_PAIRS])


def _at_least(subquery: str, params: list[object], n: int) -> bool:
    """Whether ``subquery`` yields at least ``n`` rows (reads at most n)."""
    mark = "%s" if is_postgres() else "?"
    row = database.obj.execute_sql(f"SELECT count(*) FROM ({subquery.replace('?', mark)} LIMIT {int(n)}) x",
                                   params).fetchone()
    return row[0] >= n


def _add_seen(sql: _Sql, conds: list[tuple[str, object, object]]) -> None:
    """Mail seen with this direction/employee: in the index's own list (``archivesearchseen``,
    filled at indexing and by ``index_sighting``) or in the archive's sightings themselves
    (so later sightings count even where no hook reports them).  conds: (column, index value,
    sighting value)."""
    index_part = " AND ".join(f"s.{column} = ?" for column, _, _ in conds)
    sighting_part = " AND ".join(f"{_NO_INDEX if not sql.pg else ''}g.{column} = ?" for column, _, _ in conds)
    probe = _PROBE if sql.pg else ""
    sql.add(f"(EXISTS (SELECT 1 FROM archivesearchseen s WHERE s.docid = d.docid AND {index_part}{probe})"
            f" OR EXISTS (SELECT 1 FROM archivesighting g WHERE g.record_id = d.record_id AND {sighting_part}{probe}))",
            *[v for _, v, _ in conds], *[v for _, _, v in conds])


def _fill_text(hits: list[Hit]) -> None:
    if not hits:
        return
    by_id = {h.docid: h for h in hits}
    marks = ", ".join(["%s" if is_postgres() else "?"] * len(by_id))
    table = "archivesearchtext" if is_postgres() else "archivefts"
    key = "docid" if is_postgres() else "rowid"
    rows = database.obj.execute_sql(f"SELECT {key}, subject, sender, rcpt FROM {table} WHERE {key} IN ({marks})",
                                    list(by_id)).fetchall()
    for docid, subject, sender, rcpt in rows:
        hit = by_id[docid]
        hit.subject, hit.sender, hit.rcpt = subject, sender, rcpt


def record_ids(query_text: str | Query, *, user_scope: Collection[int] | None = None,
               limit: int = 10_000) -> list[int]:
    """Record ids of the first ``limit`` matches, newest first (for exports)."""
    q = query_text if isinstance(query_text, Query) else parse(query_text)
    if user_scope is not None and not user_scope:
        return []
    sql = _Sql()
    base = _build(sql, q, user_scope)
    rows = database.obj.execute_sql(f"{base} LIMIT {int(limit)}", sql.params).fetchall()
    return [r[1] for r in rows]
