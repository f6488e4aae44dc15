"""Shared helpers for the end-to-end benchmarks in scripts/ (loopback only).

Processes: ``Children`` starts every helper in its own session and kills what is
left at the end (also after an error or Ctrl-C).  Postfix's test tools:
``Sink`` (smtp-sink, with a live message counter) and ``smtp_source``.  Targets
behind the sink: ``PostfixRelay`` (a private Postfix instance) and
``GatewayNode`` (``mailgate run`` as a subprocess).  ``/proc`` readers give
peak RSS; ``TreeSampler`` samples the memory (PSS) of a whole process tree.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback TCP ports that were free a moment ago."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


# -- /proc --------------------------------------------------------------------


def proc_status_kb(pid: int, key: str) -> int:
    """A ``kB`` value of /proc/PID/status (VmRSS, VmHWM …); 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def proc_pss_kb(pid: int) -> int:
    """Proportional set size (shared pages divided among their users); 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def proc_stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, ppid) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    state, ppid = text[text.rindex(")") + 2 :].split()[:2]
    return comm, state, int(ppid)


def cpu_seconds(pid: int, reaped_children: bool = False) -> float:
    """User + system CPU seconds of a process (all its threads); with ``reaped_children``
    also those of its children that have ended and were waited for.  0.0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(f) for f in fields[11 : 15 if reaped_children else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of a process tree: live members plus the children they reaped."""
    return sum(cpu_seconds(pid, reaped_children=True) for pid in process_tree(root))


def is_alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped does not count)."""
    stat = proc_stat(pid)
    return stat is not None and stat[1] != "Z"


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) and stat[1] != "Z":
            children.setdefault(stat[2], []).append(int(entry.name))
    tree, todo = [], [root] if is_alive(root) else []
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


