"""An archived record's index document: its id, its row, and putting it in (see
``search_schema`` for the tables) — one record, a batch, the batch of an ingest just
committed — and the sightings that add employees and directions to it.

``index_record(record, raw)`` writes one document: metadata in ``archivesearchdoc``,
addresses in ``archivesearchaddr`` and the text in the backend's text index (the writing
itself: ``doctables``).  It runs inside the caller's transaction.

Document ids (``docid``) are time ordered — ``created_at`` in microseconds × 1024 plus
the record id mod 1024 — so "newest first" is a walk down the primary key and, on
SQLite, down the FTS5 rowids (no sort of the match set).
"""

from __future__ import annotations

import datetime as dt
import logging

from gateway.archive.doctables import write_rows
from gateway.archive.extraction import Extracted, all_text, extract
from gateway.archive.terms import short_grams
from gateway.archive.unread import Failure, data_error, write_failure
from gateway.db import is_postgres
from gateway.db.models import database

log = logging.getLogger("mailgate.archive.index")  # the search index's log, as before the split

_EPOCH = dt.datetime(1970, 1, 1)

Grams = list[str] | str | None  # short grams: a list, or joined by spaces (workers), or None: not computed yet


def docid_for(created_at: dt.datetime, record_id: int) -> int:
    """Time-ordered document id: microseconds since 1970 × 1024 + record id mod 1024."""
    if created_at.tzinfo is not None:
        created_at = created_at.astimezone(dt.UTC).replace(tzinfo=None)
    micros = (created_at - _EPOCH) // dt.timedelta(microseconds=1)
    return micros * 1024 + (int(record_id) % 1024)


def _field(record: object, *names: str, default: object = None) -> object:
    for name in names:
        value = getattr(record, name, None)
        if value is not None:
            return value
    return default


def _direction(value: str) -> str:
    return {"outbound": "out", "inbound": "in"}.get(value, value)[:10]


def doc_row(docid: int, record_id: int, created_at: dt.datetime, direction: str, employee_id: int | None,
            ex: Extracted, *, with_grams: bool = False) -> tuple:
    """A row for ``write_rows``; ``with_grams`` computes the short grams now (e.g. in another process)."""
    grams = short_grams(all_text(ex)) if with_grams else None
    return (docid, record_id, created_at, _direction(direction), employee_id, ex, grams)


def index_record(record: object, raw: bytes) -> None:
    """Index one archived record (call once per new record, inside its transaction)."""
    _add_record(record, extract(raw))


def _add_record(record: object, ex: Extracted) -> None:
    created = _field(record, "created_at", "first_seen_at", default=None) or dt.datetime.now(dt.UTC)
    employee = _field(record, "employee_id", default=None)
    if employee is None:
        emp = getattr(record, "employee", None)
        employee = getattr(emp, "id", emp) if emp is not None else None
    add_document(
        record_id=int(record.id),
        created_at=created,
        direction=str(_field(record, "direction", default="") or ""),
        employee_id=int(employee) if employee is not None else None,
        ex=ex,
    )


def add_document(*, record_id: int, created_at: dt.datetime, direction: str, employee_id: int | None,
                 ex: Extracted) -> int:
    """Insert one document; returns its docid."""
    docid = docid_for(created_at, record_id)
    taken = f"SELECT 1 FROM archivesearchdoc WHERE docid = {'%s' if is_postgres() else '?'}"
    while database.obj.execute_sql(taken, (docid,)).fetchone() is not None:
        docid += 1024  # the same microsecond and id mod 1024: the next free slot
    if created_at.tzinfo is not None:
        created_at = created_at.astimezone(dt.UTC).replace(tzinfo=None)
    row = doc_row(docid, record_id, created_at, direction, employee_id, ex)
    write_rows([row])
    return docid


