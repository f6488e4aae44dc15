"""The test harness itself: private Dovecot, SMTP sink and PostgreSQL really work."""

from __future__ import annotations

import imaplib
import smtplib
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg2
import pytest

from gateway.demo.sink import SinkServer, read_messages
from gateway.demo.upstream import DovecotUpstream

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
WANTED_CAPABILITIES = {
    "IDLE",
    "CONDSTORE",
    "QRESYNC",
    "MOVE",
    "UIDPLUS",
    "LITERAL+",
    "SPECIAL-USE",
    "ENABLE",
    "ID",
    "NAMESPACE",
}


def make_message(subject: str, body: str = "Hello from the harness.\r\n") -> bytes:
    return (
        f"From: Buyer <buyer@buyer.test>\r\nTo: alice@acme.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@buyer.test>\r\n\r\n{body}"
    ).encode()


def fetch_by_subject(imap: imaplib.IMAP4, subject: str) -> bytes:
    imap.select("INBOX", readonly=True)
    typ, data = imap.search(None, "HEADER", "Subject", subject)
    assert typ == "OK"
    [num] = data[0].split()
    typ, parts = imap.fetch(num, "(BODY.PEEK[])")
    assert typ == "OK"
    return parts[0][1]


def tls(dovecot: DovecotUpstream) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(dovecot.cert_path))


def test_lmtp_delivery_read_over_imaps(dovecot: DovecotUpstream) -> None:
    subject = f"imaps-{uuid.uuid4().hex}"
    raw = make_message(subject)
    dovecot.deliver("alice@acme.test", raw)
    with imaplib.IMAP4_SSL(dovecot.host, dovecot.imaps_port, ssl_context=tls(dovecot)) as imap:
        imap.login("alice@acme.test", "alice-pw")
        typ, caps = imap.capability()  # imaplib keeps the pre-login list in .capabilities
        assert WANTED_CAPABILITIES <= set(caps[0].decode().split())
        got = fetch_by_subject(imap, subject)
    assert got.endswith(raw)  # LMTP prepends Return-Path, Delivered-To and Received


def test_starttls_and_special_use_folders(dovecot: DovecotUpstream) -> None:
    subject = f"starttls-{uuid.uuid4().hex}"
    dovecot.deliver("bob@acme.test", make_message(subject))
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as imap:
        imap.starttls(ssl_context=tls(dovecot))
        imap.login("bob@acme.test", "bob-pw")
        assert subject.encode() in fetch_by_subject(imap, subject)
        typ, folders = imap.list()
        assert typ == "OK"
    listed = b"\n".join(folders)
    for flag, name in [(rb"\Drafts", b"Drafts"), (rb"\Sent", b"Sent"), (rb"\Junk", b"Junk"), (rb"\Trash", b"Trash")]:
        assert flag in listed and name in listed


def test_deliver_to_unknown_user_raises(dovecot: DovecotUpstream) -> None:
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        dovecot.deliver("nobody@acme.test", make_message("lost"))


def test_master_user_reads_another_mailbox(dovecot: DovecotUpstream) -> None:
    subject = f"master-{uuid.uuid4().hex}"
    dovecot.deliver("carol@acme.test", make_message(subject))
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as imap:
        imap.login("carol@acme.test*archiver", "archiver-pw")
        assert subject.encode() in fetch_by_subject(imap, subject)


def test_add_user_is_picked_up_without_restart(dovecot: DovecotUpstream) -> None:
    address = f"new-{uuid.uuid4().hex[:8]}@acme.test"
    for password in ("first-password", "second"):  # also a re-password within one second
        dovecot.add_user(address, password)
        with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as imap:
            assert imap.login(address, password)[0] == "OK"


def test_wrong_password_is_refused_quickly(dovecot: DovecotUpstream, record_property) -> None:
    timings = []
    for _ in range(3):  # a penalty would grow on repeated failures
        with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as imap:
            start = time.monotonic()
            with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
                imap.login("alice@acme.test", "wrong-pw")
            timings.append(time.monotonic() - start)
    record_property("failed_login_seconds", timings)
    print(f"failed IMAP logins took {', '.join(f'{t:.3f}' for t in timings)} s")


