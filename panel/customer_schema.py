"""Tables and indexes of the panel's customer pages (migrations 350-369).

Customer columns added here (notes, search_text, pool_since, pool_reason) are declared
at the end of ``gateway.db.models.Customer``; a fresh database gets them from migration 1,
an older one from migration 350.
"""

from __future__ import annotations

from peewee import BlobField, CharField, Database, DateTimeField, IntegerField, TextField

from gateway.db.migrations import migration
from gateway.db.models import BaseModel, Customer, utcnow


class PoolSweep(BaseModel):
    """The public pool's automatic return: when it last ran (one row, id 1).

    The rules themselves are config keys (``[panel] pool_*``, see conf/mailgate.toml).
    """

    last_sweep_at = DateTimeField(null=True)
    last_sweep_returned = IntegerField(default=0)


class ImportJob(BaseModel):
    """An uploaded import file between its steps (upload -> mapping -> import) and its result."""

    token = CharField(max_length=64, unique=True)
    # "employee:<id>" or "local:<id>": only the uploader sees the job.
    owner = CharField(max_length=100)
    filename = CharField(max_length=300)
    content = BlobField()
    created_at = DateTimeField(default=utcnow, index=True)
    # "uploaded" -> "done"
    state = CharField(max_length=20, default="uploaded")
    result = TextField(default="")  # JSON summary
    errors = TextField(default="")  # JSON list of [row number, message, [cells]]


CUSTOMER_PANEL_MODELS = [PoolSweep, ImportJob]

_CUSTOMER_COLUMNS = ("notes", "search_text", "pool_since", "pool_reason")

# (index name, table, columns).  Sort columns are paired with pool because the list
# filters on pool by default; ownership(employee, customer) serves "whose customers".
INDEXES = (
    ("customer_pool_updated", "customer", ("pool", "updated_at")),
    ("customer_pool_created", "customer", ("pool", "created_at")),
    ("customer_pool_name", "customer", ("pool", "name")),
    ("customer_pool_last_contact", "customer", ("pool", "last_contact_at")),
    ("customer_pool_stage", "customer", ("pool", "stage")),
    ("customer_pool_country", "customer", ("pool", "country")),
    ("customer_updated", "customer", ("updated_at",)),
    ("customer_created", "customer", ("created_at",)),
    ("customer_assigned", "customer", ("assigned_at",)),
    ("ownership_employee_customer", "ownership", ("employee_id", "customer_id")),
)


@migration(350)
def customer_panel_columns(db: Database) -> None:
    """Customer notes, search column, pool bookkeeping; list indexes; search backfill."""
    from playhouse.migrate import SchemaMigrator, migrate

    migrator = SchemaMigrator.from_database(db)
    columns = {c.name for c in db.get_columns("customer")}
    ops = [migrator.add_column("customer", name, getattr(Customer, name))
           for name in _CUSTOMER_COLUMNS if name not in columns]
    if ops:
        migrate(*ops)
    for name, table, cols in INDEXES:
        db.execute_sql(f'CREATE INDEX IF NOT EXISTS "{name}" ON "{table}" ({", ".join(cols)})')
    from gateway.customers import refresh_search_text

    ids = [cid for (cid,) in Customer.select(Customer.id).where(Customer.search_text == "").tuples()]
    for cid in ids:
        refresh_search_text(cid)


@migration(351)
def pool_sweep_and_import_jobs(db: Database) -> None:
    db.create_tables(CUSTOMER_PANEL_MODELS, safe=True)


# The list's search is a substring match over customer.search_text.  A plain LIKE '%x%'
# reads every row (half a second at 100k customers), so the text gets a trigram index:
# SQLite an FTS5 table with the trigram tokenizer kept by triggers, PostgreSQL a pg_trgm
# GIN index (used by LIKE directly).  Without them (no FTS5 / no pg_trgm) search still
# works, by scanning.
FTS_TABLE = "customer_fts"
_SQLITE_FTS = (
    f"CREATE VIRTUAL TABLE IF NOT EXISTS {FTS_TABLE} USING fts5(search_text, content='customer', "
    "content_rowid='id', tokenize='trigram')",
    f"CREATE TRIGGER IF NOT EXISTS customer_fts_ai AFTER INSERT ON customer BEGIN "
    f"INSERT INTO {FTS_TABLE}(rowid, search_text) VALUES (new.id, new.search_text); END",
    f"CREATE TRIGGER IF NOT EXISTS customer_fts_ad AFTER DELETE ON customer BEGIN "
    f"INSERT INTO {FTS_TABLE}({FTS_TABLE}, rowid, search_text) VALUES ('delete', old.id, old.search_text); END",
    f"CREATE TRIGGER IF NOT EXISTS customer_fts_au AFTER UPDATE OF search_text ON customer BEGIN "
    f"INSERT INTO {FTS_TABLE}({FTS_TABLE}, rowid, search_text) VALUES ('delete', old.id, old.search_text); "
    f"INSERT INTO {FTS_TABLE}(rowid, search_text) VALUES (new.id, new.search_text); END",
    f"INSERT INTO {FTS_TABLE}({FTS_TABLE}) VALUES ('rebuild')",
)


@migration(352)
def customer_search_index(db: Database) -> None:
    """Trigram index for the customer list's substring search."""
    import logging

    from gateway.db import is_postgres

    log = logging.getLogger(__name__)
    try:
        with db.atomic():  # a savepoint: a refusal leaves the migration's transaction usable
            if is_postgres():
                db.execute_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
                db.execute_sql("CREATE INDEX IF NOT EXISTS customer_search_trgm ON customer "
                               "USING gin (search_text gin_trgm_ops)")
            else:
                for statement in _SQLITE_FTS:
                    db.execute_sql(statement)
    except Exception as exc:  # noqa: BLE001 - optional speed-up; search falls back to a scan
        log.warning("customer search index not created (%s); the customer search scans instead", exc)
