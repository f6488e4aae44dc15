"""Run a real Mailgate node as a subprocess (``mailgate run``), as a user would.

``GatewayProcess`` writes a config pointing at a DovecotUpstream, runs
``mailgate init`` in-process (keys, schema), starts ``python -m gateway.cli run``
and waits for its "mailgate ready" log line — no sleeps.  ``kill()`` sends
SIGKILL, ``stop()`` SIGTERM; ``start()`` again reuses the same data.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
from pathlib import Path

from gateway.demo.upstream import free_ports

REPO = Path(__file__).resolve().parents[2]


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, sections: dict[str, dict[str, object]]) -> None:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))


class GatewayProcess:
    log_level = "INFO"  # ``mailgate run --log-level``; set before start()

    def __init__(self, base_dir: Path, dovecot, overrides: dict[str, dict[str, object]] | None = None):
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.dovecot = dovecot
        ports = free_ports(6)
        self.submission_port, self.smtps_port, self.imap_port, self.imaps_port, self.metrics_port = ports[:5]
        self.panel_port = ports[5]
        sections: dict[str, dict[str, object]] = {
            "node": {"name": "test", "data_dir": "var"},
            "database": {"url": "sqlite:///var/mailgate.db"},
            "company": {"name": "ACME Trading", "domains": ["acme.test"], "language": "zh-CN"},
            "upstream": {
                "host": dovecot.host,
                "imap_port": dovecot.imaps_port,
                "imap_security": "tls",
                "submission_port": dovecot.submission_port,
                "submission_security": "starttls",
                "ca_file": str(dovecot.cert_path),
            },
            "smtp": {
                "listen": "127.0.0.1",
                "submission_port": self.submission_port,
                "smtps_port": self.smtps_port,
                "hostname": "gw.acme.test",
                "auth_fail_base_delay": 0.05,
                "auth_fail_max_delay": 0.5,
            },
            "relay": {
                "mode": "relay_account",
                "username": "relay@acme.test",
                "password": "relay-pw",
                "workers": 2,
                "retry_initial": 1,
                "poll_interval": 0.5,
            },
            "imap": {"listen": "127.0.0.1", "starttls_port": self.imap_port, "tls_port": self.imaps_port},
            "metrics": {"listen": "127.0.0.1", "port": self.metrics_port},
            "rules": {"dir": str(REPO / "rules")},
            "panel": {"listen": "127.0.0.1", "port": self.panel_port},
        }
        for name, values in (overrides or {}).items():
            sections.setdefault(name, {}).update(values)
        self.config_path = self.base_dir / "mailgate.toml"
        write_config(self.config_path, sections)
        self.proc: subprocess.Popen | None = None
        self.log_lines: list[str] = []
        self._ready = threading.Event()
        self._logged = threading.Condition()
        self._init()

    def _init(self) -> None:
        from gateway.cli import main

        assert main(["-c", str(self.config_path), "init"]) == 0

    @property
    def cert_path(self) -> Path:
        return self.base_dir / "certs" / "gateway.crt"

    def client_context(self) -> ssl.SSLContext:
        """A client's TLS context that trusts this gateway's certificate."""
        return ssl.create_default_context(cafile=str(self.cert_path))

    @property
    def db_url(self) -> str:
        return "sqlite:///" + str(self.base_dir / "var" / "mailgate.db")

    def start(self, timeout: float = 20.0) -> None:
        # An event of this process's own: the reader of a process killed just before (a restart)
        # sets its event when it reaches the end of that process's output, which must not pass
        # for "the new process is ready".
        self._ready = ready = threading.Event()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "-c", str(self.config_path), "run", "--log-level", self.log_level],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        threading.Thread(target=self._read_log, args=(self.proc, ready), daemon=True).start()
        atexit.register(self.kill)  # never leave a gateway behind, whatever the test did
        if not ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("gateway did not start:\n" + "\n".join(self.log_lines[-40:]))

    def _read_log(self, proc: subprocess.Popen, ready: threading.Event) -> None:
        for line in proc.stderr:
            with self._logged:
                self.log_lines.append(line.rstrip("\n"))
                self._logged.notify_all()
            if "mailgate ready" in line:
                ready.set()
        ready.set()  # process ended: wake a waiter so it can report

    def wait_for_log(self, text: str, after: int = 0, timeout: float = 20.0) -> str:
        """Wait until a log line (from index ``after`` on) contains ``text``; return it."""
        def found() -> str | None:
            return next((line for line in self.log_lines[after:] if text in line), None)

        with self._logged:
            if not self._logged.wait_for(lambda: found() is not None, timeout):
                raise TimeoutError(f"no log line with {text!r} within {timeout} s")
            return found()

    def log_text(self) -> str:
        return "\n".join(self.log_lines)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL: the gateway gets no chance to clean up."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def seeded(base: Path, dovecot: object, overrides: dict | None = None,
           rules: dict[str, str] | None = None) -> GatewayProcess:
    """A gateway in ``base/gw`` with the sample data (``.sample``: what seed() made), its
    database connected in this process; not started yet. ``rules``: more rule files (file
    name -> YAML) beside a copy of the repository's rules/."""
    from gateway.db import connect
    from gateway.demo.sample_data import seed

    overrides = dict(overrides or {})
    if rules:
        directory = base / "rules"
        shutil.copytree(REPO / "rules", directory)
        for name, text in rules.items():
            (directory / name).write_text(text)
        overrides["rules"] = {"dir": str(directory)}
    gw = GatewayProcess(base / "gw", dovecot, overrides)
    connect(gw.db_url)
    gw.sample = seed()
    return gw


def start_hooked(base: Path, dovecot: object, monkeypatch: object, sitecustomize: str, env: dict[str, str],
                 overrides: dict | None = None) -> GatewayProcess:
    """A started gateway with the sample data whose processes first run ``sitecustomize``
    (on their PYTHONPATH; ``env`` tells it what to do): a fault injected into the real
    gateway, where a monkeypatch of this process cannot reach.  Stop it after."""
    hooks = base / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(sitecustomize)
    monkeypatch.setenv("PYTHONPATH", str(hooks))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    gw = seeded(base, dovecot, overrides)
    gw.start()
    return gw
