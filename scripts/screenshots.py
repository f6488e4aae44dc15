#!/usr/bin/env python3
"""Screenshots of the panel's main pages at desktop (1280 px) and phone (390 px) width.

Starts a demo-like installation on loopback — a private Dovecot as the mail provider,
an SMTP sink as the Internet, a real gateway (`mailgate run`, panel inside) with the
sample data, the demo's local accounts and a rule that holds mail to Japan — sends
some real mail through it (accepted, refused and held sends), then signs in with
Debian's Chromium (Playwright) as the role each page is for and saves
``docs/screenshots/<name>-desktop.png`` and ``<name>-phone.png``.

Pages of areas that are not installed (404) are skipped and listed at the end.

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots] [--only dashboard,rules]
"""

from __future__ import annotations

import argparse
import email.utils
import imaplib
import shutil
import smtplib
import ssl
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.demo.run import INBOUND  # noqa: E402
from gateway.demo.sample_data import PANEL_ACCOUNTS, PASSWORDS  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
SIZES = {"desktop": (1280, 800), "phone": (390, 844)}
HOLD_RULE = """
rules:
  - name: hold-japan
    description: mail to Japan needs the manager's approval (demo)
    priority: 50
    conditions:
      recipient-country: [JP]
    actions:
      - hold_for_approval: {approvers: [manager], reason: "日本客户：需经理审核"}
"""
# Who signs in for which role (employees by their mail password, the rest local accounts).
LOGINS: dict[str, tuple[str, str]] = {
    "salesperson": ("alice@acme.test", PASSWORDS["alice@acme.test"]),
    "dept_head": ("carol@acme.test", PASSWORDS["carol@acme.test"]),
    **{roles[0]: (login, password) for login, (password, roles) in PANEL_ACCOUNTS.items()},
}


@dataclass
class Shot:
    name: str
    path: str | Callable[[object], str | None]  # a path, or a function of the page that finds one
    roles: tuple[str, ...]  # the first role that gets a 200 is used
    after: Callable[[object], None] | None = None  # e.g. fill and submit a form


def _first_link(prefix: str) -> Callable[[object], str | None]:
    """The first link on the list page that opens one item (``/customers/12``)."""
    def find(page) -> str | None:  # noqa: ANN001
        for href in page.eval_on_selector_all(f"a[href^='{prefix}']", "els => els.map(e => e.getAttribute('href'))"):
            rest = href[len(prefix):]
            if rest.split("?")[0].isdigit():
                return href
        return None

    find.list_path = prefix.rstrip("/")
    return find


# The approve links from the approval e-mails Carol received (filled once the mail is in).
APPROVAL_LINKS: list[str] = []


def _pending_link(page) -> str | None:  # noqa: ANN001 - the page is not needed: the link is in the mail
    """The e-mailed approve link of a message still pending (what an approver opens on a phone)."""
    import base64

    from gateway.db.models import Approval

    for path in APPROVAL_LINKS:
        payload = path.split("t=", 1)[1].split(".")[0]
        approval_id = int(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).split(b":")[0])
        if Approval.get_by_id(approval_id).state == "pending":
            return path
    return None


_pending_link.list_path = "/login"


def _collect_links(sink) -> None:  # noqa: ANN001
    import email
    import re
    import time
    from urllib.parse import urlsplit

    deadline = time.monotonic() + 20
    while len([m for m in sink.messages() if m.rcpt_tos == ["carol@acme.test"]]) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)  # the approval requests are relayed after the holds are recorded
    for m in sink.messages():
        if m.rcpt_tos != ["carol@acme.test"]:
            continue
        for part in email.message_from_bytes(m.data).walk():
            if part.get_content_type() == "text/plain":
                text = part.get_payload(decode=True).decode(part.get_content_charset() or "utf-8", "replace")
                for url in re.findall(r"https?://\S+/approve\?t=[\w.-]+", text):
                    parts = urlsplit(url)
                    APPROVAL_LINKS.append(parts.path + "?" + parts.query)


def _dry_run(page) -> None:  # noqa: ANN001
    page.fill("input[name=from]", "bob@acme.test")
    page.fill("input[name=to]", "einkauf@hamburg-tools.de")
    page.fill("input[name=subject]", "Angebot")
    page.click("#dryrun-submit")
    page.wait_for_load_state()


