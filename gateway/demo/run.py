"""``mailgate demo``: a whole installation on one machine, for trying it out.

Starts a private Dovecot (IMAP, submission, LMTP) as "the company's mail
provider", an SMTP sink standing for the Internet (everything relayed out
lands in <dir>/internet/ as .eml files; what is addressed to one of the demo's
mailboxes is delivered into that INBOX too), fills the sample data and a few
customer mails into the salespeople's INBOXes, writes <dir>/mailgate.toml and
runs the gateway in the foreground until Ctrl-C.
"""

from __future__ import annotations

import email.utils
import logging
import shutil
import smtplib
from pathlib import Path

from gateway.config import load
from gateway.db import connect
from gateway.db.models import Employee
from gateway.demo.sample_data import PANEL_ACCOUNTS, PASSWORDS, seed, seed_panel_accounts
from gateway.demo.sink import SinkMessage, SinkServer
from gateway.demo.upstream import DovecotUpstream

INBOUND = [
    ("alice@acme.test", "Klaus Becker <einkauf@hamburg-tools.de>", "RFQ: 2,000 pcs torque wrenches"),
    ("alice@acme.test", "Chinedu Okafor <lagos.imports@gmail.com>", "Re: price list (Bob's customer)"),
    ("alice@acme.test", "田中 太郎 <tanaka@osaka-machinery.jp>", "見積依頼 / quotation request"),
    ("alice@acme.test", "Newsletter <news@tools-weekly.example>", "Tools weekly #42"),
    ("bob@acme.test", "Chinedu Okafor <lagos.imports@gmail.com>", "Order confirmation"),
]

# Inquiries arriving at the shared mailbox sales@ (邮件分发): a known customer (→ Alice), a
# Nigerian buyer (→ Bob, by the demo's country rule), a quotation request from an unknown
# trader (→ the inquiries group, by keyword) and one nobody's rule matches (未分发, waits for a
# manager in the panel).
SHARED = "sales@acme.test"
SHARED_INBOUND = [
    ("Klaus Becker <einkauf@hamburg-tools.de>", "Follow-up: delivery date for PO 4711"),
    ("Abuja Hardware <info@abuja-hardware.ng>", "Distributor inquiry for Nigeria"),
    ("王先生 <wang@hangzhou-trading.example>", "询价：不锈钢扳手 5,000 套"),
    ("Someone <curious.buyer@gmail.com>", "Hello, do you ship to Chile?"),
]
MASTER_USER = ("demo-master", "demo-master-pw")

DISTRIBUTION_RULES = """# Written by `mailgate demo`: distribution rules (see rules/distribution/README.md).
groups:
  inquiries:
    members: [alice@acme.test, bob@acme.test]
    pick: least-loaded

rules:
  - name: nigeria-to-bob
    description: Buyers in Nigeria go to Bob.
    priority: 10
    when:
      country: [ng]
    to: bob@acme.test

  - name: quotation-requests
    description: Quotation requests go to whoever has had the fewest lately.
    priority: 50
    when:
      keyword: [quotation, RFQ, 报价, 询价]
    group: inquiries
"""

# The demo's own rules directory (<dir>/rules): the repository's rules/ (their examples all in
# audit mode: nothing held) and this enforcing rule, so the approval flow (审核) shows at once.
HOLD_TRIGGER = "tanaka@osaka-machinery.jp"  # a customer in Japan (sample data); printed in the banner
HOLD_RULE_FILE = "70-demo-hold-japan.yaml"
HOLD_RULE = """# Written by `mailgate demo` (once: edit it freely): the approval flow, enforced.
rules:
  - name: demo-hold-japan
    description: Mail to a customer in Japan needs the manager's approval (demo).
    priority: 50
    mode: enforce
    conditions:
      recipient-country: [JP]
    actions:
      - hold_for_approval: {approvers: [manager], reason: "日本客户：需经理审核 (demo)"}
"""


log = logging.getLogger("mailgate.demo")


