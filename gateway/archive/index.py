"""The search index's hooks for the archive core: the one module the archive imports by name.

The archive (gateway/archive/__init__.py, retention.py, cli.py) reaches the full-text
index only through ``optional_module("gateway.archive.index")`` (gateway/areas.py), so it
runs without the search side and need not know how that side is laid out.  This module
therefore re-exports, and defines nothing: the names it keeps are exactly those hooks —

- ``indexable`` (``Archive.prepare`` keeps the indexable bytes of fresh mail),
- ``index_record``, ``index_sighting`` (a record or sighting archived inline),
- ``index_new``, ``index_sightings`` (``Archive.index_committed``, step 4 of ``ingest_many``),
- ``forget_record`` (a retention purge),
- ``given_up`` (``mailgate archive verify``'s warning).

Everything else imports from where the code lives, in the order a message goes:
``extraction`` (the searchable text of a message) and ``terms`` (short grams, word pairs,
the text outside CJK) → ``documents`` (a record's document: its id, its row, put in) →
``doctables`` (the rows written into the tables, and removed) → ``indexer`` (the
background indexer) → ``unread`` (records it could not index) and ``reindex``
(``mailgate archive reindex --failed``).
"""

from __future__ import annotations

from gateway.archive.doctables import forget_record
from gateway.archive.documents import index_new, index_record, index_sighting, index_sightings
from gateway.archive.extraction import indexable
from gateway.archive.unread import given_up

__all__ = ["forget_record", "given_up", "index_new", "index_record", "index_sighting", "index_sightings", "indexable"]
