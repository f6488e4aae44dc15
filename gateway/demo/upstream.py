"""A private Dovecot 2.3 instance on loopback ports, for tests and demos.

Everything lives under one base directory::

    BASE/dovecot.conf      generated configuration
    BASE/passwd.d/ADDRESS  passwd-file of each user (one file each: see add_user)
    BASE/masters           passwd-file of the master user
    BASE/tls/              self-signed cert.pem (CA:TRUE, localhost, 127.0.0.1) and key.pem
    BASE/run/              Dovecot base_dir (sockets, master.pid)
    BASE/state/            Dovecot state_dir
    BASE/dovecot.log       every Dovecot log line
    BASE/mail/DOMAIN/USER  Maildir of each user

Started as root, mail is owned by the ``dovecot`` system user (Dovecot refuses
uid 0), so that user must be able to traverse BASE's parent directories.
"""

from __future__ import annotations

import datetime as dt
import grp
import ipaddress
import os
import pwd
import select
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from string import Template
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOST = "127.0.0.1"
REVISION_FIELD = "mailgate_rev"  # harmless passdb extra field, see add_user


def free_ports(count: int, host: str = HOST) -> list[int]:
    """Return `count` distinct TCP ports that were free on `host` a moment ago."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def make_self_signed_cert(cert_path: Path, key_path: Path, days: int = 30) -> None:
    """Write a self-signed P-256 cert for localhost/127.0.0.1, usable as its own CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _atomic_write(path: Path, text: str, mode: int, gid: int = -1) -> None:
    """Replace `path` by a temp file + rename, with an mtime that differs (in whole seconds)
    from the old file's, so Dovecot's passwd-file sees the change even within one second."""
    old_mtime = int(path.stat().st_mtime) if path.exists() else 0
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chown(tmp, -1, gid)
    os.chmod(tmp, mode)
    mtime = max(int(time.time()), old_mtime + 1)
    os.utime(tmp, (mtime, mtime))
    os.replace(tmp, path)


def _children(pid: int) -> dict[int, str]:
    """Direct children of `pid` and their names, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, _, rest = stat.partition(" (")[2].rpartition(")")
        if int(rest.split()[1]) == pid:
            found[int(entry.name)] = name
    return found


def open_pidfds(pids: Iterable[int]) -> dict[int, int]:
    """Map pidfd -> pid for the processes that still exist."""
    fds: dict[int, int] = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass
    return fds


def wait_pidfds(fds: Mapping[int, int], timeout: float) -> dict[int, int]:
    """Wait (poll on pidfds, no sleeping) until the processes exit; return those left."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    waiting = set(fds)
    deadline = time.monotonic() + timeout
    while waiting and (left := deadline - time.monotonic()) > 0:
        for fd, _ in poller.poll(left * 1000):
            poller.unregister(fd)
            waiting.discard(fd)
    return {fd: fds[fd] for fd in waiting}


def terminate(pid: int, timeout: float = 10.0, last: Iterable[str] = ()) -> None:
    """SIGTERM a daemon and its children, wait for them to exit, SIGKILL what is left.

    Children named in `last` are signalled only once the others are gone.
    """
    last = set(last)
    children = _children(pid)
    fds = open_pidfds([pid, *children])  # before signalling: nothing slips away
    try:
        _kill([pid], signal.SIGTERM)
        children.update(_children(pid))
        fds.update(open_pidfds(set(children) - set(fds.values())))
        early = {fd: p for fd, p in fds.items() if p in children and children[p] not in last}
        _kill(early.values(), signal.SIGTERM)
        deadline = time.monotonic() + timeout
        wait_pidfds(early, timeout)
        _kill([p for p, name in children.items() if name in last], signal.SIGTERM)
        left = wait_pidfds(fds, max(deadline - time.monotonic(), 0.1))
        if left:
            _kill(left.values(), signal.SIGKILL)
            wait_pidfds(left, timeout)
    finally:
        for fd in fds:
            os.close(fd)


def _kill(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


_CONFIG = Template(r"""# Generated by gateway.demo.upstream: a private test instance.
base_dir = $run_dir
state_dir = $state_dir
log_path = $log_path
protocols = $protocols
listen = $host
hostname = localhost
verbose_proctitle = yes

ssl = yes
ssl_cert = <$cert_path
ssl_key = <$key_path
login_trusted_networks = 127.0.0.0/8 ::1

auth_mechanisms = plain login
auth_failure_delay = 0
auth_verbose = yes
auth_master_user_separator = *
passdb {
  driver = passwd-file
  args = $masters_path
  master = yes
  pass = yes
}
passdb {
  driver = passwd-file
  args = $passwd_dir/%Lu
}
userdb {
  driver = static
  args = uid=$uid gid=$gid home=$mail_dir/%d/%n
}

first_valid_uid = $uid
first_valid_gid = $gid
$user_settings
mail_location = maildir:$mail_dir/%d/%n
mail_max_userip_connections = 2000
# IDLE learns of new mail through inotify; where that is unavailable or exhausted (many
# instances on one machine) Dovecot falls back to a check every 30 s by default.
mailbox_idle_check_interval = 1 secs
namespace inbox {
  inbox = yes
  separator = /
  mailbox Drafts {
    special_use = \Drafts
    auto = subscribe
  }
  mailbox Sent {
    special_use = \Sent
    auto = subscribe
  }
  mailbox Junk {
    special_use = \Junk
    auto = subscribe
  }
  mailbox Trash {
    special_use = \Trash
    auto = subscribe
  }
}

submission_relay_host = $relay_host
submission_relay_port = $relay_port
submission_relay_trusted = yes

# Room for ~2000 concurrent (IDLE) IMAP sessions.
default_process_limit = 1000
default_client_limit = 8000
default_vsz_limit = 1G
service imap-login {
  inet_listener imap {
    address = $host
    port = $imap_port
  }
  inet_listener imaps {
    address = $host
    port = $imaps_port
    ssl = yes
  }
  service_count = 0
  process_min_avail = 1
  client_limit = 4000
  $chroot
}
service imap {
  service_count = 0
  client_limit = 50
  process_limit = 200
}
service submission-login {
  inet_listener submission {
    address = $host
    port = $submission_port
  }
  inet_listener submissions {
    address = $host
    port = $submissions_port
    ssl = yes
  }
  $chroot
}
service lmtp {
  inet_listener lmtp {
    address = $host
    port = $lmtp_port
  }
}
service anvil {
  $penalty
  $chroot
}
""")

_NO_PENALTY = """unix_listener anvil-auth-penalty {
    mode = 0
  }"""


class DovecotUpstream:
    """A private Dovecot with IMAP(S), submission(s) and LMTP on loopback ports."""

    host = HOST

    def __init__(
        self,
        base_dir: Path,
        users: Mapping[str, str],
        *,
        master_user: tuple[str, str] | None = None,
        relay_host: str = HOST,
        relay_port: int | None = None,
        imap_port: int | None = None,
        imaps_port: int | None = None,
        submission_port: int | None = None,
        submissions_port: int | None = None,
        lmtp_port: int | None = None,
        auth_penalty: bool = False,
        mail_user: str = "dovecot",
        start_timeout: float = 10.0,
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.users: dict[str, str] = {}
        for address, password in users.items():
            _check_address(address)
            _check_field(password)
            self.users[address] = password
        if master_user is not None:
            _check_field(master_user[0])
            _check_field(master_user[1])
        self.master_user = master_user
        self.relay_host = relay_host
        self.relay_port = relay_port
        self.auth_penalty = auth_penalty
        self.mail_user = mail_user
        self.start_timeout = start_timeout
        auto = iter(free_ports(5))
        self.imap_port = imap_port or next(auto)
        self.imaps_port = imaps_port or next(auto)
        self._submission_port = submission_port or next(auto)
        self._submissions_port = submissions_port or next(auto)
        self.lmtp_port = lmtp_port or next(auto)

        self.config_path = self.base_dir / "dovecot.conf"
        self.passwd_dir = self.base_dir / "passwd.d"
        self.masters_path = self.base_dir / "masters"
        self.cert_path = self.base_dir / "tls" / "cert.pem"
        self.key_path = self.base_dir / "tls" / "key.pem"
        self.run_dir = self.base_dir / "run"
        self.state_dir = self.base_dir / "state"
        self.mail_dir = self.base_dir / "mail"
        self.log_path = self.base_dir / "dovecot.log"
        self.pid_path = self.run_dir / "master.pid"
        self._root = os.geteuid() == 0
        self._revisions: dict[str, int] = {}
        account = pwd.getpwnam(mail_user) if self._root else pwd.getpwuid(os.geteuid())
        self.uid, self.gid = account.pw_uid, account.pw_gid

    # -- ports ---------------------------------------------------------------

    @property
    def submission_enabled(self) -> bool:
        """Submission needs somewhere to relay to: it is on only with a relay_port."""
        return self.relay_port is not None

    @property
    def submission_port(self) -> int:
        self._require_submission()
        return self._submission_port

    @property
    def submissions_port(self) -> int:
        self._require_submission()
        return self._submissions_port

    def _require_submission(self) -> None:
        if not self.submission_enabled:
            raise RuntimeError("submission is off: DovecotUpstream was given no relay_port")

    # -- life cycle ----------------------------------------------------------

    def start(self) -> None:
        """Write the configuration, start Dovecot and wait until every listener greets."""
        self._prepare_dirs()
        make_self_signed_cert(self.cert_path, self.key_path)
        self._write_passwd()
        self.config_path.write_text(self._render_config())
        # Not a pipe: the daemon keeps its stderr open, a pipe would never see EOF.
        with open(self.base_dir / "startup.err", "w+") as err:
            proc = subprocess.run(
                ["dovecot", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
            )
            if proc.returncode != 0:
                err.seek(0)
                raise RuntimeError(f"dovecot failed to start: {err.read().strip()}")
        try:
            self._wait_ready(time.monotonic() + self.start_timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the master and all its processes; return once they are gone."""
        try:
            pid = int(self.pid_path.read_text())
        except (FileNotFoundError, ValueError):
            return
        # The master alone takes ~1 s, and with clients connected its imap processes
        # linger ~10 s; signalling all children at once takes ~0.1 s, but imap
        # processes then wait ~6 s for the log and stats processes: those go last.
        terminate(pid, timeout, last=("log", "stats"))
        self.pid_path.unlink(missing_ok=True)

    def __enter__(self) -> DovecotUpstream:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- users and mail ------------------------------------------------------

    def add_user(self, address: str, password: str, timeout: float = 5.0) -> None:
        """Add (or re-password) a user; returns once Dovecot's auth process uses it.

        Each user has a passwd-file of their own, which Dovecot reads on the first
        lookup, so a new user works at once.  A changed file Dovecot checks at most once
        a second: a re-password may have to wait for the next second.
        """
        _check_address(address)
        _check_field(password)
        known = address.lower() in self._revisions
        self.users[address] = password
        if not self.passwd_dir.exists():  # not started yet: start() writes all
            return
        self._write_user(address)
        if not known:
            return
        deadline = time.monotonic() + timeout
        while self._passdb_revision(address) != self._revisions[address.lower()]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Dovecot did not pick up the new password of {address}")
            time.sleep(1.01 - time.time() % 1)  # until the next whole second: no event to await

    def deliver(self, recipient: str, raw: bytes, sender: str = "sender@demo.test") -> None:
        """Deliver one message into `recipient`'s INBOX over LMTP (raises on refusal)."""
        with smtplib.LMTP(self.host, self.lmtp_port, local_hostname="localhost") as lmtp:
            refused = lmtp.sendmail(sender, [recipient], raw)
        if refused:
            raise smtplib.SMTPRecipientsRefused(refused)

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts (only) this instance's certificate."""
        return ssl.create_default_context(cafile=str(self.cert_path))

    # -- internals -----------------------------------------------------------

    def _prepare_dirs(self) -> None:
        for path in (self.base_dir, self.cert_path.parent, self.run_dir, self.state_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.mail_dir.mkdir(exist_ok=True)
        os.chown(self.mail_dir, self.uid, self.gid)
        if self._root:
            _check_traversable(self.mail_dir, self.uid, self.gid)

    def _write_passwd(self) -> None:
        self.passwd_dir.mkdir(exist_ok=True)
        for address in self.users:
            self._write_user(address)
        masters = ""
        if self.master_user is not None:
            masters = f"{self.master_user[0]}:{{PLAIN}}{self.master_user[1]}::::::\n"
        _atomic_write(self.masters_path, masters, 0o640, self.gid if self._root else -1)

    def _write_user(self, address: str) -> None:
        # The line carries a revision as an extra field: add_user can tell when
        # Dovecot has read this version.  Dovecot looks users up lower-cased (%Lu).
        key = address.lower()
        revision = self._revisions[key] = self._revisions.get(key, 0) + 1
        line = f"{key}:{{PLAIN}}{self.users[address]}::::::{REVISION_FIELD}={revision}\n"
        _atomic_write(self.passwd_dir / key, line, 0o640, self.gid if self._root else -1)

    def _passdb_revision(self, address: str) -> int | None:
        """The passwd-file revision that Dovecot's auth process has for `address`."""
        proc = subprocess.run(
            ["doveadm", "-c", str(self.config_path), "auth", "lookup", address],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        for line in proc.stdout.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == REVISION_FIELD:
                return int(value)
        return None

    def _render_config(self) -> str:
        protocols = "imap lmtp submission" if self.submission_enabled else "imap lmtp"
        user_settings = ""
        if not self._root:  # everything runs as the current user
            user, group = pwd.getpwuid(self.uid).pw_name, grp.getgrgid(self.gid).gr_name
            user_settings = (
                f"default_login_user = {user}\ndefault_internal_user = {user}\ndefault_internal_group = {group}\n"
            )
        return _CONFIG.substitute(
            run_dir=self.run_dir,
            state_dir=self.state_dir,
            log_path=self.log_path,
            protocols=protocols,
            host=self.host,
            cert_path=self.cert_path,
            key_path=self.key_path,
            masters_path=self.masters_path,
            passwd_dir=self.passwd_dir,
            uid=self.uid,
            gid=self.gid,
            user_settings=user_settings,
            mail_dir=self.mail_dir,
            relay_host=self.relay_host,
            relay_port=self.relay_port or 25,
            imap_port=self.imap_port,
            imaps_port=self.imaps_port,
            submission_port=self._submission_port,
            submissions_port=self._submissions_port,
            lmtp_port=self.lmtp_port,
            chroot="" if self._root else "chroot =",
            penalty="" if self.auth_penalty else _NO_PENALTY,
        )

    def _wait_ready(self, deadline: float) -> None:
        checks = [(self.imap_port, b"* OK", False), (self.imaps_port, b"* OK", True), (self.lmtp_port, b"220 ", False)]
        if self.submission_enabled:
            checks += [(self._submission_port, b"220 ", False), (self._submissions_port, b"220 ", True)]
        context = self.ssl_context()
        for port, greeting, tls in checks:
            line = _read_greeting(self.host, port, context if tls else None, deadline)
            if not line.startswith(greeting):
                raise RuntimeError(f"unexpected greeting on port {port}: {line!r}")


def _check_field(value: str) -> None:
    if not value or any(c in value for c in ":\r\n"):
        raise ValueError(f"not usable in a passwd-file: {value!r}")


def _check_address(address: str) -> None:
    _check_field(address)
    if "/" in address or "%" in address or address.startswith("."):
        raise ValueError(f"not usable as a passwd-file name: {address!r}")


def _check_traversable(path: Path, uid: int, gid: int) -> None:
    """Raise unless the user uid/gid may search every directory above `path`."""
    for parent in path.parents:
        st = parent.stat()
        if st.st_uid == uid:
            bit = 0o100
        elif st.st_gid == gid:
            bit = 0o010
        else:
            bit = 0o001
        if not st.st_mode & bit:
            raise PermissionError(
                f"uid {uid} cannot traverse {parent} (mode {st.st_mode & 0o777:o}); "
                f"Dovecot's mail processes need to reach {path}"
            )


def _read_greeting(host: str, port: int, context: ssl.SSLContext | None, deadline: float) -> bytes:
    """Connect (retrying while refused, until `deadline`) and return the first line."""
    while True:
        try:
            raw = socket.create_connection((host, port), timeout=max(deadline - time.monotonic(), 0.1))
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    with raw:
        conn = context.wrap_socket(raw, server_hostname="localhost") if context else raw
        with conn:
            data = b""
            while b"\n" not in data and (chunk := conn.recv(4096)):
                data += chunk
            return data.split(b"\r\n", 1)[0]
