"""Nothing that got a 250 is lost: kill -9 under load, restarts, a full disk."""

from __future__ import annotations

import base64
import email
import os
import re
import smtplib
import ssl
import subprocess
import threading
import time
from email.message import EmailMessage

import pytest

from gateway.db import connect
from gateway.db.models import OutboundMessage
from gateway.demo.sample_data import seed
from tests.harness.gateway import GatewayProcess

pytestmark = pytest.mark.integration

TOKEN = re.compile(rb"Subject: load (\d+-\d+)")


def send_stream(gw, worker: int, count: int, accepted: list, lock: threading.Lock, size: int = 2000) -> None:
    ctx = ssl.create_default_context(cafile=str(gw.cert_path))
    try:
        with smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30) as conn:
            conn.starttls(context=ctx)
            conn.login("alice@acme.test", "alice-pw")
            for i in range(count):
                msg = EmailMessage()
                msg["From"] = "alice@acme.test"
                msg["To"] = "buyer@unknown-buyer.com"
                msg["Subject"] = f"load {worker}-{i}"
                msg.set_content("x" * size)
                conn.sendmail("alice@acme.test", ["buyer@unknown-buyer.com"], msg.as_bytes())
                with lock:
                    accepted.append(f"{worker}-{i}")
    except (smtplib.SMTPException, OSError):
        return  # the gateway was killed under us: only what got a 250 counts


def arrived_tokens(sink) -> list[str]:
    return [m.group(1).decode() for msg in sink.messages() if (m := TOKEN.search(msg.data))]


def wait_for_tokens(sink, wanted: set[str], timeout: float = 60) -> list[str]:
    """Wait until every wanted token has arrived (extra arrivals are allowed)."""
    seen = arrived_tokens(sink)
    need = len(seen) + 1
    deadline = time.monotonic() + timeout
    while not wanted <= set(seen) and time.monotonic() < deadline:
        sink.wait_for(need, timeout=max(0.1, deadline - time.monotonic()))
        seen = arrived_tokens(sink)
        need = len(seen) + 1
    return seen


@pytest.fixture
def fresh_gateway(tmp_path, dovecot):
    gw = GatewayProcess(tmp_path / "gw", dovecot)
    connect(gw.db_url)
    seed()
    yield gw
    gw.stop()


@pytest.mark.parametrize("processes", [1, 2])
def test_kill_9_under_load_loses_nothing(tmp_path, dovecot, sink, processes):
    """Also with an acceptor process sharing the port (smtp.processes = 2): it dies with
    the node (PR_SET_PDEATHSIG) and what it answered 250 for is relayed after the restart."""
    gw = GatewayProcess(tmp_path / "gw", dovecot, {"smtp": {"processes": processes}})
    connect(gw.db_url)
    seed()
    try:
        kill_under_load(gw, sink)
    finally:
        gw.stop()


def kill_under_load(gw, sink) -> None:
    gw.start()
    sink.clear()
    accepted: list[str] = []
    lock = threading.Lock()
    threads = [threading.Thread(target=send_stream, args=(gw, w, 60, accepted, lock)) for w in range(4)]
    for t in threads:
        t.start()
    # Kill in the middle of the stream: once a quarter of the messages got their 250.
    while True:
        with lock:
            if len(accepted) >= 60:
                break
        threads[0].join(0.01)
    gw.kill()
    for t in threads:
        t.join()
    assert 60 <= len(accepted) < 240
    gw.start()
    seen = wait_for_tokens(sink, set(accepted))
    missing = set(accepted) - set(seen)
    duplicates = len(seen) - len(set(seen))
    print(f"accepted={len(accepted)} arrived={len(set(seen))} duplicates={duplicates}")
    assert not missing


