"""offlineimap (Debian's offlineimap3) syncing INBOX and Sent through the proxy, both ways.

offlineimap opens several connections at once, lists with UID FETCH (FLAGS INTERNALDATE),
downloads with BODY.PEEK[] and writes flag changes and deletions back with UID STORE and
EXPUNGE.  Every sync runs over implicit TLS: offlineimap 8.0's STARTTLS (imaplib2 3.05) hangs
or fails after the handshake in most runs against Dovecot itself, proxy or not (checked
2026-12-01; OfflineIMAP/offlineimap#207 reports the same), so a STARTTLS sync here would test
offlineimap, not the gateway (the proxy's STARTTLS is covered by imaplib, mutt and mbsync).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.imap.helpers import direct, display_names, envelope_from_name, message, uid_of, via

pytestmark = pytest.mark.skipif(shutil.which("offlineimap") is None,
                                reason="offlineimap not installed (Debian package offlineimap3)")

CONFIG = """[general]
accounts = t
metadata = {meta}

[Account t]
localrepository = L
remoterepository = R

[Repository L]
type = Maildir
localfolders = {local}

[Repository R]
type = IMAP
remotehost = localhost
remoteport = {port}
remoteuser = bob@acme.test
remotepass = bob-pw
ssl = {ssl}
starttls = {starttls}
sslcacertfile = {cert}
maxconnections = 3
folderfilter = lambda f: f in ('INBOX', 'Sent')
"""


def _sync(tmp: Path, port: int, cert: Path, implicit_tls: bool) -> str:
    conf = tmp / "offlineimaprc"
    conf.write_text(CONFIG.format(meta=tmp / "meta", local=tmp / "mail", port=port, cert=cert,
                                  ssl="yes" if implicit_tls else "no", starttls="no" if implicit_tls else "yes"))
    proc = subprocess.run(["offlineimap", "-c", str(conf), "-o", "-u", "basic"],
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "ERROR" not in out, out
    return out


def _local(tmp: Path, folder: str) -> dict[str, Path]:
    """Message-ID -> file of the local Maildir folder."""
    out = {}
    for f in (tmp / "mail" / folder).glob("*/*"):
        m = re.search(rb"(?im)^Message-ID: (<[^>]+>)", f.read_bytes())
        assert m, f
        out[m.group(1).decode()] = f
    return out


def test_offlineimap_syncs_both_ways_through_proxy(proxy, imap_upstream, gateway_cert, tmp_path):
    cert = gateway_cert[0]
    plain, raw_plain = message("Plain <plain@unknown.test>", to="bob@acme.test", subject="oi plain")
    own, raw_own = message("Mr Bob Customer <mr@bobcust.test>", to="bob@acme.test", subject="oi own")
    colleague, raw_colleague = message('"Buyer" <buyer@buyer.test>', to="bob@acme.test", subject="oi colleague")
    for raw in (raw_plain, raw_own, raw_colleague):
        imap_upstream.deliver("bob@acme.test", raw)
    sent, raw_sent = message("Bob <bob@acme.test>", to="Mr X <x@bobcust.test>", subject="oi sent")
    up = direct(imap_upstream, "bob@acme.test")
    up.append("Sent", None, None, raw_sent)

    out = _sync(tmp_path, proxy.tls_port, cert, implicit_tls=True)
    assert "Copy message" in out, out
    inbox, sent_box = _local(tmp_path, "INBOX"), _local(tmp_path, "Sent")
    assert {plain, own, colleague} <= inbox.keys() and sent in sent_box

    # Tags in the stored bytes agree with the ENVELOPE the proxy serves for the same UID.
    gw = via(proxy, "bob@acme.test")
    for mid, field, tag in ((plain, "From", None), (own, "From", "[客户] "), (colleague, "From", "[同事客户] ")):
        name = display_names(inbox[mid].read_bytes(), field)[0]
        assert name.startswith(tag) if tag else not name.startswith("["), name
        env = envelope_from_name(gw, uid_of(gw, mid))
        assert env.startswith(tag) if tag else not env.startswith("["), env
        assert name.startswith(env)
    assert display_names(sent_box[sent].read_bytes(), "To")[0].startswith("[客户] ")
    # Untagged messages are stored byte for byte.
    assert inbox[plain].read_bytes().replace(b"\n", b"\r\n").endswith(raw_plain)
    gw.logout()

    # Flag one message and delete another locally; the next sync writes both back.
    f = inbox[plain]
    f.rename(f.parent.parent / "cur" / (f.name.split(":2,")[0] + ":2,FS"))
    inbox[own].unlink()
    out = _sync(tmp_path, proxy.tls_port, cert, implicit_tls=True)
    assert "Deleting 1 messages" in out, out
    up.select("INBOX")
    typ, data = up.uid("FETCH", str(uid_of(up, plain)), "(FLAGS)")
    assert b"\\Flagged" in data[0] and b"\\Seen" in data[0], data
    typ, data = up.uid("SEARCH", None, "HEADER", "Message-ID", own)
    assert data == [b""], data
    up.logout()

    # A third sync has nothing to copy in either direction.
    before = {p.name for p in (tmp_path / "mail").rglob("*") if p.is_file()}
    out = _sync(tmp_path, proxy.tls_port, cert, implicit_tls=True)
    assert "Copy message" not in out and "Deleting" not in out, out
    assert {p.name for p in (tmp_path / "mail").rglob("*") if p.is_file()} == before
