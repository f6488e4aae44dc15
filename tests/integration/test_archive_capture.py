"""Every archive capture path against a running gateway and the real Dovecot:
submission accepted / refused / held, the relayed copy, a whole message served by the
IMAP proxy, the master-user sync, and `mailgate archive import` from an IMAP account;
then `mailgate archive verify` passes, and reports an altered blob."""

from __future__ import annotations

import json
import re
import uuid
from email.message import EmailMessage

import pytest
from imapclient import IMAPClient

from gateway.archive.schema import ArchiveRecord, ArchiveSighting
from gateway.cli import main
from gateway.db import connect
from tests.harness import wait_until
from tests.harness.gateway import seeded
from tests.integration.test_approval_flow import HOLD_RULE
from tests.integration.test_submission import submit, tls_ctx

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def gw(tmp_path_factory, dovecot, sink):
    archive = {"sync_enabled": True, "master_user": "archiver", "master_password": "archiver-pw",
               "sync_interval": 0.5, "capture_imap": True}
    g = seeded(tmp_path_factory.mktemp("archive-capture"), dovecot, {"archive": archive},
               rules={"70-hold-japan.yaml": HOLD_RULE})
    g.start()
    yield g
    g.stop()


def sightings(**where) -> list[ArchiveSighting]:
    q = ArchiveSighting.select()
    for k, v in where.items():
        q = q.where(getattr(ArchiveSighting, k) == v)
    return list(q.order_by(ArchiveSighting.seq))


