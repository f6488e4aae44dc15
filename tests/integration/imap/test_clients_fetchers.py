"""Mail fetchers and curl through the proxy: fetchmail, getmail6, curl (Debian packages).

fetchmail finds new mail with SEARCH UNSEEN, reads RFC822.SIZE, RFC822.HEADER and
BODY.PEEK[TEXT] separately and marks what it took \\Seen (or deletes it); getmail keeps
its own list of UIDs per UIDVALIDITY; curl sends single commands (UID FETCH BODY[],
APPEND).  Each test skips when its client is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.imap.helpers import direct, display_names, envelope_from_name, message, uid_of, via

BOB = ("bob@acme.test", "bob-pw")


def _deliver_three(upstream, label: str) -> dict[str, str | None]:
    """A plain message, bob's customer's and a colleague's customer's: Message-ID -> expected tag."""
    out: dict[str, str | None] = {}
    for sender, tag in (("Plain <plain@unknown.test>", None), ("Mr Bob Customer <mr@bobcust.test>", "[客户] "),
                        ('"Buyer" <buyer@buyer.test>', "[同事客户] ")):
        mid, raw = message(sender, to="bob@acme.test", subject=f"{label} {len(out)}")
        upstream.deliver("bob@acme.test", raw)
        out[mid] = tag
    return out


def _by_message_id(folder: Path) -> dict[str, bytes]:
    out = {}
    for f in folder.iterdir():
        raw = f.read_bytes()
        for line in raw.split(b"\n"):
            if line.lower().startswith(b"message-id:"):
                out[line.split(b":", 1)[1].strip().decode()] = raw
                break
    return out


def _check_tags(proxy, got: dict[str, bytes], expected: dict[str, str | None], mailbox: str = "INBOX") -> None:
    """Each stored From has the expected tag, and the proxy's ENVELOPE for the same message agrees."""
    gw = via(proxy, BOB[0])
    try:
        for mid, tag in expected.items():
            name = display_names(got[mid], "From")[0]
            env = envelope_from_name(gw, uid_of(gw, mid, mailbox))
            for shown in (name, env):
                assert shown.startswith(tag) if tag else not shown.startswith("["), (mid, shown)
            assert name.startswith(env), (name, env)
    finally:
        gw.logout()


def _flags(upstream, mid: str) -> bytes:
    c = direct(upstream, BOB[0])
    try:
        typ, data = c.uid("FETCH", str(uid_of(c, mid)), "(FLAGS)")
        return data[0]
    finally:
        c.logout()


def _gone(upstream, mid: str) -> bool:
    c = direct(upstream, BOB[0])
    try:
        c.select("INBOX")
        typ, data = c.uid("SEARCH", None, "HEADER", "Message-ID", mid)
        return data == [b""]
    finally:
        c.logout()


@pytest.mark.skipif(shutil.which("fetchmail") is None, reason="fetchmail not installed (Debian package fetchmail)")
def test_fetchmail_through_proxy(proxy, imap_upstream, gateway_cert, tmp_path):
    expected = _deliver_three(imap_upstream, "fetchmail")
    out = tmp_path / "out"
    out.mkdir()
    rc = tmp_path / "fetchmailrc"

    def poll(port: int, security: str, keep: str = "keep") -> str:
        rc.write_text(f'set no syslog\npoll localhost port {port} protocol IMAP user "{BOB[0]}" password "{BOB[1]}" '
                      f'{security} sslcertck sslcertfile "{gateway_cert[0]}" {keep} '
                      f"mda \"/bin/sh -c 'cat > {out}/$$'\"\n")
        rc.chmod(0o600)
        proc = subprocess.run(["fetchmail", "-v", "-f", str(rc), "-i", str(tmp_path / "ids"), "--nodetach"],
                              capture_output=True, text=True, timeout=30, env={**os.environ, "HOME": str(tmp_path)})
        # 0: mail fetched; 1: no mail.
        assert proc.returncode in (0, 1), proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    poll(proxy.tls_port, "ssl")
    got = _by_message_id(out)
    assert expected.keys() <= got.keys()
    _check_tags(proxy, got, expected)
    for mid in expected:
        assert b"\\Seen" in _flags(imap_upstream, mid)

    # The second poll (STARTTLS) finds nothing new.
    log = poll(proxy.starttls_port, "sslproto tls1.2+")
    assert "upgrade to TLS succeeded" in log, log
    assert len(list(out.iterdir())) == len(got)

    # Without "keep" fetchmail deletes what it took.
    mid, raw = message("Mr Bob Customer <mr@bobcust.test>", to="bob@acme.test", subject="fetchmail flush")
    imap_upstream.deliver("bob@acme.test", raw)
    poll(proxy.tls_port, "ssl", keep="nokeep")
    assert display_names(_by_message_id(out)[mid], "From")[0].startswith("[客户] ")
    assert _gone(imap_upstream, mid)


