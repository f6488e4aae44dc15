"""Fast inserts for the write paths that run per message (the SMTP group commit, the
relay's outcomes, the archive chain): the INSERT text built once per model and column set
(``insert_row``), and inside a write transaction the rows of a batch sent as one
statement per table (``buffered_inserts``): SQLite one ``executemany``, PostgreSQL one
multi-row ``INSERT … VALUES`` (psycopg2's ``execute_values``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from peewee import AutoField, Model, SqliteDatabase

from gateway.db.models import database

_INSERT_SQL: dict[tuple, str] = {}


def _insert_sql(model: type[Model], fields: list, returning: bool) -> str:
    """The INSERT text for ``fields`` of ``model`` on the bound backend, built once."""
    db = database.obj
    key = (model, tuple(f.name for f in fields), type(db), returning)
    sql = _INSERT_SQL.get(key)
    if sql is None:
        meta = model._meta
        q = db.quote  # the identifier quote characters, e.g. '""'

        def ident(name: str) -> str:
            return f"{q[0]}{name}{q[1]}"

        columns = ", ".join(ident(f.column_name) for f in fields)
        params = ", ".join([db.param] * len(fields))
        sql = f"INSERT INTO {ident(meta.table_name)} ({columns}) VALUES ({params})"
        if returning:
            sql += f" RETURNING {ident(meta.primary_key.column_name)}"
        _INSERT_SQL[key] = sql
    return sql


def insert_row(instance: Model) -> Model:
    """``instance.save(force_insert=True)`` for the hot path, without peewee building the
    statement again each time (its SQL generation costs more CPU than SQLite's insert):
    the INSERT text is cached per model, column set and backend.  The same columns and
    values as ``save()`` (the fields set on the instance, defaults included), the new id
    set on the instance.  Plain models only (no ``save()`` overrides, no signals).
    Inside ``buffered_inserts()`` the row waits for the block's end (its id is set at once,
    on both backends)."""
    model = type(instance)
    meta = model._meta
    data = instance.__data__
    pk = meta.primary_key
    buffer = getattr(_buffer, "rows", None)
    if buffer is not None and not isinstance(pk, AutoField):  # only integer ids can be counted here
        flush_inserts()  # keep the order of inserts
        buffer = None
    if buffer is not None:
        if data.get(pk.name) is None:
            setattr(instance, pk.name, _next_id(model))
        fields = [f for f in meta.sorted_fields if f.name in data]
        by_columns = buffer.setdefault(model, {})
        by_columns.setdefault(tuple(f.name for f in fields), (fields, []))[1].append(
            [f.db_value(data[f.name]) for f in fields])
        instance._dirty.clear()
        return instance
    fields = [f for f in meta.sorted_fields if f.name in data and not (f is pk and data[f.name] is None)]
    returning = not isinstance(database.obj, SqliteDatabase) and pk.name not in data
    cursor = database.execute_sql(_insert_sql(model, fields, returning), [f.db_value(data[f.name]) for f in fields])
    if data.get(pk.name) is None:
        setattr(instance, pk.name, cursor.fetchone()[0] if returning else cursor.lastrowid)
    instance._dirty.clear()
    return instance


_buffer = threading.local()


@contextmanager
def buffered_inserts(models: tuple[type[Model], ...] = ()) -> Iterator[None]:
    """Inside a write transaction (on SQLite: whose write lock is held already): the rows that
    ``insert_row`` adds in the block go to the database when it ends, one statement per
    table and column set, a table's rows in the order they were added and every table after
    the tables its foreign keys point at (``_parents_first``).  The ids are assigned when
    the row is added: on SQLite counting on from the table's largest id as SQLite itself
    would (nobody else can insert while we hold the write lock); on PostgreSQL drawn from
    the table's sequence a block at a time (ids another writer draws meanwhile are its own;
    the ids of a block left unused are gaps, as a rolled-back insert leaves).  Every
    statement is a moment a thread gives up the GIL — under load it waits milliseconds to
    get it back, holding the write lock all along — and on PostgreSQL a round trip the
    server parses and plans: a batch's twenty inserts become three.  Reads inside the block
    do not see the waiting rows: call ``flush_inserts()`` before one that must.  Nested
    blocks: the outer one holds the rows.

    ``models``: the tables the block will probably insert into; on SQLite the first id
    needed reads the largest id of each of them in one statement instead of one each."""
    if getattr(_buffer, "rows", None) is not None:
        yield
        return
    _buffer.rows, _buffer.ids, _buffer.models = {}, {}, models
    try:
        yield
        flush_inserts()
    finally:
        _buffer.rows = _buffer.ids = _buffer.models = None


def flush_inserts() -> None:
    """The rows ``buffered_inserts`` holds, inserted now (nothing outside such a block)."""
    rows = getattr(_buffer, "rows", None)
    if not rows:
        return
    pending = _parents_first(rows)
    rows.clear()
    sqlite = isinstance(database.obj, SqliteDatabase)
    for model, by_columns in pending:
        for fields, params in by_columns.values():
            if sqlite:
                database.obj.cursor().executemany(_insert_sql(model, fields, False), params)
            else:
                from psycopg2.extras import execute_values  # PostgreSQL only (an optional extra)

                execute_values(database.obj.cursor(), _values_sql(model, fields), params, page_size=PG_PAGE)


def _parents_first(rows: dict[type[Model], dict]) -> list[tuple[type[Model], dict]]:
    """The buffered tables in the order they first appeared, except that a table whose
    foreign key points at another buffered table comes after it: a batch whose first
    archive capture is a re-sighting (a sighting of a record stored earlier) still inserts
    its new records before their sightings."""
    ordered: list[type[Model]] = []
    placed: set[type[Model]] = set()

    def place(model: type[Model]) -> None:
        placed.add(model)  # before the parents: a cycle of foreign keys ends here
        for parent in model._meta.refs.values():
            if parent in rows and parent not in placed:
                place(parent)
        ordered.append(model)

    for model in rows:
        if model not in placed:
            place(model)
    return [(model, rows[model]) for model in ordered]


def _next_id(model: type[Model]) -> int:
    if not isinstance(database.obj, SqliteDatabase):
        return _drawn_id(model)
    ids = _buffer.ids
    last = ids.get(model)
    if last is None:
        wanted = (model, *(m for m in _buffer.models if m is not model and m not in ids))
        ids.update(zip(wanted, _largest_ids(wanted), strict=True))
        last = ids[model]
    ids[model] = last + 1
    return last + 1


_MAX_SQL: dict[tuple, str] = {}


def _largest_ids(models: tuple[type[Model], ...]) -> tuple[int, ...]:
    """The largest id of each table (0 for an empty one), in one statement."""
    key = (type(database.obj), models)
    sql = _MAX_SQL.get(key)
    if sql is None:
        q = database.obj.quote

        def largest(model: type[Model]) -> str:
            meta = model._meta
            return (f"(SELECT max({q[0]}{meta.primary_key.column_name}{q[1]})"
                    f" FROM {q[0]}{meta.table_name}{q[1]})")

        sql = _MAX_SQL[key] = "SELECT " + ", ".join(largest(m) for m in models)
    return tuple(last or 0 for last in database.execute_sql(sql).fetchone())


# PostgreSQL: rows a multi-row INSERT carries (a larger batch goes as several statements).
PG_PAGE = 500
# PostgreSQL: ids drawn from a sequence at a time — the first block small (a group commit of
# one message wastes few), each next one of a block twice as large, up to PG_ID_BLOCK_MAX.
PG_ID_BLOCK = 8
PG_ID_BLOCK_MAX = 256
_SEQ_SQL: dict[tuple, str] = {}


def _drawn_id(model: type[Model]) -> int:
    """The next id for a buffered row of ``model`` on PostgreSQL, from the block of its
    sequence's values this block drew (a new block when it is used up)."""
    ids = _buffer.ids
    block = ids.get(model)
    if not block:
        size = min(PG_ID_BLOCK_MAX, ids.get((model, "size"), PG_ID_BLOCK // 2) * 2)
        ids[(model, "size")] = size
        block = ids[model] = _draw_ids(model, size)
    return block.pop()


def _draw_ids(model: type[Model], n: int) -> list[int]:
    """``n`` values of ``model``'s id sequence, the smallest last (``pop`` takes them in order)."""
    key = (type(database.obj), model)
    sql = _SEQ_SQL.get(key)
    if sql is None:
        meta = model._meta
        table = f'"{meta.table_name}"'
        sql = _SEQ_SQL[key] = (f"SELECT nextval(pg_get_serial_sequence('{table}', '{meta.primary_key.column_name}'))"
                               " FROM generate_series(1, %s)")
    return sorted((row[0] for row in database.execute_sql(sql, (n,)).fetchall()), reverse=True)


_VALUES_SQL: dict[tuple, str] = {}


def _values_sql(model: type[Model], fields: list) -> str:
    """``INSERT INTO t (columns) VALUES %s`` for psycopg2's ``execute_values``, built once."""
    key = (model, tuple(f.name for f in fields))
    sql = _VALUES_SQL.get(key)
    if sql is None:
        sql = _insert_sql(model, fields, False)
        sql = _VALUES_SQL[key] = sql[:sql.rindex(" VALUES (")] + " VALUES %s"
    return sql