def add_documents(entries: list[tuple[object, Extracted, Grams]],
                  written: dict[int, tuple[int, int | None, str]] | None = None) -> int:
    """Index many new records at once (batch ingest, the background indexer): ``(record,
    extracted text, short grams or None)`` each; one look-up for docid collisions and one
    bulk insert.  Call inside a write transaction; returns how many documents were written.
    ``written``: filled with record id → (docid, employee id, direction) of each document
    (``index_sightings``' ``known``)."""
    if not entries:
        return 0
    rows, taken = [], _taken_docids([docid_for(_created(r), int(r.id)) for r, _, _ in entries])
    for rec, ex, grams in entries:
        created = _created(rec)
        docid = docid_for(created, int(rec.id))
        while docid in taken:  # the same microsecond and id mod 1024: the next free slot
            docid += 1024
            if _docid_taken(docid):
                taken.add(docid)
        taken.add(docid)
        rows.append((docid, int(rec.id), created, _direction(str(_field(rec, "direction", default="") or "")),
                     _employee_of(rec), ex, grams))
    write_rows(rows)
    if written is not None:
        written.update((row[1], (row[0], row[4], row[3])) for row in rows)
    return len(rows)


def _created(record: object) -> dt.datetime:
    created = _field(record, "created_at", "first_seen_at", default=None) or dt.datetime.now(dt.UTC)
    if created.tzinfo is not None:
        created = created.astimezone(dt.UTC).replace(tzinfo=None)
    return created


def _employee_of(record: object) -> int | None:
    employee = _field(record, "employee_id", default=None)
    if employee is None:
        emp = getattr(record, "employee", None)
        employee = getattr(emp, "id", emp) if emp is not None else None
    return int(employee) if employee is not None else None


def _docid_taken(docid: int) -> bool:
    taken = f"SELECT 1 FROM archivesearchdoc WHERE docid = {'%s' if is_postgres() else '?'}"
    return database.obj.execute_sql(taken, (docid,)).fetchone() is not None


def _taken_docids(docids: list[int]) -> set[int]:
    if not docids:
        return set()
    marks = ", ".join(["%s" if is_postgres() else "?"] * len(docids))
    rows = database.obj.execute_sql(f"SELECT docid FROM archivesearchdoc WHERE docid IN ({marks})", docids)
    return {r[0] for r in rows.fetchall()}


def index_new(entries: list[tuple[object, Extracted, Grams]]) -> int:
    """Documents for records just committed (``Archive.ingest_many``), skipping any that an
    indexer wrote meanwhile.  Call inside a write transaction; returns how many were written.
    A document that cannot be written is logged and left out, not listed: the background
    indexer moves its watermark past a record only in a pass that found it with a document or
    wrote one itself (or, failing, listed it in ``archivesearchunread``), so the record is
    after the watermark — counted by ``indexer.backlog()`` — and the next pass writes it."""
    from gateway.archive.search_schema import SearchDoc

    if not entries:
        return 0
    ids = [int(rec.id) for rec, _, _ in entries]
    taken = {d.record_id for d in SearchDoc.select(SearchDoc.record_id).where(SearchDoc.record_id.in_(ids))}
    return insert_documents([e for e in entries if int(e[0].id) not in taken])


def insert_documents(entries: list[tuple[object, Extracted, Grams]],
                     written: dict[int, tuple[int, int | None, str]] | None = None,
                     failed: dict[int, Failure] | None = None) -> int:
    """All documents in one bulk insert (a savepoint) or, if one is bad, one at a time (the
    bad one logged and skipped: its savepoint rolled back, so no part of it stays — no
    ``archivesearchdoc`` row that would pass it for indexed).  ``written``: see
    ``add_documents``.  ``failed`` (the background indexer): filled with record id → ``Failure``
    (why its document could not be written; whether for its data, ``data_error``) of each one
    skipped, for
    ``unread.note_unread`` to list (``archivesearchunread``) and ``indexer.index_batch`` to write again
    later; without it (``index_new``) a skipped record stays without a document after the
    indexer's watermark, and the background indexer writes it."""
    try:
        with database.atomic():
            wrote: dict[int, tuple[int, int | None, str]] = {}
            done = add_documents(entries, wrote)
        if written is not None:
            written.update(wrote)
        return done
    except Exception:
        log.warning("archive: bulk indexing failed, indexing one by one", exc_info=True)
    # a split write (PostgreSQL, ``doctables._write_split``) may have committed one half: those are done
    have = {r for r, in select_in("SELECT record_id FROM archivesearchdoc WHERE record_id IN",
                                   [int(rec.id) for rec, _, _ in entries])}
    done = 0
    for rec, ex, grams in entries:
        if int(rec.id) in have:
            done += 1
            continue
        try:
            with database.atomic():
                wrote = {}
                add_documents([(rec, ex, grams)], wrote)
            if written is not None:
                written.update(wrote)
            done += 1
        except Exception as exc:
            if failed is None:
                log.exception("archive record %s: full-text indexing failed (left to the background indexer)",
                              rec.id)
            else:
                log.exception("archive record %s: full-text indexing failed (listed, written again later)",
                              rec.id)
                failed[int(rec.id)] = Failure(write_failure(exc), data=data_error(exc))
    return done


