"""The ``mailgate`` command: init, run, check, demo (and more as areas grow)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from gateway import config as config_mod

EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "mailgate.toml"
SHIPPED_RULES = Path(__file__).resolve().parent.parent / "rules"
DEFAULT_CONFIG = os.environ.get("MAILGATE_CONFIG", "mailgate.toml")


def _setup_logging(level: str = "INFO") -> None:
    from gateway.logformat import use_formatter

    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    use_formatter("%(asctime)s %(name)s %(levelname)s %(message)s")  # tracebacks without row values
    # aiosmtpd logs every session at INFO; our own one-line-per-transaction log replaces it.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    # No format of ours prints a record's caller, thread or process, and finding the caller
    # walks the stack for every line (one per message and per relay outcome): the logging
    # HOWTO's "Optimization" switches.
    logging._srcfile = None  # noqa: SLF001 - the documented switch
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def _load(path: str) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        for problem in exc.problems:
            print(f"mailgate: {problem}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_init(args: argparse.Namespace) -> int:
    from gateway.credentials import load_or_create_key
    from gateway.db import connect
    from gateway.keys import make_dkim_keys, make_self_signed

    path = Path(args.config)
    if not path.exists():
        if not EXAMPLE_CONFIG.exists():
            print(f"mailgate: example config {EXAMPLE_CONFIG} is missing", file=sys.stderr)
            return 2
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(EXAMPLE_CONFIG, path)
        print(f"wrote {path} from the example; edit it, then run `mailgate check`")
    cfg = _load(str(path))
    cfg.node.data_dir.mkdir(parents=True, exist_ok=True)
    connect(cfg.database.url)
    print(f"database ready: {cfg.database.url.split('@')[-1]}")
    if not cfg.tls.cert.exists() or not cfg.tls.key.exists():
        make_self_signed(cfg.tls.cert, cfg.tls.key, cfg.smtp.hostname)
        print(f"self-signed TLS certificate: {cfg.tls.cert}")
    dkim_dir = cfg.tls.cert.parent / "dkim"
    selector = "mailgate"
    if not (dkim_dir / f"{selector}-rsa.key").exists():
        dkim_dir.mkdir(parents=True, exist_ok=True)
        make_dkim_keys(dkim_dir, selector, cfg.company.domains[0])
        print(f"DKIM keys: {dkim_dir} (publish the records in {dkim_dir / (selector + '.dns')})")
    if not cfg.rules.dir.exists() and SHIPPED_RULES.is_dir():
        shutil.copytree(SHIPPED_RULES, cfg.rules.dir)
        print(f"rules: copied the shipped rule files to {cfg.rules.dir}")
    load_or_create_key(cfg.relay.credentials_key)
    return 0


def use_multiprocess_metrics(directory: Path) -> None:
    """Counters shared by the node's processes (relay child included); must run
    before prometheus_client is imported.  Old files are from a previous run."""
    if "prometheus_client" in sys.modules and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return  # too late in this process (e.g. the demo after a test import); keep single-process
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.db import connect
    from gateway.service import run

    cfg = _load(args.config)
    _setup_logging(args.log_level)
    if cfg.relay.process == "separate" or cfg.smtp.processes > 1:
        use_multiprocess_metrics(cfg.node.data_dir / "metrics")
    connect(cfg.database.url)
    return run(cfg)


def cmd_check(args: argparse.Namespace) -> int:
    from gateway.checks import config_warnings, run_checks

    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        for problem in exc.problems:
            print(f"FAIL config: {problem}")
        return 1
    problems = run_checks(cfg, network=not args.offline)
    for line in config_warnings(cfg):  # valid, probably not what was meant: said, not failed
        print(f"WARN {line}")
    for line in problems:
        print(f"FAIL {line}")
    if not problems:
        print("OK: config, database, TLS, rules and upstream all good")
    return 1 if problems else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo.run import run_demo

    _setup_logging(args.log_level)
    return run_demo(Path(args.dir), args.port_base)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailgate", description="Mailgate: IMAP/SMTP gateway for sales teams")
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create config (from the example), DB schema, TLS certificate, DKIM keys")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("run", help="run all services of one node until SIGTERM")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="check config, rules, DB and upstream; non-zero exit on any problem")
    p.add_argument("--offline", action="store_true", help="skip the upstream reachability checks")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("demo", help="run a demo: private Dovecot upstream, sample data, the gateway")
    p.add_argument("--dir", default="var/demo", help="where the demo keeps its files (default: %(default)s)")
    p.add_argument("--port-base", type=int, default=10000,
                   help="gateway ports are base+587, base+465 …, the web panel base+8080")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_demo)
    from gateway.areas import AREA_CLIS, optional_module

    for name in AREA_CLIS:
        module = optional_module(name)
        if module is not None:
            module.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
