"""A Debian command-line client (mbsync) syncing a whole mailbox through the proxy."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.imap.helpers import display_names, message

CONFIG = """IMAPAccount {name}
Host localhost
Port {port}
User bob@acme.test
Pass bob-pw
SSLType IMAPS
CertificateFile {cert}
PipelineDepth 5

IMAPStore {name}-remote
Account {name}

MaildirStore {name}-local
Path {path}/
Inbox {path}/INBOX
SubFolders Verbatim

Channel {name}
Far :{name}-remote:
Near :{name}-local:
Patterns INBOX
Create Near
Sync Pull
SyncState *
"""


def _sync(tmp: Path, name: str, port: int, cert: Path) -> dict[int, bytes]:
    path = tmp / name
    path.mkdir()
    conf = tmp / f"{name}.rc"
    conf.write_text(CONFIG.format(name=name, port=port, cert=cert, path=path))
    proc = subprocess.run(["mbsync", "-c", str(conf), "-a"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = {}
    for f in (path / "INBOX").glob("*/*"):
        m = re.search(r",U=(\d+)", f.name)
        assert m, f.name
        # mbsync marks stored messages with a random X-TUID line: not part of the comparison.
        out[int(m.group(1))] = re.sub(rb"(?m)^X-TUID: [^\n]*\n", b"", f.read_bytes())
    return out


@pytest.mark.skipif(shutil.which("mbsync") is None, reason="mbsync (isync) not installed")
def test_mbsync_through_proxy_matches_direct_sync(proxy, imap_upstream, gateway_cert, tmp_path):
    for i in range(5):
        imap_upstream.deliver("bob@acme.test", message(f"Plain {i} <plain{i}@unknown.test>", to="bob@acme.test")[1])
    imap_upstream.deliver("bob@acme.test", message("Mr Bob Customer <mr@bobcust.test>", to="bob@acme.test",
                                                   body="t" * 200_000 + "\r\n")[1])
    imap_upstream.deliver("bob@acme.test", message('"Buyer" <buyer@buyer.test>', to="bob@acme.test")[1])
    via = _sync(tmp_path, "via", proxy.tls_port, gateway_cert[0])
    direct = _sync(tmp_path, "direct", imap_upstream.imaps_port, imap_upstream.cert_path)
    assert via.keys() == direct.keys() and len(via) >= 7
    tagged = 0
    for uid, original in direct.items():
        got = via[uid]
        if got == original:
            continue
        tagged += 1
        # Only the From line differs; the body is identical.
        h1, _, b1 = got.partition(b"\n\n")
        h2, _, b2 = original.partition(b"\n\n")
        assert b1 == b2
        diff = set(h1.split(b"\n")) ^ set(h2.split(b"\n"))
        assert all(line.startswith(b"From:") for line in diff), diff
        names = display_names(got, "From")
        assert names[0].startswith("[客户] ") or names[0].startswith("[同事客户] ")
    assert tagged >= 2  # bob's own customer and alice's (a colleague's) customer