def test_imap_id_x_originating_ip_is_trusted(dovecot: DovecotUpstream) -> None:
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as imap:
        typ, _ = imap.xatom("ID", '("x-originating-ip" "192.0.2.7" "x-originating-port" "40123")')
        assert typ == "OK"
        imap.login("sales@acme.test", "sales-pw")
        # anvil (doveadm who) knows the session by the forwarded address, not 127.0.0.1
        who = subprocess.run(
            ["doveadm", "-c", str(dovecot.config_path), "who", "-1", "sales@acme.test"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    assert "192.0.2.7" in who, who


def test_submission_relays_exact_bytes_to_sink(dovecot: DovecotUpstream, sink: SinkServer) -> None:
    sink.clear()
    raw = make_message(
        f"submission-{uuid.uuid4().hex}", "Grüße, 8-bit body.\r\n.leading dot\r\n".replace("Grüße", "Gr\u00fc\u00dfe")
    )
    with smtplib.SMTP(dovecot.host, dovecot.submission_port, local_hostname="client.test") as smtp:
        smtp.starttls(context=tls(dovecot))
        smtp.user, smtp.password = "relay@acme.test", "relay-pw"
        smtp.auth("PLAIN", smtp.auth_plain)
        refused = smtp.sendmail("relay@acme.test", ["buyer@buyer.test"], raw, mail_options=["BODY=8BITMIME"])
    assert refused == {}
    [got] = sink.wait_for(1, timeout=10)
    # Dovecot's submission service prepends its Received header (no setting turns it off)
    assert got.data.endswith(raw)
    first, *folded = got.data[: -len(raw)].split(b"\r\n")[:-1]
    assert first.startswith(b"Received: from client.test") and all(line[:1] in b" \t" for line in folded)
    assert "BODY=8BITMIME" in got.mail_options
    assert got.mail_from == "relay@acme.test"
    assert got.rcpt_tos == ["buyer@buyer.test"]


def test_submissions_implicit_tls(dovecot: DovecotUpstream) -> None:
    with smtplib.SMTP_SSL(
        dovecot.host, dovecot.submissions_port, local_hostname="client.test", context=tls(dovecot)
    ) as smtp:
        assert smtp.login("alice@acme.test", "alice-pw")[0] == 235


def test_sink_failure_modes(sink: SinkServer) -> None:
    sink.clear()
    sink.fail_rcpt["Bad@Buyer.test"] = (550, "5.1.1 no such user")
    sink.defer_next = 1
    with smtplib.SMTP("127.0.0.1", sink.port, local_hostname="client.test") as smtp:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            smtp.sendmail("a@acme.test", ["bad@buyer.test"], b"Subject: x\r\n\r\nx\r\n")
        with pytest.raises(smtplib.SMTPDataError) as deferred:
            smtp.sendmail("a@acme.test", ["good@buyer.test"], b"Subject: x\r\n\r\nx\r\n")
        assert deferred.value.smtp_code == 451
        smtp.sendmail("a@acme.test", ["good@buyer.test"], b"Subject: y\r\n\r\ny\r\n")
    [got] = sink.wait_for(1)
    assert got.data == b"Subject: y\r\n\r\ny\r\n"
    sink.clear()
    assert sink.fail_rcpt == {} and sink.defer_next == 0 and sink.messages() == []


def test_sink_as_subprocess(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.demo.sink", "--port", "0", "--dir", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()  # blocks until the sink listens
        assert ready.startswith("READY "), ready
        port = int(ready.split()[1])
        raw = "Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\ncaf\u00e9\r\n".encode()
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test") as smtp:
            smtp.sendmail("caf\u00e9@acme.test", ["b@buyer.test"], raw, mail_options=["SMTPUTF8"])
        [got] = read_messages(tmp_path)
        assert got.data == raw and got.mail_from == "caf\u00e9@acme.test"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_postgres_select_1(postgres) -> None:
    with psycopg2.connect(postgres.url) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    conn.close()
    url = postgres.create_database("harness_check")
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_database()")
        assert cur.fetchone() == ("harness_check",)
    conn.close()