def mail(to: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "alice@acme.test"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(f"body of {subject}")
    return msg


def unique(label: str) -> str:
    return f"{label} {uuid.uuid4().hex[:8]}"


def test_accepted_submission_and_relayed_copy(gw, sink):
    subject = unique("Accepted")
    sent = mail("einkauf@hamburg-tools.de", subject)
    code, text = submit(gw, "alice@acme.test", "alice-pw", sent)
    assert code == 250, text
    rec = ArchiveRecord.get(ArchiveRecord.subject == subject)
    [sub] = sightings(record=rec.id, place="smtp:submitted")
    assert (sub.verdict, sub.direction, sub.employee_email) == ("accepted", "outbound", "alice@acme.test")
    assert json.loads(sub.trace), "the rule trace is archived"
    relayed = wait_until(lambda: sightings(queue_id=sub.queue_id, place="relay:sent"), what="relay:sent sighting")
    assert relayed[0].verdict == "sent" and json.loads(relayed[0].recipients) == ["einkauf@hamburg-tools.de"]
    from gateway.archive import for_config
    from gateway.config import load

    archive = for_config(load(gw.config_path))
    raw = archive.read(ArchiveRecord.get_by_id(relayed[0].record_id))
    assert f"Subject: {subject}".encode() in raw
    # The gateway DKIM-signed (and could have rewritten) the relayed copy; the client's bytes
    # as submitted are kept beside it: only the gateway's Received and Message-ID added.
    assert relayed[0].record_id == rec.id and b"DKIM-Signature:" in raw
    submitted = archive.read_original(rec)
    assert submitted is not None and b"DKIM-Signature:" not in submitted
    assert submitted.startswith(b"Received: from ")
    # smtplib's data() sends bytes with bare LFs as they are and ends them with CRLF; the
    # gateway turns each bare LF into CRLF.
    assert submitted.endswith(re.sub(rb"(?<!\r)\n", b"\r\n", sent.as_bytes()) + b"\r\n")


def test_submission_becomes_searchable(gw):
    """The node indexes off the mail path (archive service's background indexer): the
    message turns up in a search shortly after the 250, once."""
    from gateway.archive.search import record_ids
    from gateway.archive.search_schema import SearchDoc

    token = uuid.uuid4().hex[:12]
    code, text = submit(gw, "alice@acme.test", "alice-pw", mail("einkauf@hamburg-tools.de", f"Indexed {token}"))
    assert code == 250, text
    rec = ArchiveRecord.get(ArchiveRecord.subject == f"Indexed {token}")
    assert wait_until(lambda: record_ids(token), what="the search index entry") == [rec.id]
    assert record_ids(f"body of Indexed {token}") == [rec.id]  # the body text is indexed too
    wait_until(lambda: sightings(record=rec.id, place="relay:sent"), what="relay:sent sighting")
    assert SearchDoc.select().where(SearchDoc.record_id == rec.id).count() == 1


def test_refused_submission(gw):
    subject = unique("Poaching")
    code, _ = submit(gw, "alice@acme.test", "alice-pw", mail("lagos.imports@gmail.com", subject))
    assert code == 550
    rec = ArchiveRecord.get(ArchiveRecord.subject == subject)
    [s] = sightings(record=rec.id)
    assert s.verdict == "refused" and "lagos.imports@gmail.com" in s.reason
    hits = [step for step in json.loads(s.trace) if step["hit"]]  # the rule trace says which rule refused
    assert [step["rule"] for step in hits if step["mode"] == "enforce"][:1] == ["send-conflict"]


def test_held_submission(gw):
    subject = unique("Japan offer")
    code, text = submit(gw, "alice@acme.test", "alice-pw", mail("tanaka@osaka-machinery.jp", subject))
    assert code == 250, text
    rec = ArchiveRecord.get(ArchiveRecord.subject == subject)
    [s] = sightings(record=rec.id)
    assert s.verdict == "held" and "Japan: manager approval" in s.reason
    assert any(step["rule"] == "hold-japan" and step["hit"] for step in json.loads(s.trace))


def test_imap_proxy_whole_fetch_is_archived(gw, dovecot):
    subject = unique("Inquiry via proxy")
    raw = f"From: buyer@hamburg-tools.de\r\nTo: bob@acme.test\r\nSubject: {subject}\r\n\r\nPlease quote.\r\n"
    dovecot.deliver("bob@acme.test", raw.encode())
    with IMAPClient("127.0.0.1", port=gw.imap_port, ssl=False, timeout=30) as c:
        c.starttls(tls_ctx(gw))
        c.login("bob@acme.test", "bob-pw")
        c.select_folder("INBOX")
        uid = max(c.search(["SUBJECT", subject.split()[-1]]))
        body = c.fetch([uid], ["BODY[]"])[uid][b"BODY[]"]
    assert subject.encode() in body
    got = wait_until(lambda: sightings(place="imap:bob@acme.test/INBOX", ref=f"{_uidvalidity(gw, 'bob')}:{uid}"),
                   what="imap sighting")
    assert got[0].direction == "inbound" and got[0].employee_email == "bob@acme.test"
    assert ArchiveRecord.get_by_id(got[0].record_id).subject == subject


def _uidvalidity(gw, user: str) -> int:
    with IMAPClient("127.0.0.1", port=gw.dovecot.imaps_port, ssl=True, ssl_context=gw.dovecot.ssl_context()) as c:
        c.login(f"{user}@acme.test*archiver", "archiver-pw")
        return int(c.select_folder("INBOX", readonly=True)[b"UIDVALIDITY"])


def test_master_user_sync(gw, dovecot):
    subject = unique("Synced")
    dovecot.deliver("carol@acme.test", f"From: x@y.example\r\nSubject: {subject}\r\n\r\nhi\r\n".encode())
    rec = wait_until(lambda: ArchiveRecord.get_or_none(ArchiveRecord.subject == subject), what="synced record")
    [s] = sightings(record=rec.id)
    assert s.place == "sync:carol@acme.test/INBOX" and s.verdict == "seen" and s.direction == "inbound"
    # Sent: mail carol sent from another client (straight to the provider) is archived as outbound.
    sent = unique("Sent elsewhere")
    with IMAPClient("127.0.0.1", port=gw.dovecot.imaps_port, ssl=True, ssl_context=gw.dovecot.ssl_context()) as c:
        c.login("carol@acme.test*archiver", "archiver-pw")
        if not c.folder_exists("Sent"):
            c.create_folder("Sent")
        c.append("Sent", f"From: carol@acme.test\r\nTo: x@y.example\r\nSubject: {sent}\r\n\r\nhi\r\n".encode())
    rec = wait_until(lambda: ArchiveRecord.get_or_none(ArchiveRecord.subject == sent), what="synced Sent record")
    [s] = sightings(record=rec.id)
    assert (s.place, s.direction, s.employee_email) == ("sync:carol@acme.test/Sent", "outbound", "carol@acme.test")


def test_import_from_imap_account_is_idempotent(gw, dovecot, monkeypatch, capsys):
    subject = unique("Imported")
    dovecot.deliver("sales@acme.test", f"From: a@b.example\r\nSubject: {subject}\r\n\r\nold mail\r\n".encode())
    monkeypatch.setenv("MAILGATE_IMPORT_PASSWORD", "sales-pw")
    argv = ["-c", str(gw.config_path), "archive", "import", "--imap-user", "sales@acme.test", "--folder", "INBOX"]
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr()
    out, err = capsys.readouterr()
    final = re.findall(r"^import: (\d+)/(\d+) messages \(\d+/s\), done$", err, re.M)
    assert len(final) == 1 and final[0][0] == final[0][1] != "0", err  # the progress has the folder's total
    assert re.fullmatch(rf"imported {final[0][0]} message\(s\): \d+ new record\(s\), [1-9]\d* new "
                        r"sighting\(s\), 0 skipped\n", out), out
    connect(gw.db_url)  # the CLI bound the models to its own connection
    rec = ArchiveRecord.get(ArchiveRecord.subject == subject)
    place = "import:imap:sales@acme.test/INBOX"
    assert len(sightings(record=rec.id, place=place)) == 1
    assert main(argv) == 0
    assert re.search(r", 0 new sighting\(s\), 0 skipped$", capsys.readouterr().out, re.M)
    connect(gw.db_url)
    assert len(sightings(record=rec.id, place=place)) == 1  # a second import adds nothing



def test_import_from_imap_skips_a_missing_folder_and_the_progress_still_ends(gw, dovecot, monkeypatch, capsys):
    dovecot.deliver("sales@acme.test", f"From: a@b.example\r\nSubject: {unique('Imported')}\r\n\r\nold\r\n".encode())
    monkeypatch.setenv("MAILGATE_IMPORT_PASSWORD", "sales-pw")
    argv = ["-c", str(gw.config_path), "archive", "import", "--imap-user", "sales@acme.test",
            "--folder", "No-Such-Folder", "--folder", "INBOX"]
    capsys.readouterr()
    assert main(argv) == 1  # one folder failed
    out, err = capsys.readouterr()
    final = re.findall(r"^import: (\d+)/(\d+) messages \(\d+/s\), done$", err, re.M)
    assert len(final) == 1 and final[0][0] == final[0][1] != "0", err
    assert re.search(r"^skipped: sales@acme\.test/No-Such-Folder: ", err, re.M), err
    assert re.fullmatch(rf"imported {final[0][0]} message\(s\): \d+ new record\(s\), [1-9]\d* new "
                        r"sighting\(s\), 1 skipped\n", out), out  # INBOX was still imported
    connect(gw.db_url)

class RawMail(dict):
    """Bytes for ``submit`` as they are (no email package in between)."""

    def __init__(self, raw: bytes) -> None:
        super().__init__(To="einkauf@hamburg-tools.de")
        self.raw = raw

    def as_bytes(self) -> bytes:
        return self.raw


def malformed(token: str) -> dict[str, bytes]:
    t = token.encode()
    head = b"From: alice@acme.test\r\nTo: einkauf@hamburg-tools.de\r\n"
    return {
        "no-headers": b"only a line of text " + t + b"a\r\n",
        "8bit": head + b"Subject: \xff\xfe\x80 " + t + b"b\r\n\r\nbody \xe4\xf6\xff " + t + b"b\r\n",
        "nul": head + b"Subject: n\x00ul\r\n\r\nbody\x00\x00 " + t + b"c\r\n",
        "boundary": head + (b"Subject: parts\r\nContent-Type: multipart/mixed; boundary=\"zz\"\r\n\r\n--zz\r\n"
                            b"Content-Type: text/plain\r\n\r\npart " + t + b"d\r\n--z\r\nno end\r\n"),
        "rfc2047": head + b"Subject: =?utf-8?q?" + t + b"e=ZZ?= =?x-martian?b?!!!?=\r\n"
                          b"Content-Type: text/plain; charset=x-martian\r\n\r\nbody " + t + b"e\r\n",
    }


def test_malformed_submissions_are_archived_byte_exact_and_searchable(gw):
    """Each is accepted, archived as the client sent it (after the gateway's Received and
    Message-ID lines) and found by a word of it once the node's indexer has it."""
    from gateway.archive import for_config
    from gateway.archive.search import record_ids
    from gateway.config import load
    from tests.integration.test_submission import QUEUED

    archive = for_config(load(gw.config_path))
    token = uuid.uuid4().hex[:10]
    for n, (name, raw) in enumerate(malformed(token).items()):
        code, text = submit(gw, "alice@acme.test", "alice-pw", RawMail(raw))
        assert code == 250, (name, text)
        [sub] = sightings(queue_id=QUEUED.search(text).group(1).decode(), place="smtp:submitted")
        rec = ArchiveRecord.get_by_id(sub.record_id)
        submitted = archive.read_original(rec) or archive.read(rec)
        assert submitted.startswith(b"Received: from ") and submitted.endswith(raw), name
        word = f"{token}{'abcde'[n]}"
        assert wait_until(lambda word=word: record_ids(word), what=f"{name} in the index") == [rec.id], name


def test_verify_passes_then_reports_an_altered_blob(gw, capsys):
    assert main(["-c", str(gw.config_path), "archive", "verify", "--quiet"]) == 0, capsys.readouterr().out
    connect(gw.db_url)
    from gateway.archive import for_config
    from gateway.config import load

    rec = ArchiveRecord.select().where(ArchiveRecord.purged_at.is_null()).order_by(ArchiveRecord.id).first()
    path = for_config(load(gw.config_path)).blob_path(rec)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["-c", str(gw.config_path), "archive", "verify", "--quiet"]) == 1
    assert f"record {rec.id}" in capsys.readouterr().out
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    connect(gw.db_url)


