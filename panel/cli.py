"""`mailgate panel serve | adduser | passwd | users`."""

from __future__ import annotations

import argparse
import getpass
import sys

from gateway import config as config_mod


def _config(path: str) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        for problem in exc.problems:
            print(f"mailgate: {problem}", file=sys.stderr)
        raise SystemExit(2) from None


def _connect(cfg: config_mod.Config) -> None:
    from gateway.db import connect

    cfg.node.data_dir.mkdir(parents=True, exist_ok=True)
    connect(cfg.database.url)


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("New password: ")
    if first != getpass.getpass("Repeat it: "):
        raise SystemExit("mailgate: the two passwords differ")
    return first


def _roles(values: list[str]) -> set[str]:
    return {r.strip() for v in values for r in v.split(",") if r.strip()}


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.cli import _setup_logging

    cfg = _config(args.config)
    _setup_logging(args.log_level)
    if args.port:
        cfg.panel.port = args.port
    _connect(cfg)
    from twisted.internet import reactor

    from panel.server import listen

    try:
        server = listen(cfg, reactor)
    except Exception as exc:  # noqa: BLE001 - port in use, TLS files missing: one clear line
        print(f"mailgate: panel cannot start: {exc}", file=sys.stderr)
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", server.stop_blocking)
    reactor.run()
    return 0


def cmd_adduser(args: argparse.Namespace) -> int:
    from gateway import oplog
    from panel.auth import create_local_account

    cfg = _config(args.config)
    _connect(cfg)
    password = _read_password(args)
    try:
        acct = create_local_account(args.login, password, _roles(args.role), args.name or "")
    except ValueError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return 1
    oplog.record("cli", "panel.account.create", "local:" + acct.login, {"roles": acct.roles})
    print(f"local account {acct.login} created with roles {acct.roles}")
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    from gateway import oplog
    from panel import sessions
    from panel.auth import WeakPassword, set_local_password
    from panel.schema import LocalAccount

    cfg = _config(args.config)
    _connect(cfg)
    acct = LocalAccount.get_or_none(LocalAccount.login == args.login)
    if acct is None:
        print(f"mailgate: no local account {args.login!r} (employees change their mail password upstream)",
              file=sys.stderr)
        return 1
    try:
        set_local_password(acct, _read_password(args))
    except WeakPassword as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return 1
    ended = sessions.delete_for_user("local", acct.id)
    oplog.record("cli", "panel.account.passwd", "local:" + acct.login)
    print(f"password of {acct.login} changed; {ended} session(s) signed out")
    return 0


def cmd_users(args: argparse.Namespace) -> int:
    from panel.schema import LocalAccount

    cfg = _config(args.config)
    _connect(cfg)
    for acct in LocalAccount.select().order_by(LocalAccount.login):
        state = "active" if acct.active else "inactive"
        print(f"{acct.login:<20} {state:<8} {acct.roles:<30} {acct.name}")
    return 0


def cmd_pool_sweep(args: argparse.Namespace) -> int:
    """Apply the public pool's automatic return rules now ([panel] pool_*)."""
    from panel.pool import PoolRules, due, sweep

    cfg = _config(args.config)
    _connect(cfg)
    rules = PoolRules.from_config(cfg.panel)
    if not rules.active:
        print("pool auto-return is off ([panel] pool_auto_return); nothing done")
        return 0
    if args.dry_run:
        for cid, reason in due(rules, _utcnow()):
            print(f"customer:{cid}\t{reason}")
        return 0
    print(f"{sweep(rules)} customers returned to the public pool")
    return 0


def _utcnow():  # noqa: ANN202
    from gateway.db.models import utcnow

    return utcnow()


def add_parsers(sub: argparse._SubParsersAction) -> None:
    panel = sub.add_parser("panel", help="the web panel: serve it alone, manage local accounts")
    psub = panel.add_subparsers(dest="panel_command", required=True)

    p = psub.add_parser("serve", help="serve the panel alone (without the mail services)")
    p.add_argument("--port", type=int, default=0, help="override [panel] port")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_serve)

    p = psub.add_parser("adduser", help="create a local account (administrator, auditor)")
    p.add_argument("login")
    p.add_argument("--role", action="append", required=True,
                   help="salesperson, dept_head, crm_admin, auditor or it_admin (repeat or comma-separate)")
    p.add_argument("--name", default="")
    p.add_argument("--password-stdin", action="store_true", help="read the password from the first stdin line")
    p.set_defaults(func=cmd_adduser)

    p = psub.add_parser("passwd", help="set a local account's password (signs its sessions out)")
    p.add_argument("login")
    p.add_argument("--password-stdin", action="store_true", help="read the password from the first stdin line")
    p.set_defaults(func=cmd_passwd)

    p = psub.add_parser("users", help="list the local accounts")
    p.set_defaults(func=cmd_users)

    p = psub.add_parser("pool-sweep", help="return customers to the public pool by the [panel] pool_* rules now")
    p.add_argument("--dry-run", action="store_true", help="list who would go back, change nothing")
    p.set_defaults(func=cmd_pool_sweep)