def deliver_inside(dovecot: DovecotUpstream, message: SinkMessage) -> None:
    """Mail the provider relays to one of its own mailboxes (an approval request for Carol, the
    held notice for Alice, Alice writing to Bob) lands in that INBOX, as with a real provider;
    the "Internet" folder keeps its copy too."""
    for rcpt in message.rcpt_tos:
        if rcpt.lower() not in PASSWORDS:
            continue
        try:
            dovecot.deliver(rcpt.lower(), message.data, sender=message.mail_from)
        except (OSError, smtplib.SMTPException) as exc:
            log.warning("demo: could not deliver %s to %s's INBOX: %s", message.path.name, rcpt, exc)


def _inbound(sender: str, rcpt: str, subject: str) -> bytes:
    return (
        f"From: {email.utils.formataddr(email.utils.parseaddr(sender), charset='utf-8')}\r\n"
        f"To: {rcpt}\r\nSubject: {subject}\r\nDate: {email.utils.formatdate()}\r\n"
        f"Message-ID: {email.utils.make_msgid(domain='demo.test')}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "Dear partner,\r\n\r\nplease see our request.\r\n"
    ).encode()


# The panel at port_base + 8080 (18080 by default): browsers refuse to open some ports
# (Chromium's and Firefox's restricted list — 10080 among them, ERR_UNSAFE_PORT), so not + 80.
PANEL_OFFSET = 8080


def write_demo_config(path: Path, dovecot: DovecotUpstream, port_base: int) -> None:
    path.write_text(f"""# Written by `mailgate demo`; see conf/mailgate.toml for every setting.
[node]
name = "demo"
data_dir = "var"

[database]
url = "sqlite:///var/mailgate.db"

[company]
name = "ACME Trading"
domains = ["acme.test"]

[upstream]
host = "127.0.0.1"
imap_port = {dovecot.imaps_port}
imap_security = "tls"
submission_port = {dovecot.submission_port}
submission_security = "starttls"
ca_file = "{dovecot.cert_path}"

[smtp]
listen = "127.0.0.1"
submission_port = {port_base + 587}
smtps_port = {port_base + 465}
hostname = "localhost"

[relay]
mode = "relay_account"
username = "relay@acme.test"
password = "relay-pw"
workers = 2

[imap]
listen = "127.0.0.1"
starttls_port = {port_base + 143}
tls_port = {port_base + 993}

[metrics]
listen = "127.0.0.1"
port = {port_base + 9325 - 9000}

[rules]
# The repository's rules/ copied at the first start, plus {HOLD_RULE_FILE} (enforcing).
dir = "{path.parent / 'rules'}"

[panel]
listen = "127.0.0.1"
port = {port_base + PANEL_OFFSET}

[approval]
# The approve/reject links in the approver's mail open this demo's panel.
link_base_url = "http://127.0.0.1:{port_base + PANEL_OFFSET}/approvals"

[archive]
# The auditor's archive also gets every employee's INBOX and Sent, through Dovecot's master user.
sync_enabled = true
master_user = "{MASTER_USER[0]}"
master_password = "{MASTER_USER[1]}"
sync_interval = 30

[distribution]
enabled = true
mailboxes = ["{SHARED}"]
master_user = "{MASTER_USER[0]}"
master_password = "{MASTER_USER[1]}"
# Employees get their copy by IMAP APPEND into their own INBOX (no relayed copy in the
# demo's "Internet" folder).
delivery = "append"
append_for = ["*"]
# Distribute what is already in the shared mailbox at the first start, too.
initial = "all"
rules_dir = "{path.parent / 'distribution-rules'}"
""")
    rules = path.parent / "distribution-rules"
    rules.mkdir(exist_ok=True)
    (rules / "demo.yaml").write_text(DISTRIBUTION_RULES, encoding="utf-8")
    seed_rules(path.parent / "rules")


def seed_rules(rules: Path) -> None:
    """The demo's rules directory: the repository's rule files and the demo's hold rule, each
    written only if missing (a user's edits survive a restart)."""
    rules.mkdir(exist_ok=True)
    for source in sorted((Path(__file__).resolve().parents[2] / "rules").glob("*.yaml")):
        if not (rules / source.name).exists():
            shutil.copyfile(source, rules / source.name)
    if not (rules / HOLD_RULE_FILE).exists():
        (rules / HOLD_RULE_FILE).write_text(HOLD_RULE, encoding="utf-8")