SHOTS = [
    Shot("login", "/login", ()),
    Shot("home", "/", ("crm_admin",)),
    Shot("dashboard", "/dashboard", ("dept_head", "crm_admin")),
    Shot("customers", "/customers", ("salesperson", "crm_admin")),
    Shot("customer", _first_link("/customers/"), ("crm_admin", "salesperson")),
    Shot("pool", "/pool", ("salesperson", "crm_admin")),
    Shot("approvals", "/approvals", ("dept_head",)),
    Shot("approval", _first_link("/approvals/"), ("dept_head",)),
    Shot("approvals-history", "/approvals?view=history", ("dept_head",)),
    Shot("approval-link", _pending_link, ()),  # the e-mailed link, not signed in
    Shot("employees", "/employees?status=all", ("crm_admin",)),
    Shot("departments", "/employees/departments", ("crm_admin",)),
    Shot("rules", "/rules", ("it_admin",)),
    Shot("rules-dryrun", "/rules", ("it_admin",), after=_dry_run),
    Shot("oplog", "/oplog", ("auditor", "it_admin")),
    Shot("archive", "/archive", ("auditor",)),
    Shot("distribution", "/distribution", ("it_admin", "crm_admin")),
]


def _send(gw, sender: str, to: str, subject: str) -> None:  # noqa: ANN001
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg["Date"] = email.utils.formatdate()
    msg["Message-ID"] = email.utils.make_msgid(domain="acme.test")
    msg.set_content("Dear partner,\n\nplease find our offer.\n")
    ctx = ssl.create_default_context(cafile=str(gw.cert_path))
    with smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30) as conn:
        conn.starttls(context=ctx)
        conn.login(sender, PASSWORDS[sender])
        try:
            conn.sendmail(sender, [to], msg.as_bytes())
        except smtplib.SMTPException:
            pass  # refused by policy: counted as a blocked send, which is what the dashboard should show


def _traffic(gw, dovecot) -> None:  # noqa: ANN001
    """Real mail: accepted, refused (send conflict) and held sends; inbound mail read through the gateway."""
    from gateway.demo.run import _inbound

    for rcpt, sender, subject in INBOUND:
        dovecot.deliver(rcpt, _inbound(sender, rcpt, subject))
    for n in range(3):
        _send(gw, "alice@acme.test", "einkauf@hamburg-tools.de", f"Offer {n + 1}: torque wrenches")
    _send(gw, "bob@acme.test", "lagos.imports@gmail.com", "Proforma invoice PI-2026-118")
    _send(gw, "alice@acme.test", "lagos.imports@gmail.com", "Cheaper price for you")  # Bob's customer: refused
    _send(gw, "alice@acme.test", "tanaka@osaka-machinery.jp", "お見積り / Quotation Q-7781")  # held
    _send(gw, "bob@acme.test", "tanaka@osaka-machinery.jp", "Sample shipment schedule")  # held
    _send(gw, "alice@acme.test", "tanaka@osaka-machinery.jp", "Re: 納期のご確認 / delivery date")  # approved below
    for user in ("alice@acme.test", "bob@acme.test"):
        ctx = ssl.create_default_context(cafile=str(gw.cert_path))
        with imaplib.IMAP4_SSL("127.0.0.1", gw.imaps_port, ssl_context=ctx, timeout=30) as imap:
            imap.login(user, PASSWORDS[user])
            imap.select("INBOX")
            imap.fetch("1:*", "(BODY.PEEK[])")


def _wait_for_holds(count: int, timeout: float = 20.0) -> None:
    import time

    from gateway.db.models import Approval

    deadline = time.monotonic() + timeout
    while Approval.select().where(Approval.state == "pending").count() < count:
        if time.monotonic() > deadline:
            raise RuntimeError("the held messages did not show up")
        time.sleep(0.05)


def _panel_changes(base: str) -> None:
    """A few changes through the panel itself (they fill the history and the operation log)."""
    from gateway.db.models import Approval, Employee
    from tests.panel.conftest import PanelClient

    carol = PanelClient(base)
    carol.login(*LOGINS["dept_head"])
    first = Approval.select().where(Approval.state == "pending").order_by(Approval.id.desc()).first()
    carol.get(f"/approvals/{first.id}")
    carol.post(f"/approvals/{first.id}/decide", {"action": "approve"})
    admin = PanelClient(base)
    admin.login(*LOGINS["it_admin"])
    carol_id = Employee.get(Employee.email == "carol@acme.test").id
    admin.get("/employees/departments")
    admin.post("/employees/departments/new", {"name": "Sales Asia 亚洲销售部", "parent": "", "head": str(carol_id)})
    crm = PanelClient(base)
    crm.login(*LOGINS["crm_admin"])
    bob = Employee.get(Employee.email == "bob@acme.test").id
    crm.get(f"/employees/{bob}")
    crm.post(f"/employees/{bob}/aliases", {"address": "bob.li@acme.test"})


def _wait_for_inbound(count: int, timeout: float = 20.0) -> None:
    """Until the archive has synced ``count`` received messages (or give up: the shots still work)."""
    import time

    from gateway.db.models import ArchiveRecord

    deadline = time.monotonic() + timeout
    while ArchiveRecord.select().where(ArchiveRecord.direction == "inbound").count() < count:
        if time.monotonic() > deadline:
            print("note: the archive did not sync the inbound mail in time; 'received' may show 0")
            return
        time.sleep(0.1)