def index_sighting(sighting: object) -> None:
    """Note another employee/direction an indexed message was seen with (call for every
    new sighting; a pair already noted is ignored)."""
    from gateway.archive.search_schema import SearchDoc, SearchSeen

    record_id = _field(sighting, "record_id", default=None)
    if record_id is None:
        return
    doc = SearchDoc.select(SearchDoc.docid).where(SearchDoc.record_id == int(record_id)).first()
    if doc is None:
        return
    employee = _field(sighting, "employee_id", default=None)
    direction = _direction(str(_field(sighting, "direction", default="") or ""))
    q = SearchSeen.select().where((SearchSeen.docid == doc.docid) & (SearchSeen.direction == direction))
    q = q.where(SearchSeen.employee_id.is_null() if employee is None else SearchSeen.employee_id == int(employee))
    if not q.exists():
        SearchSeen.insert(docid=doc.docid, employee_id=employee, direction=direction).execute()


def index_sightings(sightings: list, known: dict[int, tuple[int, int | None, str]] | None = None) -> None:
    """``index_sighting`` for many sightings with a few statements instead of two per
    sighting (the background indexer sees a relay:sent sighting for nearly every outbound
    message, nearly always a pair already noted).  ``known``: record id → (docid, employee id,
    direction) of documents written in this transaction (their docid and their one seen row
    need no look-up: a node's smtp:submitted sighting is nearly always exactly that row).
    One savepoint; if it fails, each sighting is tried on its own so one bad row does not
    stop the others."""
    wanted = [(int(r), _field(s, "employee_id", default=None),
               _direction(str(_field(s, "direction", default="") or "")))
              for s in sightings if (r := _field(s, "record_id", default=None)) is not None]
    if not wanted:
        return
    known = known or {}
    try:
        with database.atomic():
            docs = {record_id: doc[0] for record_id, doc in known.items()}
            seen: set[tuple] = {doc for doc in known.values()}
            ask = sorted({r for r, _, _ in wanted if r not in docs})
            docs.update(select_in("SELECT record_id, docid FROM archivesearchdoc WHERE record_id IN", ask))
            ask_docs = sorted({docid for r, _, _ in wanted if (docid := docs.get(r)) is not None and r not in known})
            seen.update(select_in("SELECT docid, employee_id, direction FROM archivesearchseen WHERE docid IN",
                                   ask_docs))
            new = []
            for record_id, employee, direction in wanted:
                docid = docs.get(record_id)
                key = (docid, None if employee is None else int(employee), direction)
                if docid is not None and key not in seen:
                    seen.add(key)
                    new.append(key)
            if new:
                mark = "%s" if is_postgres() else "?"
                database.obj.cursor().executemany(
                    f"INSERT INTO archivesearchseen (docid, employee_id, direction) VALUES ({mark}, {mark}, {mark})",
                    new)
        return
    except Exception:
        log.exception("archive sightings: batched search index update failed; one at a time")
    for s in sightings:
        try:
            with database.atomic():
                index_sighting(s)
        except Exception:
            log.exception("archive sighting %s: search index update failed", s.id)


IN_CHUNK = 500  # ids per "IN (...)" list


def select_in(sql: str, ids: list) -> list[tuple]:
    """Rows of ``sql`` + " (ids…)" for every id (in chunks of ``IN_CHUNK``), as tuples: the
    indexer's look-ups by id, as plain SQL (peewee built a node per id — a tenth of the
    drain's Python)."""
    out: list[tuple] = []
    mark = "%s" if is_postgres() else "?"
    for i in range(0, len(ids), IN_CHUNK):
        chunk = ids[i:i + IN_CHUNK]
        out.extend(database.obj.execute_sql(f"{sql} ({', '.join([mark] * len(chunk))})", chunk).fetchall())
    return out
