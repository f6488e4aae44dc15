"""`mailgate distribute run|status|check|dispatch|reject|map|history`."""

from __future__ import annotations

import argparse
import getpass
import logging
import signal
import sys

from gateway import config as config_mod


def _config(args: argparse.Namespace) -> config_mod.Config:
    try:
        return config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        for problem in exc.problems:
            print(f"mailgate: {problem}", file=sys.stderr)
        raise SystemExit(2) from None


def _db(args: argparse.Namespace) -> config_mod.Config:
    from gateway.db import connect

    cfg = _config(args)
    connect(cfg.database.url)
    return cfg


def _actor(args: argparse.Namespace) -> str:
    return getattr(args, "actor", "") or f"cli:{getpass.getuser()}"


def cmd_run(args: argparse.Namespace) -> int:
    """The watchers alone (no SMTP/IMAP/relay: queued forwards go out with a node's relay)."""
    from gateway.directory import Directory
    from gateway.distribute.service import RulesError, Runner
    from gateway.logformat import use_formatter
    from gateway.spool import Spool

    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    use_formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")  # tracebacks without row values
    cfg = _db(args)
    if not cfg.distribution.mailboxes or not cfg.distribution.master_user:
        print("mailgate: [distribution] mailboxes and master_user are needed", file=sys.stderr)
        return 2
    directory = Directory(cfg.company.domains, cfg.public_mail_domains)
    directory.load()
    runner = Runner(cfg, directory, Spool(cfg.spool_dir, node="" if cfg.node.shared_spool else cfg.node.name),
                    refresh_directory=True)
    try:
        runner.start()
    except RulesError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return 1
    logging.getLogger("mailgate.distribute").info("distribution ready: %s", ", ".join(cfg.distribution.mailboxes))

    def stop(signum: int, frame: object) -> None:
        runner.stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not runner.stop_event.wait(0.5):
        pass
    runner.stop()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from gateway.distribute import manage
    from gateway.distribute.schema import DistCheckpoint

    cfg = _db(args)
    print(f"enabled: {cfg.distribution.enabled}; mailboxes: {', '.join(cfg.distribution.mailboxes) or '-'}")
    for cp in DistCheckpoint.select().order_by(DistCheckpoint.mailbox):
        print(f"checkpoint {cp.mailbox}/{cp.folder}: UIDVALIDITY {cp.uidvalidity}, last UID {cp.last_uid} "
              f"({cp.updated_at:%Y-%m-%d %H:%M:%S} UTC)")
    counts = manage.counts()
    print("records: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) if counts else "records: none")
    rows, total = manage.history(manage.HistoryFilter(state="undistributed"), limit=args.limit)
    if total:
        print(f"undistributed ({total}):")
        for r in rows:
            print(f"  #{r.id}  {r.decided_at:%Y-%m-%d %H:%M}  {r.from_addr}  {r.subject[:70]}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from gateway.distribute.rules import load

    cfg = _config(args)
    ruleset, errors = load(args.rules or cfg.distribution.rules_dir)
    for e in errors:
        print(e)
    if errors:
        return 1
    for r in ruleset.rules:
        print(f"ok  {r.priority:>4}  {r.name}  -> {r.to or 'group ' + r.group}  ({r.source})")
    print(f"{len(ruleset.rules)} distribution rules, {len(ruleset.groups)} groups OK")
    return 0


def cmd_dispatch(args: argparse.Namespace) -> int:
    from gateway.distribute import manage
    from gateway.distribute.engine import DispatchError

    cfg = _db(args)
    try:
        manage.dispatch(cfg, args.id, args.employee, _actor(args), args.note)
    except (DispatchError, manage.ManageError) as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return 1
    print(f"#{args.id} dispatched to {args.employee}")
    return 0


def cmd_reject(args: argparse.Namespace) -> int:
    from gateway.distribute import manage
    from gateway.distribute.schema import DistReject

    _db(args)
    try:
        if args.action == "add":
            manage.add_reject(args.value, _actor(args), args.note)
        elif args.action == "remove":
            if not manage.remove_reject(args.value, _actor(args)):
                print(f"mailgate: {args.value} is not on the reject list", file=sys.stderr)
                return 1
    except manage.ManageError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return 1
    if args.action == "list":
        for row in DistReject.select().order_by(DistReject.key):
            print(f"{row.key}\t{row.created_by}\t{row.note}")
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    from gateway.db.models import Employee
    from gateway.distribute import manage
    from gateway.distribute.schema import DistMapping

    _db(args)
    try:
        if args.action == "add":
            if not args.employee:
                print("mailgate: map add needs VALUE EMPLOYEE", file=sys.stderr)
                return 2
            manage.set_mapping(args.value, args.employee, _actor(args))
        elif args.action == "remove":
            if not manage.remove_mapping(args.value, _actor(args)):
                print(f"mailgate: no mapping for {args.value}", file=sys.stderr)
                return 1
    except manage.ManageError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return 1
    if args.action == "list":
        for key, email in DistMapping.select(DistMapping.key, Employee.email).join(Employee).tuples():
            print(f"{key}\t{email}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from gateway.distribute import manage

    _db(args)
    try:
        rows, total = manage.history(manage.HistoryFilter(state=args.state, step=args.step, employee=args.employee,
                                                          sender=args.sender), limit=args.limit)
    except manage.ManageError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return 1
    to = manage.recipients_of(rows)
    for r in rows:
        print(f"#{r.id}\t{r.decided_at:%Y-%m-%d %H:%M:%S}\t{r.state}\t{r.step}\t{r.from_addr}\t"
              f"{','.join(to.get(r.id, [])) or '-'}\t{r.reason}")
    print(f"{len(rows)} of {total}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distribute", help="shared-mailbox distribution (邮件分发)")
    dsub = p.add_subparsers(dest="distribute_command", required=True)

    q = dsub.add_parser("run", help="run the shared-mailbox watchers alone, until SIGTERM")
    q.add_argument("--log-level", default="INFO")
    q.set_defaults(func=cmd_run)

    q = dsub.add_parser("status", help="checkpoints, counts and the undistributed list")
    q.add_argument("--limit", type=int, default=20)
    q.set_defaults(func=cmd_status)

    q = dsub.add_parser("check", help="check the distribution rule files (file:line errors)")
    q.add_argument("--rules", help="rule folder (default: [distribution] rules_dir)")
    q.set_defaults(func=cmd_check)

    q = dsub.add_parser("dispatch", help="send an undistributed message to an employee")
    q.add_argument("id", type=int, help="the record number (see status)")
    q.add_argument("employee", help="the employee's address")
    q.add_argument("--note", default="")
    q.add_argument("--actor", default="", help="who does it (default: cli:<user>)")
    q.set_defaults(func=cmd_dispatch)

    q = dsub.add_parser("reject", help="the reject list (拒收): addresses and domains moved to Junk")
    q.add_argument("action", choices=["add", "remove", "list"])
    q.add_argument("value", nargs="?", default="")
    q.add_argument("--note", default="")
    q.add_argument("--actor", default="")
    q.set_defaults(func=cmd_reject)

    q = dsub.add_parser("map", help="always send an address or domain to an employee")
    q.add_argument("action", choices=["add", "remove", "list"])
    q.add_argument("value", nargs="?", default="")
    q.add_argument("employee", nargs="?", default="")
    q.add_argument("--actor", default="")
    q.set_defaults(func=cmd_map)

    q = dsub.add_parser("history", help="distribution history, newest first")
    q.add_argument("--state", default="")
    q.add_argument("--step", default="")
    q.add_argument("--employee", default="")
    q.add_argument("--sender", default="")
    q.add_argument("--limit", type=int, default=50)
    q.set_defaults(func=cmd_history)
