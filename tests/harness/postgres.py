"""A private PostgreSQL cluster on a free loopback port, from Debian's binaries.

The cluster lives in ``BASE/data`` (log in ``BASE/postgres.log``), accepts only TCP on
127.0.0.1 with ``trust`` auth, and runs with fsync off: it is for tests only.
As root the server runs as the ``postgres`` system user (``runuser``), which must be
able to traverse BASE's parents (see :func:`tests.harness.shared_tempdir`).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path
from types import TracebackType

from gateway.demo.upstream import HOST, free_ports

INITDB_OPTIONS = ("--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions")
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/VERSION/bin that has initdb and pg_ctl."""
    found = [
        p.parent
        for p in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")
        if (p.parent / "initdb").exists() and p.parent.parent.name.isdigit()
    ]
    return max(found, key=lambda p: int(p.parent.name), default=None)


def available() -> bool:
    """True if a private cluster can be run here (binaries, and runuser when root)."""
    if bin_dir() is None:
        return False
    if os.geteuid() != 0:
        return True
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return False
    return shutil.which("runuser") is not None


class PostgresServer:
    """initdb + pg_ctl start/stop of a throw-away cluster."""

    host = HOST
    user = "postgres"

    def __init__(
        self,
        base_dir: Path,
        port: int | None = None,
        dbname: str = "mailgate",
        start_timeout: int = 60,
    ) -> None:
        found = bin_dir()
        if found is None:
            raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql")
        self.bin_dir = found
        self.base_dir = Path(base_dir).resolve()
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "postgres.log"
        self.port = port or free_ports(1)[0]
        self.dbname = _check_name(dbname)
        self.start_timeout = start_timeout
        self._root = os.geteuid() == 0

    @property
    def url(self) -> str:
        """URL of the default database, e.g. postgresql://postgres@127.0.0.1:PORT/mailgate."""
        return self.url_for(self.dbname)

    def url_for(self, dbname: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def start(self) -> None:
        """initdb (first time only), start the server, create the default database."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self._root:
            account = pwd.getpwnam(self.user)
            os.chown(self.base_dir, account.pw_uid, account.pw_gid)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run_server_tool("initdb", "-D", str(self.data_dir), "-U", self.user, *INITDB_OPTIONS)
        options = (
            f"-c listen_addresses={self.host} -p {self.port} -c unix_socket_directories=''"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._pg_ctl("-l", str(self.log_path), "-o", options, "start")
        if self.dbname not in self._databases():
            self.create_database(self.dbname)

    def stop(self) -> None:
        """Fast shutdown; returns when the postmaster is gone."""
        if (self.data_dir / "postmaster.pid").exists():
            self._pg_ctl("-m", "fast", "stop")

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def create_database(self, name: str, lc_ctype: str | None = None) -> str:
        """Create database `name` (lower-case identifier) and return its URL; ``lc_ctype``
        gives it its own character classification (from template0, e.g. "C.UTF-8")."""
        locale = ("--template=template0", f"--lc-ctype={lc_ctype}") if lc_ctype else ()
        self._client("createdb", *locale, _check_name(name))
        return self.url_for(name)

    def drop_database(self, name: str, force: bool = False) -> None:
        """Drop ``name`` if it exists; ``force``: end the connections still open to it first."""
        self._client("dropdb", "--if-exists", *(("--force",) if force else ()), _check_name(name))

    def _databases(self) -> list[str]:
        out = self._client("psql", "-d", "postgres", "-At", "-c", "SELECT datname FROM pg_database")
        return out.split()

    def _client(self, tool: str, *args: str) -> str:
        cmd = [str(self.bin_dir / tool), "-h", self.host, "-p", str(self.port), "-U", self.user]
        return _run([*cmd, *args])

    def _pg_ctl(self, *args: str) -> None:
        self._run_server_tool("pg_ctl", "-D", str(self.data_dir), "-w", "-t", str(self.start_timeout), *args)

    def _run_server_tool(self, tool: str, *args: str) -> str:
        cmd = [str(self.bin_dir / tool), *args]
        if self._root:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return _run(cmd, cwd=self.base_dir)


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a plain lower-case database name: {name!r}")
    return name


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout
