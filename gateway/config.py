"""Configuration: one TOML file (conf/mailgate.toml is the documented example).

Every section is a dataclass; loading checks unknown keys and types and reports
each problem as one clear line (``ConfigError.problems``).  Relative paths are
resolved against the directory of the config file, so a config can be moved
together with its certs/ and var/ folders.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from gateway.archive import settings as archive_settings
from gateway.archive.settings import ArchiveConfig
from gateway.distribute import settings as distribute_settings
from gateway.distribute.settings import DistributionConfig
from panel import settings as panel_settings
from panel.settings import PanelConfig

#: Public mail domains: only an exact contact address there identifies a customer.
PUBLIC_MAIL_DOMAINS = frozenset(
    """
    gmail.com googlemail.com yahoo.com yahoo.co.jp yahoo.co.uk ymail.com hotmail.com
    outlook.com live.com msn.com icloud.com me.com mac.com aol.com gmx.com gmx.de
    gmx.net web.de mail.com mail.ru yandex.ru yandex.com protonmail.com proton.me
    zoho.com qq.com foxmail.com 163.com 126.com yeah.net sina.com sina.cn sohu.com
    139.com 189.cn aliyun.com naver.com daum.net hanmail.net rediffmail.com
    """.split()
)


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass
class NodeConfig:
    name: str = "node1"
    data_dir: Path = Path("var")
    # True when data_dir/spool is storage shared by every node (then any node may
    # relay any queued message); False: each node relays what its own spool holds.
    shared_spool: bool = False
    # The event loop of the node and its SMTP acceptor and relay processes: "asyncio" (the
    # standard library's) or "uvloop" (libuv; less CPU per SMTP message at low concurrency).
    event_loop: str = "asyncio"


@dataclass
class DatabaseConfig:
    url: str = "sqlite:///var/mailgate.db"


@dataclass
class CompanyConfig:
    name: str = "ACME Trading"
    domains: list[str] = field(default_factory=lambda: ["acme.test"])
    public_mail_domains_extra: list[str] = field(default_factory=list)
    language: str = "zh-CN"


@dataclass
class TLSConfig:
    cert: Path = Path("certs/gateway.crt")
    key: Path = Path("certs/gateway.key")


@dataclass
class UpstreamConfig:
    host: str = "127.0.0.1"
    imap_port: int = 993
    imap_security: str = "tls"
    submission_port: int = 587
    submission_security: str = "starttls"
    ca_file: Path | None = None
    verify_tls: bool = True
    timeout: float = 30.0


@dataclass
class SMTPConfig:
    listen: str = "0.0.0.0"
    submission_port: int = 587
    smtps_port: int = 465
    hostname: str = "mail.acme.test"
    max_message_size: int = 35 * 1024 * 1024
    max_recipients: int = 100
    max_line_length: int = 4096
    max_sessions: int = 500
    trusted_networks: list[str] = field(default_factory=list)
    auth_cache_seconds: int = 300
    auth_fail_base_delay: float = 1.0
    auth_fail_max_delay: float = 30.0
    auth_fail_window: int = 900
    timeout: float = 300.0
    # Processes accepting on the submission ports (SO_REUSEPORT): the node plus N - 1
    # acceptors (gateway/smtp/acceptor.py), so the accept path uses more than one core.
    processes: int = 1


@dataclass
class RelayConfig:
    host: str = ""
    port: int = 0
    security: str = ""
    mode: str = "relay_account"
    credentials_key: Path = Path("certs/queue.key")
    username: str = ""
    password: str = ""
    workers: int = 4
    # "separate": the relay workers run in a child process (a second core);
    # "inline": in the node's own process.
    process: str = "separate"
    retry_initial: int = 60
    retry_max: int = 3600
    lifetime: int = 5 * 24 * 3600
    claim_timeout: int = 600
    poll_interval: float = 5.0


@dataclass
class IMAPConfig:
    listen: str = "0.0.0.0"
    starttls_port: int = 143
    tls_port: int = 993
    # Networks where LOGIN without TLS is allowed on the STARTTLS port (e.g. loopback).
    plaintext_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # Networks where the proxy may reach the upstream without TLS ([upstream] imap_security = "none").
    plaintext_upstream_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    max_line_length: int = 64 * 1024
    max_literal_size: int = 50 * 1024 * 1024
    max_nesting_depth: int = 32
    max_connections: int = 5000
    max_connections_per_user: int = 50
    idle_timeout: int = 30 * 60
    # Failed logins (LOGIN, AUTHENTICATE): as [smtp] auth_fail_* (gateway/smtp/guard.py).
    auth_fail_base_delay: float = 1.0
    auth_fail_max_delay: float = 30.0
    auth_fail_window: int = 900
    tag_own: str = "[客户]"
    tag_colleague: str = "[同事客户]"


@dataclass
class MetricsConfig:
    listen: str = "127.0.0.1"
    port: int = 9325


@dataclass
class RulesConfig:
    dir: Path = Path("rules")


@dataclass
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    company: CompanyConfig = field(default_factory=CompanyConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    imap: IMAPConfig = field(default_factory=IMAPConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)
    dkim: DkimConfig = field(default_factory=lambda: DkimConfig())
    approval: ApprovalConfig = field(default_factory=lambda: ApprovalConfig())
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    distribution: DistributionConfig = field(default_factory=DistributionConfig)
    panel: PanelConfig = field(default_factory=PanelConfig)
    path: Path | None = None

    # -- derived values -------------------------------------------------
    @property
    def spool_dir(self) -> Path:
        return self.node.data_dir / "spool"

    @property
    def archive_dir(self) -> Path:
        return self.archive.dir or self.node.data_dir / "archive"

    @property
    def public_mail_domains(self) -> frozenset[str]:
        extra = {d.lower() for d in self.company.public_mail_domains_extra}
        return PUBLIC_MAIL_DOMAINS | extra

    @property
    def relay_host(self) -> str:
        return self.relay.host or self.upstream.host

    @property
    def relay_port(self) -> int:
        return self.relay.port or self.upstream.submission_port

    @property
    def relay_security(self) -> str:
        return self.relay.security or self.upstream.submission_security

    def is_internal(self, address: str) -> bool:
        domain = address.rpartition("@")[2].lower()
        return domain in {d.lower() for d in self.company.domains}


_SECURITY = {"tls", "starttls", "none"}

# Areas own their config sections (gateway/archive/settings.py, …); each has a validate().
AREA_VALIDATORS = {
    "archive": archive_settings.validate,
    "distribution": distribute_settings.validate,
    "panel": panel_settings.validate,
}
AREA_SECTIONS = tuple(AREA_VALIDATORS)


def _convert(value: object, hint: object, where: str, problems: list[str]) -> object:
    """Check/convert one TOML value against a dataclass field type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value in (None, ""):
            return None
        return _convert(value, args[0], where, problems)
    if hint is Path:
        if isinstance(value, str):
            return Path(value)
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    type_name = getattr(hint, "__name__", str(hint))
    problems.append(f"{where}: expected {type_name}, got {value!r}")
    return None


def _build_section(cls: type, data: dict, name: str, problems: list[str]) -> object:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            problems.append(f"[{name}] {key}: unknown setting")
            continue
        converted = _convert(value, hints[key], f"[{name}] {key}", problems)
        if converted is not None or value in (None, ""):
            kwargs[key] = converted
    return cls(**kwargs)


def from_dict(data: dict, base_dir: Path | None = None, path: Path | None = None) -> Config:
    """Build a Config from parsed TOML; raise ConfigError listing every problem."""
    problems: list[str] = []
    hints = typing.get_type_hints(Config)
    sections = {}
    for key, value in data.items():
        if key not in hints or key == "path":
            problems.append(f"[{key}]: unknown section")
            continue
        if not isinstance(value, dict):
            problems.append(f"[{key}]: must be a table")
            continue
        sections[key] = _build_section(hints[key], value, key, problems)
    cfg = Config(**sections, path=path)
    if base_dir is not None:
        _resolve_paths(cfg, base_dir)
    problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def _resolve_paths(cfg: Config, base: Path) -> None:
    def rel(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else base / p)

    cfg.node.data_dir = rel(cfg.node.data_dir)
    cfg.tls.cert = rel(cfg.tls.cert)
    cfg.tls.key = rel(cfg.tls.key)
    cfg.upstream.ca_file = rel(cfg.upstream.ca_file)
    cfg.rules.dir = rel(cfg.rules.dir)
    cfg.relay.credentials_key = rel(cfg.relay.credentials_key)
    for section in AREA_SECTIONS:  # areas' own sections: every Path setting is relative to the file
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, Path):
                setattr(obj, f.name, rel(value))
    if cfg.database.url.startswith("sqlite:///") and not cfg.database.url.startswith("sqlite:////"):
        relative = cfg.database.url[len("sqlite:///"):]
        if relative != ":memory:":
            cfg.database.url = "sqlite:///" + str(base / relative)


def host_in_networks(host: str, networks: list[str]) -> bool:
    """Whether ``host`` (an IP address, or "localhost") lies in one of ``networks`` (names never do)."""
    try:
        ip = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
    except ValueError:
        return False
    for net in networks:
        try:
            if ip in ipaddress.ip_network(net, strict=False):
                return True
        except ValueError:
            continue
    return False


def validate(cfg: Config) -> list[str]:
    """Semantic checks that types alone cannot express."""
    problems = []
    for name, value in (
        ("[upstream] imap_security", cfg.upstream.imap_security),
        ("[upstream] submission_security", cfg.upstream.submission_security),
    ):
        if value not in _SECURITY:
            problems.append(f"{name}: must be one of tls, starttls, none (got {value!r})")
    if cfg.relay.security and cfg.relay.security not in _SECURITY:
        problems.append(f"[relay] security: must be one of tls, starttls, none (got {cfg.relay.security!r})")
    if not 1 <= cfg.smtp.processes <= 64:
        problems.append(f"[smtp] processes: 1 to 64 (got {cfg.smtp.processes})")
    if cfg.node.event_loop not in ("uvloop", "asyncio"):
        problems.append(f"[node] event_loop: uvloop or asyncio (got {cfg.node.event_loop!r})")
    if cfg.relay.process not in ("separate", "inline"):
        problems.append(f"[relay] process: separate or inline (got {cfg.relay.process!r})")
    if cfg.relay.mode not in ("relay_account", "employee_credentials"):
        problems.append(
            f"[relay] mode: must be relay_account or employee_credentials (got {cfg.relay.mode!r})"
        )
    relay_security = cfg.relay.security or cfg.upstream.submission_security
    if relay_security == "none" and (cfg.relay.host or cfg.upstream.host) not in ("127.0.0.1", "::1", "localhost"):
        problems.append("[relay] security: \"none\" is allowed only for a loopback relay host")
    if cfg.relay.claim_timeout <= cfg.upstream.timeout * 2:
        problems.append("[relay] claim_timeout: must be well above [upstream] timeout (at least twice)")
    if cfg.relay.retry_initial <= 0 or cfg.relay.retry_max < cfg.relay.retry_initial or cfg.relay.lifetime <= 0:
        problems.append("[relay] retry_initial/retry_max/lifetime: need 0 < retry_initial <= retry_max, lifetime > 0")
    if cfg.relay.mode == "relay_account" and not (cfg.relay.username and cfg.relay.password):
        problems.append("[relay] username/password: required when mode = relay_account")
    if cfg.upstream.imap_security == "none" and not host_in_networks(cfg.upstream.host,
                                                                     cfg.imap.plaintext_upstream_networks):
        problems.append(f"[upstream] imap_security: \"none\" sends passwords and mail in clear; allowed only for a "
                        f"host inside [imap] plaintext_upstream_networks (got {cfg.upstream.host!r})")
    for net in cfg.imap.plaintext_upstream_networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            problems.append(f"[imap] plaintext_upstream_networks: {net!r} is not an IP network")
    for net in cfg.smtp.trusted_networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            problems.append(f"[smtp] trusted_networks: {net!r} is not an IP network")
    if not cfg.company.domains:
        problems.append("[company] domains: at least one company domain is required")
    if not (cfg.database.url.startswith("sqlite:///") or cfg.database.url.startswith("postgresql://")):
        problems.append("[database] url: must start with sqlite:/// or postgresql://")
    if cfg.company.language not in ("zh-CN", "en"):
        problems.append(f"[company] language: zh-CN or en (got {cfg.company.language!r})")
    if cfg.smtp.max_message_size < 1024:
        problems.append("[smtp] max_message_size: too small")
    for section, check in AREA_VALIDATORS.items():
        problems.extend(check(getattr(cfg, section)))
    return problems


def load(path: str | Path) -> Config:
    """Load and validate a config file."""
    path = Path(path).resolve()
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found (run `mailgate init`)"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    return from_dict(data, base_dir=path.parent, path=path)


# -- issue 4: DKIM and approval (relative paths resolve against the config file's folder) --


@dataclass
class DkimConfig:
    enabled: bool = True
    selector: str = "mailgate"
    key_dir: Path = Path("certs/dkim")
    algorithms: list[str] = field(default_factory=lambda: ["rsa", "ed25519"])
    domains: list[str] = field(default_factory=list)
    canonicalization: str = "relaxed/relaxed"


@dataclass
class ApprovalConfig:
    expire_hours: int = 72
    key_file: Path = Path("certs/approval.key")
    link_base_url: str = "https://mail.acme.test/approvals"
    notice_from: str = ""
    notify_sender: bool = True
    split_recipients: bool = False