def run_demo(directory: Path, port_base: int = 10000) -> int:
    from gateway.cli import main as cli_main
    from gateway.cli import use_multiprocess_metrics
    from gateway.service import run

    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    sink = SinkServer(directory / "internet")
    sink.start()
    dovecot = DovecotUpstream(directory / "upstream", PASSWORDS, master_user=MASTER_USER, relay_port=sink.port)
    dovecot.start()
    sink.on_message = lambda message: deliver_inside(dovecot, message)
    try:
        config_path = directory / "mailgate.toml"
        write_demo_config(config_path, dovecot, port_base)
        if cli_main(["-c", str(config_path), "init"]) != 0:
            return 1
        cfg = load(config_path)
        if cfg.relay.process == "separate":
            use_multiprocess_metrics(cfg.node.data_dir / "metrics")
        connect(cfg.database.url)
        if not Employee.select().exists():
            seed()
            for rcpt, sender, subject in INBOUND:
                dovecot.deliver(rcpt, _inbound(sender, rcpt, subject))
            for sender, subject in SHARED_INBOUND:
                dovecot.deliver(SHARED, _inbound(sender, SHARED, subject))
        seed_panel_accounts()
        return run(cfg, on_ready=lambda: print_instructions(cfg, directory))
    finally:
        dovecot.stop()
        sink.stop()


def print_instructions(cfg, directory: Path) -> None:
    panel_accounts = ", ".join(f"{login} / {pw} ({roles[0]})" for login, (pw, roles) in PANEL_ACCOUNTS.items())
    print(f"""
================ Mailgate demo is running ================
Point a mail client (Thunderbird, Outlook, Foxmail, mutt …) at the gateway:

  IMAP  server localhost  port {cfg.imap.tls_port} (SSL/TLS)  or {cfg.imap.starttls_port} (STARTTLS)
  SMTP  server localhost  port {cfg.smtp.submission_port} (STARTTLS)  or {cfg.smtp.smtps_port} (SSL/TLS)
  user  alice@acme.test   password alice-pw      (also bob@acme.test / bob-pw, carol@acme.test / carol-pw)

The certificate is self-signed: {cfg.tls.cert} — accept it in the client (or give the
client that file). It names localhost and 127.0.0.1; mbsync checks names only: use localhost.
Alice's INBOX has customer mail: her own customer shows as "[客户] …",
Bob's customer as "[同事客户] …".  Sending from Alice to lagos.imports@gmail.com
(Bob's customer) is refused with a reason; other mail is relayed to the
"Internet", which here is the folder {directory / 'internet'}
(mail to alice@, bob@, carol@ and sales@acme.test also lands in their INBOX).

Try it from a shell:
  swaks --server 127.0.0.1:{cfg.smtp.submission_port} --tls --auth-user alice@acme.test \\
        --auth-password alice-pw --from alice@acme.test --to lagos.imports@gmail.com

Approval (审核): mail to a customer in Japan, e.g. {HOLD_TRIGGER} (Alice's INBOX has
  his 見積依頼: reply to it), is held for the sender's manager — the 250 reply says
  "held for approval"; Carol gets a request with approve/reject links (in her INBOX) and
  sees it in the panel under 审核 (sign in as carol@acme.test / carol-pw). The rule:
  {Path(cfg.rules.dir) / HOLD_RULE_FILE}
  swaks --server 127.0.0.1:{cfg.smtp.submission_port} --tls --auth-user alice@acme.test \\
        --auth-password alice-pw --from alice@acme.test --to {HOLD_TRIGGER}

Web panel (管理面板): http://127.0.0.1:{cfg.panel.port}/
  employees sign in with their mail password:
    alice@acme.test / alice-pw (salesperson), carol@acme.test / carol-pw (department head)
  local accounts: {panel_accounts}

Shared mailbox {SHARED}: its inquiries are distributed (邮件分发) into Alice's and Bob's
  INBOX; one waits for a manager under 分发 in the panel (sign in as crm or carol).
Archive (归档): sign in as auditor; `mailgate -c {directory / 'mailgate.toml'} archive verify`
Metrics: http://127.0.0.1:{cfg.metrics.port}/metrics        Stop: Ctrl-C
==========================================================
""", flush=True)