def test_verify_prints_and_checks_anchors_kept_off_host(gw, capsys):
    argv = ["-c", str(gw.config_path), "archive", "verify", "--no-blobs", "--quiet"]
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    kept = re.search(r"^anchor: (\d+):([0-9a-f]{64})$", out, re.M)
    assert kept, out
    seq, h = int(kept[1]), kept[2]
    from gateway.config import load

    anchors_file = load(gw.config_path).archive_dir / "chain-anchors.log"
    assert f"{seq}:{h} " in anchors_file.read_text()  # the checkpoint's line
    assert main(["-c", str(gw.config_path), "archive", "head"]) == 0
    assert re.fullmatch(r"anchor: \d+:[0-9a-f]{64}\nanchor: oplog:\d+:[0-9a-f]{64}\n", capsys.readouterr().out)
    assert main([*argv, "--anchor", f"{seq}:{h}"]) == 0
    capsys.readouterr()
    assert main([*argv, "--anchor", f"{seq}:{h}", "--anchor", f"{seq + 10**6}:{h}"]) == 1
    assert "tail was cut" in capsys.readouterr().out
    assert main([*argv, "--anchor", f"{seq}:{'0' * 64}"]) == 1
    assert "another hash" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--anchor", f"{seq}-{h}"])
    assert exc.value.code == 2 and "not an anchor" in capsys.readouterr().err
    connect(gw.db_url)


