"""Versioned schema migrations.

Each migration is a function ``(db) -> None`` registered with a version number;
``upgrade`` applies the missing ones in order, each in its own transaction, and
records it in ``schemaversion``.  Released migrations are never edited: add a
new one.
"""

from __future__ import annotations

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


def current_version(db: Database) -> int:
    if not db.table_exists("schemaversion"):
        return 0
    row = models.SchemaVersion.select(models.SchemaVersion.version).order_by(
        models.SchemaVersion.version.desc()
    ).first()
    return row.version if row else 0


def latest_version() -> int:
    return max(MIGRATIONS)


def upgrade(db: Database) -> list[int]:
    """Apply pending migrations; return the versions applied."""
    applied = []
    for version in sorted(MIGRATIONS):
        if version <= current_version(db):
            continue
        with db.atomic():
            MIGRATIONS[version](db)
            models.SchemaVersion.create(version=version)
        applied.append(version)
    return applied