def _login(page, base: str, role: str) -> None:  # noqa: ANN001
    login, password = LOGINS[role]
    page.goto(base + "/login")
    page.fill("input[name=login]", login)
    page.fill("input[name=password]", password)
    page.click("form[action='/login'] button[type=submit]")
    page.wait_for_load_state()
    if "/login" in page.url:
        raise RuntimeError(f"sign-in as {role} ({login}) failed")


def take(base: str, out: Path, only: set[str]) -> tuple[list[str], list[str]]:
    from playwright.sync_api import sync_playwright

    saved, skipped, wide = [], [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM,
                                     args=["--no-sandbox", "--disable-background-networking"])
        contexts: dict[tuple[str, str], object] = {}

        def page_for(role: str, size: str):  # noqa: ANN202
            key = (role, size)
            if key not in contexts:
                width, height = SIZES[size]
                ctx = browser.new_context(viewport={"width": width, "height": height}, locale="zh-CN",
                                          device_scale_factor=1)
                page = ctx.new_page()
                if role:
                    _login(page, base, role)
                contexts[key] = page
            return contexts[key]

        for shot in SHOTS:
            if only and shot.name not in only:
                continue
            done = False
            for role in shot.roles or ("",):
                for size in SIZES:
                    page = page_for(role, size)
                    path = shot.path
                    if callable(path):
                        page.goto(base + path.list_path)
                        path = path(page)
                        if path is None:
                            break
                    response = page.goto(base + path)
                    if response is None or response.status != 200:
                        break
                    if shot.after:
                        shot.after(page)
                    width = page.evaluate("document.documentElement.scrollWidth")
                    if width > SIZES[size][0] + 1:
                        wide.append(f"{shot.name} ({size}: {width} px)")
                    target = out / f"{shot.name}-{size}.png"
                    page.screenshot(path=str(target), full_page=True)
                    saved.append(str(target.relative_to(REPO)) if target.is_relative_to(REPO) else str(target))
                    done = True
                if done:
                    break
            if not done:
                skipped.append(shot.name)
        browser.close()
    for entry in wide:
        print("warning: wider than the screen, the page scrolls sideways:", entry)
    return saved, skipped


def _index(out: Path) -> None:
    """docs/screenshots/README.md: every page at both widths, in SHOTS order."""
    lines = ["# Panel screenshots", "",
             "Made by `scripts/screenshots.py` (demo-like installation, real mail, Debian Chromium); "
             "desktop 1280 px, phone 390 px. Re-run it to refresh them.", "",
             "| Page | Desktop | Phone |", "|---|---|---|"]
    for shot in SHOTS:
        if (out / f"{shot.name}-desktop.png").exists():
            lines.append(f"| {shot.name} | ![{shot.name} desktop]({shot.name}-desktop.png) "
                         f"| ![{shot.name} phone]({shot.name}-phone.png) |")
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    parser.add_argument("--only", default="", help="comma-separated page names")
    args = parser.parse_args(argv)
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    args.out.mkdir(parents=True, exist_ok=True)

    from gateway.db import connect
    from gateway.demo.sample_data import seed, seed_panel_accounts
    from gateway.demo.sink import SinkServer
    from gateway.demo.upstream import DovecotUpstream
    from tests.conftest import MASTER_USER, USERS
    from tests.harness import shared_tempdir
    from tests.harness.gateway import GatewayProcess

    with tempfile.TemporaryDirectory(prefix="mailgate-shots-") as tmp, \
            SinkServer(Path(tmp) / "internet") as sink, \
            shared_tempdir("mailgate-shots-dovecot-") as dovecot_dir, \
            DovecotUpstream(dovecot_dir, USERS, master_user=MASTER_USER, relay_port=sink.port) as dovecot:
        rules = Path(tmp) / "rules"
        shutil.copytree(REPO / "rules", rules)
        (rules / "70-hold-japan.yaml").write_text(HOLD_RULE)
        gw = GatewayProcess(Path(tmp) / "gw", dovecot, {
            "rules": {"dir": str(rules)},
            # the archive's inbound sync fills "received" on the dashboard
            "archive": {"sync_enabled": True, "master_user": MASTER_USER[0], "master_password": MASTER_USER[1],
                        "sync_interval": 1.0},
        })
        connect(gw.db_url)
        seed()
        seed_panel_accounts()
        gw.start()
        try:
            _traffic(gw, dovecot)
            _wait_for_holds(3)
            _wait_for_inbound(len(INBOUND))
            _panel_changes(f"http://127.0.0.1:{gw.panel_port}")
            _collect_links(sink)
            saved, skipped = take(f"http://127.0.0.1:{gw.panel_port}", args.out, only)
        finally:
            gw.stop()
    for path in saved:
        print("saved", path)
    if not only:
        _index(args.out)
    if skipped:
        print("skipped (area not installed or no item to open):", ", ".join(skipped))
    return 0 if saved else 1


if __name__ == "__main__":
    raise SystemExit(main())
