"""Versioned schema migrations.

Each migration is a function ``(db) -> None`` registered with a version number;
``upgrade`` applies every one not yet recorded in ``schemaversion``, in order, each in
its own transaction (a set, not a high-water mark, so areas can number in ranges).
Released migrations are never edited: add a new one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from peewee import Database

from gateway.db import models

MIGRATIONS: dict[int, Callable[[Database], None]] = {}


def migration(version: int) -> Callable:
    def register(fn: Callable[[Database], None]) -> Callable[[Database], None]:
        assert version not in MIGRATIONS, f"duplicate migration {version}"
        MIGRATIONS[version] = fn
        return fn

    return register


@migration(1)
def initial_schema(db: Database) -> None:
    db.create_tables(models.ALL_MODELS_V1, safe=True)


@migration(2)
def rules_approval_rewrite(db: Database) -> None:
    """Issue 4: sent Message-IDs, contacted domains, approvals, used link tokens."""
    db.create_tables(models.ALL_MODELS_V2, safe=True)


@migration(3)
def queue_node_and_due_index(db: Database) -> None:
    """The node whose spool holds a queued file; an index for the relay's claim query."""
    from playhouse.migrate import SchemaMigrator, migrate

    migrator = SchemaMigrator.from_database(db)
    columns = {c.name for c in db.get_columns("outboundmessage")}
    ops = []
    if "node" not in columns:
        ops.append(migrator.add_column("outboundmessage", "node", models.OutboundMessage.node))
        ops.append(migrator.add_index("outboundmessage", ("node",), False))
    indexes = {i.name for i in db.get_indexes("outboundmessage")}
    if "outboundmessage_state_next_attempt_at" not in indexes:
        ops.append(migrator.add_index("outboundmessage", ("state", "next_attempt_at"), False))
    migrate(*ops)


@migration(4)
def queue_fewer_indexes(db: Database) -> None:
    """The queue's index on state alone: the (state, next_attempt_at) index starts with it, and
    every queued and every finished message updated both."""
    db.execute_sql("DROP INDEX IF EXISTS outboundmessage_state")


@migration(5)
def shared_login_failures(db: Database) -> None:
    """Failed logins shared by every process and node (gateway/loginfail.py)."""
    db.create_tables([models.LoginFailure], safe=True)


@migration(6)
def login_failure_marks(db: Database) -> None:
    """A failed login's mark: a password tried again, or a user name failing again, counts once."""
    from playhouse.migrate import SchemaMigrator, migrate

    if "mark" not in {c.name for c in db.get_columns("loginfailure")}:
        migrate(SchemaMigrator.from_database(db).add_column("loginfailure", "mark", models.LoginFailure.mark))


# Modules beyond this one that define models and @migration functions of their own
# (an area's tables live with the area).  Imported before any upgrade.  Version numbers
# are global; each area numbers in its own range so areas never collide:
#   core (this file) 1-99, archive 100-199, distribution 200-299, panel 300-399.
MIGRATION_MODULES: tuple[str, ...] = ("gateway.archive.schema", "gateway.archive.search_schema",
                                      "gateway.archive.unread", "gateway.archive.pending",
                                      "gateway.distribute.schema", "panel.schema", "panel.customer_schema")


def _register_all() -> None:
    for name in MIGRATION_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real import error inside the module
                raise


def applied_versions(db: Database) -> set[int]:
    if not db.table_exists("schemaversion"):
        return set()
    return {row.version for row in models.SchemaVersion.select(models.SchemaVersion.version)}


def current_version(db: Database) -> int:
    return max(applied_versions(db), default=0)


def latest_version() -> int:
    _register_all()
    return max(MIGRATIONS)


def pending(db: Database) -> list[int]:
    """Registered migrations not yet applied to ``db``."""
    _register_all()
    return sorted(set(MIGRATIONS) - applied_versions(db))


def upgrade(db: Database) -> list[int]:
    """Apply pending migrations; return the versions applied."""
    _register_all()
    applied = []
    done = applied_versions(db)
    for version in sorted(MIGRATIONS):
        if version in done:
            continue
        with db.atomic():
            MIGRATIONS[version](db)
            models.SchemaVersion.create(version=version)
        applied.append(version)
    return applied