def test_verify_reports_an_altered_and_a_deleted_record(gw, capsys):
    from gateway.db.models import database

    argv = ["-c", str(gw.config_path), "archive", "verify", "--no-blobs", "--quiet"]
    rec = ArchiveRecord.select().order_by(ArchiveRecord.seq).first()
    database.execute_sql("UPDATE archiverecord SET subject = ? WHERE id = ?", ("rewritten", rec.id))
    capsys.readouterr()
    assert main(argv) == 1
    assert f"record {rec.id} (seq {rec.seq}) was altered" in capsys.readouterr().out
    connect(gw.db_url)
    database.execute_sql("UPDATE archiverecord SET subject = ? WHERE id = ?", (rec.subject, rec.id))
    victim = ArchiveSighting.select().order_by(ArchiveSighting.seq).first()
    ArchiveSighting.delete().where(ArchiveSighting.id == victim.id).execute()
    assert main(argv) == 1
    assert f"entries {victim.seq}..{victim.seq} are missing" in capsys.readouterr().out
    connect(gw.db_url)
    victim.save(force_insert=True)
    assert main(argv) == 0, capsys.readouterr().out
    connect(gw.db_url)


@pytest.fixture(scope="module")
def optin(tmp_path_factory, dovecot, sink):
    """A node without a master user: the sync reads with logins captured at proxy login."""
    archive = {"sync_enabled": True, "capture_credentials_opt_in": True, "sync_interval": 0.5,
               "capture_imap": True}
    g = seeded(tmp_path_factory.mktemp("archive-optin"), dovecot, {"archive": archive})
    g.start()
    yield g
    g.stop()


def test_opt_in_credentials_are_sealed_and_feed_the_sync(optin, dovecot):
    from gateway.archive.schema import ArchiveCredential

    connect(optin.db_url)
    subject = unique("Opt-in synced")
    dovecot.deliver("carol@acme.test", f"From: x@y.example\r\nSubject: {subject}\r\n\r\nhi\r\n".encode())
    assert ArchiveCredential.get_or_none(ArchiveCredential.account == "carol@acme.test") is None
    with IMAPClient("127.0.0.1", port=optin.imap_port, ssl=False, timeout=30) as c:
        c.starttls(tls_ctx(optin))
        c.login("carol@acme.test", "carol-pw")  # no FETCH: only the sync can archive the message
    cred = wait_until(lambda: ArchiveCredential.get_or_none(ArchiveCredential.account == "carol@acme.test"),
                    what="captured login")
    assert b"carol-pw" not in bytes(cred.sealed), "the password is kept encrypted"
    rec = wait_until(lambda: ArchiveRecord.get_or_none(ArchiveRecord.subject == subject), what="opt-in sync")
    assert [s.place for s in sightings(record=rec.id)] == ["sync:carol@acme.test/INBOX"]
