"""`mailgate rules check|test` and `mailgate approvals list|show|approve|reject`.

``add_parsers(sub)`` registers both command groups on the main parser's
subparsers; gateway.cli calls it from ``build_parser``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway import config as config_mod


def _config(args: argparse.Namespace, required: bool) -> config_mod.Config | None:
    try:
        return config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        if required:
            for problem in exc.problems:
                print(f"mailgate: {problem}", file=sys.stderr)
            raise SystemExit(2) from None
        return None


def _rules_dir(args: argparse.Namespace, cfg: config_mod.Config | None) -> Path:
    if args.rules:
        return Path(args.rules)
    if cfg is None:
        cfg = _config(args, required=True)
    return cfg.rules.dir


def _env(cfg: config_mod.Config | None):  # noqa: ANN202 - RuleEnv, imported lazily
    from gateway.rules.env import RuleEnv
    from gateway.rules.loader import _SHARED_DEPARTMENTS, _SHARED_HISTORY

    if cfg is None:
        return None
    return RuleEnv(departments=_SHARED_DEPARTMENTS, history=_SHARED_HISTORY, company=cfg.company.name,
                   company_domains=tuple(cfg.company.domains))


def cmd_rules_check(args: argparse.Namespace) -> int:
    from gateway.rules.loader import load_rules

    cfg = _config(args, required=not args.rules)
    directory = _rules_dir(args, cfg)
    rules, errors = load_rules(directory, _env(cfg))
    for e in errors:
        print(e)
    if errors:
        print(f"{len(errors)} problem(s); the running gateway keeps its previous rules until they are fixed",
              file=sys.stderr)
        return 1
    for r in rules:
        print(f"ok  {r.priority:>4}  {r.mode:<7}  {r.name}  ({r.source})")
    print(f"{len(rules)} rules OK in {directory}")
    return 0


def _directory(cfg: config_mod.Config | None):  # noqa: ANN202 - Directory
    from gateway.config import PUBLIC_MAIL_DOMAINS
    from gateway.directory import Directory

    if cfg is None:
        print("note: no config, so no directory: every address is an unknown external one", file=sys.stderr)
        return Directory([], PUBLIC_MAIL_DOMAINS)
    from gateway.db import connect

    connect(cfg.database.url, migrate=False)
    directory = Directory(cfg.company.domains, cfg.public_mail_domains)
    directory.load()
    return directory


def cmd_rules_test(args: argparse.Namespace) -> int:
    from gateway.policy import Policy
    from gateway.rules.dryrun import build_message, dry_run, format_trace, make_context
    from gateway.rules.loader import load_rules

    cfg = _config(args, required=not args.rules)
    rules, errors = load_rules(_rules_dir(args, cfg), _env(cfg))
    if errors:
        for e in errors:
            print(e)
        return 1
    recipients = [a.strip() for value in args.to for a in value.split(",") if a.strip()]
    if args.eml:
        raw = Path(args.eml).read_bytes()
    else:
        raw = build_message(args.sender, recipients, args.subject, [Path(p) for p in args.attach])
    directory = _directory(cfg)
    ctx = make_context(raw, args.sender, recipients, directory, cfg.company.language if cfg else "en")
    policy = Policy(directory, rules)
    verdict = dry_run(policy, ctx)
    print(format_trace(ctx, verdict, policy))
    return 0


# -- approvals ------------------------------------------------------------------------


def _approval_service(args: argparse.Namespace):  # noqa: ANN202 - ApprovalService
    from gateway.approval import ApprovalService

    cfg = _config(args, required=True)
    return ApprovalService.from_config(cfg)


def cmd_approvals_list(args: argparse.Namespace) -> int:
    from gateway.approval import list_approvals

    _approval_service(args)
    rows = list_approvals(None if args.all else args.state)
    for row in rows:
        print(f"{row.id:>6}  {row.state:<9} {row.requested_at:%Y-%m-%d %H:%M}  {row.mail_from:<30} "
              f"{row.subject[:50]}")
    if not rows:
        print("no approvals")
    return 0


def cmd_approvals_show(args: argparse.Namespace) -> int:
    from gateway.approval import describe

    _approval_service(args)
    text = describe(args.id)
    if text is None:
        print(f"no approval {args.id}", file=sys.stderr)
        return 1
    print(text)
    return 0


def cmd_approvals_decide(args: argparse.Namespace) -> int:
    from gateway.approval import ApprovalError

    service = _approval_service(args)
    try:
        if args.approvals_command == "approve":
            service.approve(args.id, actor=args.actor)
        else:
            service.reject(args.id, actor=args.actor, reason=args.reason)
    except ApprovalError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return 1
    print(f"approval {args.id}: {args.approvals_command}d")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rules", help="check rule files, or dry-run a message through them")
    rsub = p.add_subparsers(dest="rules_command", required=True)
    c = rsub.add_parser("check", help="validate rules/*.yaml; non-zero exit with file:line on any error")
    c.add_argument("--rules", help="rules directory (default: [rules] dir of the config)")
    c.set_defaults(func=cmd_rules_check)
    t = rsub.add_parser("test", help="dry run: print every rule's hit or miss, the verdict and the mutations")
    t.add_argument("--rules", help="rules directory (default: [rules] dir of the config)")
    t.add_argument("--from", dest="sender", required=True, help="sender address (an employee's)")
    t.add_argument("--to", action="append", required=True, help="recipient(s), repeat or comma-separate")
    t.add_argument("--subject", default="(test)")
    t.add_argument("--attach", action="append", default=[], help="file to attach (repeatable)")
    t.add_argument("--eml", help="use this message file instead of building one")
    t.set_defaults(func=cmd_rules_test)

    p = sub.add_parser("approvals", help="messages held for approval (审核)")
    asub = p.add_subparsers(dest="approvals_command", required=True)
    a = asub.add_parser("list", help="list approvals (pending by default)")
    a.add_argument("--state", default="pending", choices=["pending", "approved", "rejected", "expired"])
    a.add_argument("--all", action="store_true", help="every state")
    a.set_defaults(func=cmd_approvals_list)
    a = asub.add_parser("show", help="show one approval")
    a.add_argument("id", type=int)
    a.set_defaults(func=cmd_approvals_show)
    a = asub.add_parser("approve", help="approve: the message goes on to its recipients")
    a.add_argument("id", type=int)
    a.add_argument("--actor", default="cli", help="who approves (recorded)")
    a.set_defaults(func=cmd_approvals_decide)
    a = asub.add_parser("reject", help="reject: the message is not sent; the sender is told why")
    a.add_argument("id", type=int)
    a.add_argument("--reason", required=True)
    a.add_argument("--actor", default="cli", help="who rejects (recorded)")
    a.set_defaults(func=cmd_approvals_decide)