@pytest.mark.skipif(shutil.which("getmail") is None, reason="getmail not installed (Debian package getmail6)")
def test_getmail_through_proxy(proxy, imap_upstream, gateway_cert, tmp_path):
    expected = _deliver_three(imap_upstream, "getmail")
    out = tmp_path / "out"
    out.mkdir()
    gdir = tmp_path / "getmail"
    gdir.mkdir()

    def run(delete: bool) -> str:
        # getmail refuses Maildir delivery as root: an external MDA writes one file per message.
        (gdir / "getmailrc").write_text(f"""[retriever]
type = SimpleIMAPSSLRetriever
server = localhost
port = {proxy.tls_port}
username = {BOB[0]}
password = {BOB[1]}
ca_certs = {gateway_cert[0]}
mailboxes = ("INBOX",)

[destination]
type = MDA_external
path = /bin/sh
arguments = ("-c", "cat > {out}/$$")
allow_root_commands = true

[options]
read_all = false
delete = {str(delete).lower()}
""")
        proc = subprocess.run(["getmail", "--getmaildir", str(gdir), "--rcfile", "getmailrc"],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and "rror" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        return proc.stdout

    run(delete=False)
    got = _by_message_id(out)
    assert expected.keys() <= got.keys()
    _check_tags(proxy, got, expected)

    # The second run downloads nothing: getmail remembers the UIDs it took.
    assert re.search(r"^\s+0 messages", run(delete=False), re.M)
    assert len(list(out.iterdir())) == len(got)

    mid, raw = message('"Buyer" <buyer@buyer.test>', to="bob@acme.test", subject="getmail delete")
    imap_upstream.deliver("bob@acme.test", raw)
    assert re.search(r"^\s+1 messages", run(delete=True), re.M)
    assert display_names(_by_message_id(out)[mid], "From")[0].startswith("[同事客户] ")
    assert _gone(imap_upstream, mid)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_through_proxy(proxy, imap_upstream, gateway_cert, tmp_path):
    expected = _deliver_three(imap_upstream, "curl")
    base = ["curl", "-sS", "--ssl-reqd", "--cacert", str(gateway_cert[0]), "-u", ":".join(BOB)]
    tls, starttls = f"imaps://localhost:{proxy.tls_port}", f"imap://localhost:{proxy.starttls_port}"

    def curl(*args: str) -> bytes:
        proc = subprocess.run(base + list(args), capture_output=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert b'"/" INBOX\r\n' in curl(f"{tls}/")
    gw = via(proxy, BOB[0])
    got = {}
    for i, mid in enumerate(expected):
        uid = uid_of(gw, mid)
        # curl's ;UID= is UID FETCH n BODY[]; alternate implicit TLS and STARTTLS.
        got[mid] = curl(f"{(tls, starttls)[i % 2]}/INBOX;UID={uid}")
        typ, data = gw.uid("FETCH", str(uid), "(BODY.PEEK[])")
        assert got[mid] == data[0][1]
    gw.logout()
    _check_tags(proxy, got, expected)

    # A flag set by a raw command reaches the upstream.
    mid = next(iter(expected))
    c = direct(imap_upstream, BOB[0])
    uid = uid_of(c, mid)
    c.logout()
    curl(f"{tls}/INBOX", "-X", f"UID STORE {uid} +FLAGS (\\Flagged)")
    assert b"\\Flagged" in _flags(imap_upstream, mid)

    # An upload to Sent (APPEND) is stored as sent; read back, its customer recipient is tagged.
    mid, raw = message("Bob <bob@acme.test>", to="Mr X <x@bobcust.test>", subject="curl append")
    (tmp_path / "up.eml").write_bytes(raw)
    curl("-T", str(tmp_path / "up.eml"), f"{starttls}/Sent")
    gw = via(proxy, BOB[0])
    uid = uid_of(gw, mid, "Sent")
    gw.logout()
    header = curl(f"{tls}/Sent;UID={uid};SECTION=HEADER")
    assert display_names(header, "To")[0].startswith("[客户] Mr X")