class TreeSampler(threading.Thread):
    """Samples the summed PSS of a process tree every ``interval`` seconds.

    ``peak_kb`` is the largest sum seen; ``seen`` every (pid, comm) ever in the tree,
    so that the caller can check afterwards that none of them survived."""

    def __init__(self, root: Callable[[], int | None], interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_kb = 0
        self.seen: dict[int, str] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        root = self.root()
        if root is None:
            return
        total = 0
        for pid in process_tree(root):
            stat = proc_stat(pid)
            if stat is not None:
                self.seen.setdefault(pid, stat[0])
            total += proc_pss_kb(pid)
        self.peak_kb = max(self.peak_kb, total)

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join()

    def survivors(self) -> list[str]:
        return [
            f"{pid} {comm}" for pid, comm in self.seen.items()
            if is_alive(pid) and (stat := proc_stat(pid)) is not None and stat[0] == comm
        ]


# -- child processes ----------------------------------------------------------


class Children:
    """Every process the benchmark starts, plus cleanup callbacks; ``close`` ends them all."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.cleanups: list[Callable[[], None]] = []

    def spawn(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen:
        proc = subprocess.Popen(list(argv), start_new_session=True, **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    @staticmethod
    def terminate(proc: subprocess.Popen, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL to the process group after ``grace`` seconds."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything left in its session
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()

    def close(self) -> None:
        for cleanup in reversed(self.cleanups):
            try:
                cleanup()
            except Exception as exc:  # keep cleaning up the rest
                print(f"cleanup failed: {exc}", file=sys.stderr)
        self.cleanups.clear()
        for proc in reversed(self.procs):
            self.terminate(proc, grace=5.0)
        self.procs.clear()


# -- Postfix's test tools -----------------------------------------------------

_MESG = re.compile(rb"mesg=(\d+)\s")  # a complete counter, not one cut off by a read


class Sink:
    """``smtp-sink -c`` on a loopback port; ``count`` follows its message counter live.

    ``announce_auth=False`` passes ``-a``: smtp-sink then offers no AUTH (it
    otherwise answers any AUTH with 250, which is not a login success)."""

    def __init__(self, children: Children, port: int, announce_auth: bool = False) -> None:
        self.port = port
        self.count = 0
        self.history: list[tuple[int, float]] = []  # (count, monotonic time it was read)
        self._changed = threading.Condition()
        argv = ["smtp-sink", "-c", "-u", "nobody", f"{HOST}:{port}", "256"]
        if not announce_auth:
            argv.insert(1, "-a")
        self.proc = children.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        threading.Thread(target=self._read, daemon=True).start()
        if not wait_until(self._listening, 5.0):
            raise RuntimeError(f"smtp-sink did not start on port {port}")

    def _listening(self) -> bool:
        try:
            socket.create_connection((HOST, self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd, tail = self.proc.stdout.fileno(), b""
        while chunk := os.read(fd, 65536):
            tail = (tail + chunk)[-256:]
            if found := _MESG.findall(tail):
                now = time.monotonic()
                with self._changed:
                    self.count = int(found[-1])
                    self.history.append((self.count, now))
                    self._changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> float | None:
        """Block until the sink has counted ``count`` messages; the monotonic time it did."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.count < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)
            return next(at for seen, at in self.history if seen >= count)

    def settle(self, quiet: float = 1.0) -> int:
        """The count once nothing has arrived for ``quiet`` seconds (late duplicates)."""
        with self._changed:
            while self._changed.wait(quiet):
                pass
            return self.count


def smtp_source(
    port: int, messages: int, sessions: int, size: int, sender: str, recipient: str, timeout: float,
    children: Children,
) -> tuple[bool, str]:
    """Send ``messages`` messages with smtp-source; (finished cleanly, its output)."""
    argv = ["smtp-source", "-s", str(sessions), "-l", str(size), "-m", str(messages),
            "-f", sender, "-t", recipient, f"{HOST}:{port}"]
    proc = children.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        Children.terminate(proc, grace=1.0)
        return False, f"smtp-source still running after {timeout:.0f} s"
    return proc.returncode == 0, out.strip()


# -- a private Postfix instance relaying everything to a sink -----------------

POSTFIX_MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n -  - trivial-rewrite
bounce    unix  - - n -  0 bounce
defer     unix  - - n -  0 bounce
trace     unix  - - n -  0 bounce
verify    unix  - - n -  1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -  - proxymap
smtp      unix  - - n -  - smtp
relay     unix  - - n -  - smtp
showq     unix  n - n -  - showq
error     unix  - - n -  - error
retry     unix  - - n -  - error
discard   unix  - - n -  - discard
anvil     unix  - - n -  1 anvil
scache    unix  - - n -  1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PostfixRelay:
    """``postfix -c DIR start`` with its own config, queue and log under ``base``.

    Accepts from 127.0.0.0/8 on ``port`` and relays everything to
    [127.0.0.1]:``relay_port``.  Nothing of the system's Postfix is used or touched
    (there is no /etc/postfix/main.cf on this machine, no syslog, no systemd)."""

    def __init__(self, base: Path, port: int, relay_port: int) -> None:
        self.base, self.port = base, port
        self.conf = base / "etc"
        for sub in ("etc", "queue", "data"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)
        self.maillog = base / "maillog"
        (self.conf / "main.cf").write_text(
            "compatibility_level = 3.6\n"
            f"queue_directory = {base / 'queue'}\n"
            f"data_directory = {base / 'data'}\n"
            "mail_owner = postfix\nsetgid_group = postdrop\n"
            "myhostname = postfix-bench.localdomain\nmydestination =\n"
            "inet_interfaces = loopback-only\ninet_protocols = ipv4\n"
            "mynetworks = 127.0.0.0/8\nsmtpd_relay_restrictions = permit_mynetworks, reject\n"
            f"relayhost = [{HOST}]:{relay_port}\n"
            f"maillog_file = {self.maillog}\nmaillog_file_prefixes = {base}\n"
            "alias_maps =\nalias_database =\nlocal_recipient_maps =\nsmtputf8_enable = no\n"
            "smtp_tls_security_level = none\nsmtpd_tls_security_level = none\n"
        )
        (self.conf / "master.cf").write_text(POSTFIX_MASTER_CF.format(listen=f"{HOST}:{port}"))

    def _postfix(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["postfix", "-c", str(self.conf), *args], capture_output=True, text=True, timeout=60)

    @property
    def master_pid(self) -> int | None:
        try:
            pid = int((self.base / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if is_alive(pid) else None

    def start(self) -> None:
        for step in (("check",), ("set-permissions",), ("start",)):
            done = self._postfix(*step)
            if done.returncode != 0:
                raise RuntimeError(f"postfix {' '.join(step)} failed: {done.stderr.strip()}\n{self.log_tail()}")
        if not wait_until(lambda: self.master_pid is not None, 10.0):
            raise RuntimeError("postfix master did not start\n" + self.log_tail())

    def stop(self) -> None:
        """``postfix stop``; ``abort`` and SIGKILL to the tree if it lingers."""
        master = self.master_pid
        if master is None:
            return
        self._postfix("stop")
        if wait_until(lambda: not is_alive(master), 15.0):
            return
        self._postfix("abort")
        for pid in process_tree(master):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def log_tail(self, lines: int = 10) -> str:
        try:
            return "\n".join(self.maillog.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# -- a Mailgate node ----------------------------------------------------------


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_toml(path: Path, sections: dict[str, dict[str, object]]) -> None:
    lines: list[str] = []
    for name, values in sections.items():
        lines += [f"[{name}]", *(f"{k} = {toml_value(v)}" for k, v in values.items()), ""]
    path.write_text("\n".join(lines))


class GatewayNode:
    """``mailgate init`` + ``python -m gateway.cli -c CFG run`` in ``base``; log in ``base/mailgate.log``."""

    def __init__(self, children: Children, base: Path, sections: dict[str, dict[str, object]]) -> None:
        self.children, self.base = children, base
        base.mkdir(parents=True, exist_ok=True)
        self.config = base / "mailgate.toml"
        self.log = base / "mailgate.log"
        self.db = base / "var" / "mailgate.db"
        write_toml(self.config, sections)
        self.proc: subprocess.Popen | None = None

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "gateway.cli", "-c", str(self.config), *args]

    def start(self, timeout: float = 30.0, python_args: Sequence[str] = ()) -> None:
        init = subprocess.run(self._cli("init"), cwd=REPO, capture_output=True, text=True, timeout=120)
        if init.returncode != 0:
            raise RuntimeError(f"mailgate init failed:\n{init.stdout}{init.stderr}")
        argv = self._cli("run", "--log-level", "INFO")
        argv[1:1] = python_args
        with self.log.open("wb") as log:
            self.proc = self.children.spawn(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        ready = wait_until(lambda: "mailgate ready" in self.log_text() or self.proc.poll() is not None, timeout)
        if not ready or self.proc.poll() is not None:
            raise RuntimeError("mailgate did not start:\n" + self.log_tail(40))

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 10) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def peak_rss_kb(self) -> int:
        """Peak RSS of the node plus its children (the relay process)."""
        if not self.proc:
            return 0
        return sum(proc_status_kb(pid, "VmHWM") for pid in process_tree(self.proc.pid))

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        Children.terminate(self.proc, grace=20.0)
        return self.proc.returncode
