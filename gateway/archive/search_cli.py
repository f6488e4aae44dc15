"""`mailgate archive search QUERY` and `mailgate archive export QUERY -o FILE` (the search side).

Same query syntax as the panel (gateway/archive/query.py).  Both are written to the
operation log (``archive.search`` / ``archive.export``, actor ``cli:<os user>`` or
``--actor``), like an auditor's searches in the panel.  Exit codes: 0 fine, 1 nothing
found / an export incomplete (a message unreadable, or more matches than ``--limit``:
said on stderr), 2 bad query or config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXPORT_MAX = 100_000


def add_parsers(asub: argparse._SubParsersAction) -> None:
    s = asub.add_parser("search", help="search the archive (newest first; same syntax as the panel)")
    s.add_argument("query", help='e.g. \'报价单 from:hans@hamburg.de after:2026-01-01 has:attachment\'')
    s.add_argument("--page", type=int, default=1)
    s.add_argument("--per-page", type=int, default=20)
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.add_argument("--actor", help="who searches (default: cli:<os user>)")
    s.set_defaults(func=cmd_search)

    e = asub.add_parser("export", help="export the messages a query finds as mbox or zip (.eml + index.csv)")
    e.add_argument("query")
    e.add_argument("-o", "--output", required=True, help="file to write (.mbox or .zip)")
    e.add_argument("--format", choices=("mbox", "zip"), help="default: from the file name, else mbox")
    e.add_argument("--limit", type=int, default=10_000, help=f"at most this many messages (≤ {EXPORT_MAX})")
    e.add_argument("--actor")
    e.set_defaults(func=cmd_export)


def _setup(args: argparse.Namespace):  # noqa: ANN202 - (Config, Archive)
    from gateway.archive.cli import _setup as setup

    return setup(args)


def _actor(args: argparse.Namespace) -> str:
    from gateway.archive.cli import _actor as actor

    return actor(args)


def cmd_search(args: argparse.Namespace) -> int:
    from gateway import oplog
    from gateway.archive.query import QueryError
    from gateway.archive.search import search

    _setup(args)
    try:
        results = search(args.query, page=args.page, per_page=args.per_page)
    except QueryError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return 2
    oplog.record(_actor(args), "archive.search", "archive",
                 {"query": args.query, "page": results.page, "results": len(results.hits), "via": "cli"})
    for h in results.hits:
        sender = h.sender.split("\n")[0]
        if args.json:
            print(json.dumps({"record_id": h.record_id, "created_at": h.created_at.isoformat(),
                              "direction": h.direction, "from": sender, "to": h.rcpt.split("\n"),
                              "subject": h.subject, "has_attachment": h.has_attachment}, ensure_ascii=False))
        else:
            print(f"{h.record_id:>8}  {h.created_at:%Y-%m-%d %H:%M}  {h.direction:3}  {sender[:40]:40}  {h.subject}")
    if results.has_more and not args.json:
        print(f"(more: --page {results.page + 1})", file=sys.stderr)
    return 0 if results.hits else 1


def cmd_export(args: argparse.Namespace) -> int:
    from gateway import oplog
    from gateway.archive import ArchiveError, BlobError
    from gateway.archive.export import ExportItem, write_mbox, write_zip
    from gateway.archive.query import QueryError
    from gateway.archive.search import record_ids
    from gateway.db.models import ArchiveRecord

    _, archive = _setup(args)
    out_path = Path(args.output)
    fmt = args.format or ("zip" if out_path.suffix.lower() == ".zip" else "mbox")
    try:
        limit = max(1, min(args.limit, EXPORT_MAX))
        ids = record_ids(args.query, limit=limit + 1)  # one more: does the limit cut the result set?
    except QueryError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return 2
    truncated = len(ids) > limit
    ids = ids[:limit]
    skipped: list[int] = []

    def items():  # noqa: ANN202
        for rid in ids:
            rec = ArchiveRecord.get_or_none(ArchiveRecord.id == rid)
            if rec is None or rec.purged_at is not None:
                skipped.append(rid)
                continue
            try:
                raw = archive.read(rec)
            except (ArchiveError, BlobError, OSError) as exc:
                print(f"record {rid}: not readable: {exc}", file=sys.stderr)
                skipped.append(rid)
                continue
            try:
                recipients = ", ".join(json.loads(rec.recipients or "[]"))
            except (ValueError, TypeError):
                recipients = ""
            yield ExportItem(rec.id, rec.created_at, rec.direction, rec.mail_from, recipients, rec.subject,
                             rec.sha256, raw)

    with open(out_path, "wb") as fh:
        count = (write_zip if fmt == "zip" else write_mbox)(fh, items())
    oplog.record(_actor(args), "archive.export", "archive",
                 {"query": args.query, "format": fmt, "messages": count, "skipped": skipped[:100], "via": "cli",
                  **({"truncated_at": limit} if truncated else {})})
    print(f"archive export: {count} message(s) → {out_path} ({fmt})"
          + (f"; {len(skipped)} skipped" if skipped else ""))
    if truncated:
        print(f"archive export: INCOMPLETE — the query finds more than {limit} messages; only the newest "
              f"{limit} were exported (raise --limit, at most {EXPORT_MAX}, or narrow the query)", file=sys.stderr)
    return 1 if skipped or truncated else 0