def test_a_power_cut_before_the_blob_sync_loses_nothing(tmp_path, dovecot, sink):
    """Accepted messages' blob files are not fsynced one by one (gateway/archive/pending.py):
    until the node's next file-system sync their sealed bytes are durable only in the
    database.  A power cut can leave such a file empty or gone — simulated here, after a
    kill -9, by destroying every blob file that still has a database copy (the sync interval
    is an hour, so that is every message).  The next start writes them again from the
    database, and everything that got a 250 is relayed intact."""
    from gateway.archive.pending import ArchivePendingBlob
    from gateway.archive.store import BlobStore

    gw = GatewayProcess(tmp_path / "gw", dovecot, {"archive": {"blob_sync_interval": 3600.0}})
    connect(gw.db_url)
    seed()
    try:
        gw.start()
        sink.clear()
        accepted: list[str] = []
        send_stream(gw, 0, 12, accepted, threading.Lock())
        assert len(accepted) == 12
        small = ArchivePendingBlob.select().count()
        assert small >= 12  # every accepted message's blob (and a notice's, if any)
        # Mail with an attachment (over PENDING_MAX sealed) is fsynced before its 250 instead.
        big = EmailMessage()
        big["From"], big["To"], big["Subject"] = "alice@acme.test", "buyer@unknown-buyer.com", "load 9-0"
        big.set_content("price list attached")
        big.add_attachment(os.urandom(48 * 1024), maintype="application", subtype="octet-stream",
                           filename="prices.bin")
        with smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30) as conn:
            conn.starttls(context=ssl.create_default_context(cafile=str(gw.cert_path)))
            conn.login("alice@acme.test", "alice-pw")
            conn.sendmail("alice@acme.test", ["buyer@unknown-buyer.com"],
                          big.as_bytes(policy=big.policy.clone(linesep="\r\n")))
        accepted.append("9-0")
        assert ArchivePendingBlob.select().count() == small
        gw.kill()
        rows = list(ArchivePendingBlob.select())
        store = BlobStore(gw.base_dir / "var" / "archive", gw.base_dir / "certs" / "archive.keys")
        for i, row in enumerate(rows):
            path = store.path_of(row.name)
            assert path.exists()
            if i % 2:
                path.unlink()  # the directory entry never reached the disk
            else:
                path.write_bytes(b"")  # the entry did, the data did not
        gw.start()
        seen = wait_for_tokens(sink, set(accepted))
        assert set(accepted) <= set(seen)
        for msg in sink.messages():  # whole messages, not torn files
            if (m := TOKEN.search(msg.data)) and m.group(1) != b"9-0":
                body = email.message_from_bytes(msg.data).get_payload(decode=True)
                assert body.decode().strip() == "x" * 2000
        assert ArchivePendingBlob.select().count() == 0  # written again, then dropped
        assert "blob files written again from the database" in gw.log_text()
    finally:
        gw.stop()
    from gateway.cli import main

    assert main(["-c", str(gw.config_path), "archive", "verify"]) == 0


def test_queue_survives_restart_while_upstream_refuses(fresh_gateway, dovecot, sink):
    """Messages queued while the relay cannot log in stay queued across a restart."""
    gw = fresh_gateway
    gw.start()
    sink.clear()
    dovecot.add_user("relay@acme.test", "temporarily-changed")
    accepted: list[str] = []
    send_stream(gw, 9, 3, accepted, threading.Lock())
    assert len(accepted) == 3
    gw.kill()  # no clean shutdown between the 250s and the relay
    assert sink.messages() == []
    # Accepted mail is queued as its archive blob, not as a second spool file.
    rows = list(OutboundMessage.select().where(OutboundMessage.state == "queued"))
    assert len(rows) == 3 and all(r.spool_path.startswith("archive:") for r in rows)
    spool_dir = gw.base_dir / "var" / "spool"
    assert spool_dir.is_dir() and not list(spool_dir.glob("*.eml"))
    dovecot.add_user("relay@acme.test", "relay-pw")
    gw.start()
    seen = wait_for_tokens(sink, set(accepted))
    assert set(accepted) <= set(seen)


def test_disk_full_answers_452_and_never_250_unstored(tmp_path, dovecot, sink):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    gw = None
    try:
        gw = GatewayProcess(tmp_path / "gw", dovecot, {"node": {"data_dir": str(small)}})
        connect(gw.db_url)
        seed()
        gw.start()
        sink.clear()
        ctx = ssl.create_default_context(cafile=str(gw.cert_path))
        got_250, refused = [], None
        with smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30) as conn:
            conn.starttls(context=ctx)
            conn.login("alice@acme.test", "alice-pw")
            for i in range(40):
                # Random text: the archive compresses blobs, so only incompressible mail fills the disk.
                lines = base64.encodebytes(os.urandom(54 * 400)).replace(b"\n", b"\r\n")
                body = f"Subject: full {i}\r\n\r\n".encode() + lines
                try:
                    conn.sendmail("alice@acme.test", ["b@unknown-buyer.com"], body)
                    got_250.append(i)
                except smtplib.SMTPDataError as exc:
                    refused = exc
                    break
        assert refused is not None and refused.smtp_code == 452, refused
        assert b"4.3.1" in refused.smtp_error
        arrived = sink.wait_for(len(got_250), timeout=30)
        assert sorted(int(m.data.split(b"Subject: full ")[1].split(b"\r\n")[0]) for m in arrived) == got_250
    finally:
        if gw is not None:
            gw.stop()
        subprocess.run(["umount", "-l", str(small)])
