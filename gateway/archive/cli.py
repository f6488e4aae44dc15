"""`mailgate archive verify|head|import|rotate-key|hold|release|holds|purge|gc|reindex` (+ search).

Exit codes: 0 fine, 1 a problem found (verify) or some items failed (import, reindex), 2 bad
usage/config.  Records the indexer gave up on, and blob files no record names, are notes of
verify's, not problems.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gateway import config as config_mod
from gateway.areas import optional_module

if TYPE_CHECKING:
    from gateway.archive.anchors import Anchor


def _setup(args: argparse.Namespace):  # noqa: ANN202 - (Config, Archive)
    from gateway.archive import Archive
    from gateway.db import connect

    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        for problem in exc.problems:
            print(f"mailgate: {problem}", file=sys.stderr)
        raise SystemExit(2) from None
    connect(cfg.database.url)
    return cfg, Archive.from_config(cfg)


def _actor(args: argparse.Namespace) -> str:
    return getattr(args, "actor", None) or f"cli:{getpass.getuser()}"


def cmd_verify(args: argparse.Namespace) -> int:
    from gateway.archive.importer import Progress
    from gateway.archive.verify import checkpoint, verify

    _, archive = _setup(args)
    progress = Progress("verify blobs") if not args.quiet else None
    problems = verify(archive.store, blobs=not args.no_blobs, progress=progress.update if progress else None,
                      anchors=args.anchor or (), directory=archive.directory)
    if progress:
        progress.finish()
    for p in problems:
        print(p)
    _warn_unindexed()
    if not args.no_blobs:
        _note_unreferenced(archive.store)
    if problems:
        print(f"archive verify: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    seq, h = checkpoint(_actor(args), archive.directory)
    print(f"archive verify: OK ({seq} chain entries; head {h[:16]}…)")
    _print_anchors((seq, h))  # keep them off-host; `verify --anchor` checks them later
    return 0


WARN_LISTED = 20  # records named by verify's warning (the rest counted)


def _warn_unindexed() -> None:
    """Records whose index document the indexer gave up on (gateway/archive/unread.py): a
    warning, not a problem — the record is intact and readable, only search misses it."""
    index = optional_module("gateway.archive.index")
    if index is None:
        return
    count, listed = index.given_up(WARN_LISTED)
    if not count:
        return
    print(f"warning: {count} record(s) cannot be found by search: their index entry was refused for its data"
          " and the indexer gave up (the records are intact; `mailgate archive reindex --failed` tries again)")
    for record_id, reason in listed:
        print(f"warning: record {record_id}: {reason}")
    if count > len(listed):
        print(f"warning: … and {count - len(listed)} more")


def _note_unreferenced(store) -> None:  # noqa: ANN001 - a BlobStore
    """Blob files no record names (gateway/archive/gc.py): a note, not a problem — left by a
    failed batch, harmless but disk; ``mailgate archive gc`` removes them."""
    from gateway.archive.gc import unreferenced

    found = list(unreferenced(store))
    if not found:
        return
    print(f"unreferenced: {len(found)} blob file(s), {sum(f.size for f in found)} bytes, named by no record"
          " (left by failed writes: harmless; `mailgate archive gc --older-than 7d` removes them)")
    for f in sorted(found, key=lambda f: f.mtime)[:WARN_LISTED]:
        print(f"unreferenced: {f.name} ({f.size} bytes, written {_when(f.mtime)})")
    if len(found) > WARN_LISTED:
        print(f"unreferenced: … and {len(found) - WARN_LISTED} more")


def _when(mtime: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(mtime, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def cmd_gc(args: argparse.Namespace) -> int:
    """Remove the blob files no record names, older than ``--older-than`` (gateway/archive/gc.py)."""
    from gateway import oplog
    from gateway.archive.gc import MIN_AGE, collect, parse_age

    try:
        older_than = parse_age(args.older_than)
    except ValueError as exc:
        print(f"mailgate archive gc: {exc}", file=sys.stderr)
        return 2
    if older_than < MIN_AGE:
        print(f"mailgate archive gc: --older-than must be at least {MIN_AGE / 3600:.0f}h: a younger blob may"
              " belong to a message being stored", file=sys.stderr)
        return 2
    _, archive = _setup(args)
    result = collect(archive.store, older_than, _actor(args), dry_run=args.dry_run)
    if args.dry_run:
        for f in result.removed:
            print(f"would remove: {f.name} ({f.size} bytes, written {_when(f.mtime)})")
    else:
        oplog.record(_actor(args), "archive.gc", f"{len(result.removed)} blobs",
                     {"removed": len(result.removed), "bytes": result.bytes, "older_than_seconds": int(older_than),
                      "younger_kept": result.young})
    verb = "would remove" if args.dry_run else "removed"
    print(f"archive gc: {verb} {len(result.removed)} unreferenced blob file(s) ({result.bytes} bytes) older than "
          f"{args.older_than}; {result.young} younger kept")
    return 0


def cmd_reindex(args: argparse.Namespace) -> int:
    """Try the records the indexer gave up on again, now (``reindex.retry_failed``: a transaction
    per ``RETRY_BATCH`` records, progress on stderr; interrupted, a new run takes the rest)."""
    from gateway import oplog
    from gateway.archive.importer import Progress
    from gateway.archive.reindex import retry_failed

    _, archive = _setup(args)
    progress = Progress("reindex", unit="records")
    try:
        result = retry_failed(archive, args.record or None, progress=progress.update)
    except BaseException:
        progress.close()  # a bar on screen gets its line ended before the traceback
        raise
    progress.finish()
    for record_id, reason in result.refused:
        print(f"record {record_id}: still refused: {reason}", file=sys.stderr)
    for record_id, reason in result.rescheduled:
        print(f"record {record_id}: not written now ({reason}); the indexer tries again later", file=sys.stderr)
    oplog.record(_actor(args), "archive.reindex", "failed",
                 {"indexed": len(result.indexed), "refused": [r for r, _ in result.refused][:100],
                  "rescheduled": [r for r, _ in result.rescheduled][:100]})
    print(f"archive reindex: {len(result.indexed)} record(s) indexed, {len(result.refused)} still refused, "
          f"{len(result.rescheduled)} left to the indexer")
    return 1 if result.refused or result.rescheduled else 0


def _print_anchors(head: tuple[int, str] | None = None) -> None:
    """The chain head (``head``, default the current one) and the operation log's end (its
    newest entry, after verify the checkpoint just written), one ``anchor:`` line each."""
    from gateway import oplog
    from gateway.archive import chain
    from gateway.archive.anchors import OPLOG, Anchor

    print(f"anchor: {Anchor(*(head or chain.head()))}")
    print(f"anchor: {Anchor(*oplog.head(), OPLOG)}")


def cmd_head(args: argparse.Namespace) -> int:
    _setup(args)
    _print_anchors()
    return 0


def _anchor_arg(text: str) -> Anchor:
    from gateway.archive.anchors import AnchorError, parse

    try:
        return parse(text)
    except AnchorError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_import(args: argparse.Namespace) -> int:
    from gateway.archive.importer import Progress, import_eml, import_imap, import_mbox

    cfg, archive = _setup(args)
    progress = Progress("import")
    max_size = cfg.archive.max_message_size
    direction = "outbound" if args.sent else "inbound"
    try:
        if args.mbox:
            result = import_mbox(archive, Path(args.mbox), employee=args.employee, direction=direction,
                                 max_size=max_size, progress=progress)
        elif args.imap_user:
            from gateway.archive.sync import Upstream

            password = os.environ.get("MAILGATE_IMPORT_PASSWORD") or getpass.getpass(f"password of {args.imap_user}: ")
            upstream = Upstream.from_config(cfg)
            if args.imap_host:
                upstream.host = args.imap_host
            if args.imap_port:
                upstream.port = args.imap_port
            if args.imap_security:
                upstream.security = args.imap_security
            result = import_imap(archive, upstream, args.imap_user, password, args.folder or [],
                                 employee=args.employee, max_size=max_size, progress=progress)
        elif args.paths:
            result = import_eml(archive, [Path(p) for p in args.paths], employee=args.employee, direction=direction,
                                max_size=max_size, progress=progress)
        else:
            print("mailgate archive import: give .eml files/folders, --mbox FILE or --imap-user LOGIN", file=sys.stderr)
            return 2
    except ValueError as exc:
        progress.close()  # a bar already on screen gets its line ended before the message
        print(f"mailgate archive import: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # IMAP connection / login
        progress.close()
        print(f"mailgate archive import: {exc}", file=sys.stderr)
        return 1
    progress.finish()
    for e in result.errors:
        print(f"skipped: {e}", file=sys.stderr)
    print(f"imported {result.seen} message(s): {result.new_records} new record(s), "
          f"{result.new_sightings} new sighting(s), {len(result.errors)} skipped")
    from gateway import oplog

    oplog.record(_actor(args), "archive.import", args.mbox or args.imap_user or ",".join(args.paths)[:400],
                 {"seen": result.seen, "new_records": result.new_records, "skipped": len(result.errors)})
    return 1 if result.errors else 0


def cmd_rotate_key(args: argparse.Namespace) -> int:
    from gateway import oplog
    from gateway.archive import chain, keys

    cfg, _ = _setup(args)
    new_id = keys.rotate(cfg.archive.key_file)
    chain.append_event("rotate-key", _actor(args), str(cfg.archive.key_file), {"key_id": new_id})
    oplog.record(_actor(args), "archive.rotate-key", str(cfg.archive.key_file), {"key_id": new_id})
    print(f"archive key {new_id} is now current in {cfg.archive.key_file}; keep every older line "
          "(old blobs need them); copy the file to every node.")
    return 0


def cmd_hold(args: argparse.Namespace) -> int:
    from gateway.archive.retention import HoldError, place_hold

    _setup(args)
    scope, target = ("record", str(args.record)) if args.record else \
        ("employee", args.employee) if args.employee else ("all", "*")
    if scope == "all" and not args.all:
        print("mailgate archive hold: give --record ID, --employee ADDRESS or --all", file=sys.stderr)
        return 2
    try:
        hold = place_hold(scope, target, args.reason, _actor(args))
    except HoldError as exc:
        print(f"mailgate archive hold: {exc}", file=sys.stderr)
        return 2
    print(f"hold {hold.id}: {hold.scope} {hold.target} — purges suspended until released")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from gateway.archive.retention import HoldError, release_hold

    _setup(args)
    try:
        hold = release_hold(args.hold_id, _actor(args), args.reason or "")
    except HoldError as exc:
        print(f"mailgate archive release: {exc}", file=sys.stderr)
        return 2
    print(f"hold {hold.id} released")
    return 0


def cmd_holds(args: argparse.Namespace) -> int:
    from gateway.archive.retention import active_holds

    _setup(args)
    for h in active_holds():
        print(f"{h.id}\t{h.scope}\t{h.target}\t{h.created_at:%Y-%m-%d}\t{h.created_by}\t{h.reason}")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from gateway.archive.retention import purge

    cfg, archive = _setup(args)
    configured = cfg.archive.retention_years
    if args.years is not None and (configured <= 0 or args.years < configured):
        # Retention is policy, set in the configuration; a command line may keep mail longer, never shorter.
        print(f"archive purge: --years {args.years} is shorter than [archive] retention_years = "
              f"{configured or 'keep forever'}; a purge may only keep mail longer than the configured "
              "retention", file=sys.stderr)
        return 2
    years = args.years if args.years is not None else configured
    if years <= 0:
        print("archive retention_years is 0: records are kept forever; nothing to purge")
        return 0
    result = purge(archive.store, years, _actor(args), dry_run=args.dry_run)
    verb = "would purge" if args.dry_run else "purged"
    print(f"{verb} {len(result.purged)} record(s) older than {years} years; {result.held} kept by legal hold")
    return 0


def add_parsers(sub) -> None:  # noqa: ANN001 - argparse's private subparsers action
    p = sub.add_parser("archive", help="compliance archive: verify, import, keys, legal hold, retention")
    asub = p.add_subparsers(dest="archive_command", required=True)

    v = asub.add_parser("verify", help="check the hash chain and every blob; non-zero exit on any problem")
    v.add_argument("--no-blobs", action="store_true", help="check the chain only (fast)")
    v.add_argument("--quiet", action="store_true", help="no progress output")
    v.add_argument("--anchor", action="append", type=_anchor_arg, metavar="SEQ:HASH|oplog:ID:HASH",
                   help="an anchor kept off-host (printed by an earlier verify or `archive head`); "
                        "the chain (oplog: the operation log) must still hold it (repeatable)")
    v.set_defaults(func=cmd_verify)

    hd = asub.add_parser("head", help="print the chain head and the operation log's end as anchor lines "
                         "(anchor: SEQ:HASH, anchor: oplog:ID:HASH) to keep off-host")
    hd.set_defaults(func=cmd_head)

    i = asub.add_parser("import", help="import existing mail: .eml files/folders, --mbox FILE, or an IMAP account")
    i.add_argument("paths", nargs="*", help=".eml files or folders (searched recursively)")
    i.add_argument("--mbox", help="an mbox file")
    i.add_argument("--imap-user", help="IMAP login to import (password: $MAILGATE_IMPORT_PASSWORD or prompt)")
    i.add_argument("--imap-host", help="IMAP server (default: [upstream] host)")
    i.add_argument("--imap-port", type=int, help="IMAP port (default: [upstream] imap_port)")
    i.add_argument("--imap-security", choices=["tls", "starttls", "none"], help="default: [upstream] imap_security")
    i.add_argument("--folder", action="append", help="IMAP folder to import (repeatable; default: all)")
    i.add_argument("--employee", help="the employee these messages belong to (e-mail address)")
    i.add_argument("--sent", action="store_true", help="files/mbox are sent mail (direction outbound)")
    i.set_defaults(func=cmd_import)

    r = asub.add_parser("rotate-key", help="add a new archive key for new blobs (old keys stay for reading)")
    r.set_defaults(func=cmd_rotate_key)

    h = asub.add_parser("hold", help="place a legal hold (suspends retention purges)")
    g = h.add_mutually_exclusive_group()
    g.add_argument("--record", type=int, help="an archive record id")
    g.add_argument("--employee", help="every message of this employee (e-mail address)")
    g.add_argument("--all", action="store_true", help="suspend every purge")
    h.add_argument("--reason", required=True, help="why (case number …)")
    h.add_argument("--actor", help="who places it (default: cli:<os user>)")
    h.set_defaults(func=cmd_hold)

    rl = asub.add_parser("release", help="release a legal hold")
    rl.add_argument("hold_id", type=int)
    rl.add_argument("--reason", default="")
    rl.add_argument("--actor")
    rl.set_defaults(func=cmd_release)

    hl = asub.add_parser("holds", help="list active legal holds")
    hl.set_defaults(func=cmd_holds)

    pg = asub.add_parser("purge", help="delete records past [archive] retention_years (not on hold); logged")
    pg.add_argument("--dry-run", action="store_true", help="only count")
    pg.add_argument("--years", type=int, help="keep mail longer than retention_years (never shorter)")
    pg.set_defaults(func=cmd_purge)

    gc = asub.add_parser("gc", help="remove blob files no record names (left by failed writes; listed by verify "
                         "as unreferenced), older than a limit; a chained event per batch")
    gc.add_argument("--older-than", required=True, metavar="AGE",
                    help="only files older than this: 90m, 12h, 7d, 2w (at least 1h)")
    gc.add_argument("--dry-run", action="store_true", help="only list them")
    gc.add_argument("--actor", help="who asks (default: cli:<os user>)")
    gc.set_defaults(func=cmd_gc)

    ri = asub.add_parser("reindex", help="index again the records whose index entry the indexer gave up on "
                         "(listed as warnings by verify)")
    ri.add_argument("--failed", action="store_true", required=True,
                    help="the records given up on (the only mode: the indexer retries every other one itself)")
    ri.add_argument("--record", type=int, action="append", help="only this record id (repeatable)")
    ri.add_argument("--actor", help="who asks (default: cli:<os user>)")
    ri.set_defaults(func=cmd_reindex)

    # --- search side: `mailgate archive search …` (gateway/archive/search_cli.py, owned by the search helper)
    search_cli = optional_module("gateway.archive.search_cli")
    if search_cli is not None:
        search_cli.add_parsers(asub)
