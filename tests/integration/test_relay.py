"""The relay worker against real servers: Dovecot submission (STARTTLS/TLS + AUTH)
relaying into the sink, and the sink itself for failure injection.

No sleeps: the worker's clock is a ``Clock`` the test moves, and ``run_once``
does the work of one wake-up.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import json
import logging
import socket
import threading
from pathlib import Path

import pytest

from gateway.config import Config, ConfigError
from gateway.credentials import load_or_create_key, seal
from gateway.db import connect
from gateway.db.models import OutboundMessage, database, utcnow
from gateway.demo.sink import SinkServer
from gateway.demo.upstream import free_ports
from gateway.relay import RelayWorker
from gateway.spool import Spool, new_queue_id
from tests.harness import LogSeen

pytestmark = pytest.mark.integration

MESSAGE = (
    b"From: Alice <alice@acme.test>\r\n"
    b"To: buyer@customer.example\r\n"
    b"Subject: Quotation 2024-17\r\n"
    b"Message-ID: <q17@acme.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    + "Dear buyer,\r\n\r\n报价见附件。\r\n.leading dot line\r\n".encode()
)


class Clock:
    """The worker's idea of now (naive UTC, like the DB): frozen at its first
    reading (after the test queued its messages), then moved only by the test."""

    def __init__(self) -> None:
        self.value: dt.datetime | None = None

    def __call__(self) -> dt.datetime:
        if self.value is None:
            self.value = utcnow()
        return self.value

    def advance(self, seconds: float) -> None:
        self.value = self() + dt.timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def spool(tmp_path) -> Spool:
    connect("sqlite:///" + str(tmp_path / "mailgate.db"))
    yield Spool(tmp_path / "spool")
    database.close()


@pytest.fixture
def key(tmp_path) -> bytes:
    return load_or_create_key(tmp_path / "queue.key")


@pytest.fixture
def workers():
    """Workers made by a test are closed after it."""
    made: list[RelayWorker] = []
    yield made
    for worker in made:
        asyncio.run(worker.aclose())


@pytest.fixture(autouse=True)
def clean_sink(sink):
    sink.clear()
    yield


def config(
    host: str,
    port: int,
    security: str,
    *,
    mode: str = "relay_account",
    ca_file: Path | None = None,
    verify_tls: bool = True,
) -> Config:
    cfg = Config()
    cfg.relay.host, cfg.relay.port, cfg.relay.security = host, port, security
    cfg.relay.mode = mode
    if mode == "relay_account":
        cfg.relay.username, cfg.relay.password = "relay@acme.test", "relay-pw"
    cfg.relay.retry_initial, cfg.relay.retry_max = 60, 600
    cfg.relay.lifetime = 3600
    cfg.upstream.ca_file = ca_file
    cfg.upstream.verify_tls = verify_tls
    cfg.upstream.timeout = 10
    cfg.smtp.hostname = "mail.acme.test"
    return cfg


def via_dovecot(dovecot, **kw) -> Config:
    return config(dovecot.host, dovecot.submission_port, "starttls", ca_file=dovecot.cert_path, **kw)


def via_sink(sink, **kw) -> Config:
    return config("127.0.0.1", sink.port, "none", **kw)


def make_worker(workers, cfg: Config, spool: Spool, clock: Clock, key: bytes | None = None, name: str = "w1"):
    worker = RelayWorker(cfg, spool, name, key, now=clock)
    workers.append(worker)
    return worker


def run_once(worker: RelayWorker) -> int:
    return asyncio.run(worker.run_once())


def row(queue_id: str) -> OutboundMessage:
    return OutboundMessage.get(OutboundMessage.queue_id == queue_id)


def bounces() -> list[OutboundMessage]:
    return list(OutboundMessage.select().where(OutboundMessage.is_bounce == True))  # noqa: E712


def dsn_status(raw: bytes) -> list[dict[str, str]]:
    report = email.message_from_bytes(raw)
    assert report.get_content_type() == "multipart/report"
    status = report.get_payload()[1]
    assert status.get_content_type() == "message/delivery-status"
    return [dict(block) for block in status.get_payload()[1:]]


def received(sink, count: int = 1) -> list:
    return sink.wait_for(count, timeout=20)


@pytest.fixture(params=[True, False], ids=["pipelining", "one-by-one"])
def pipelining(request, sink) -> bool:
    """The sink announces PIPELINING (RFC 2920) or not: the relay uses it when offered."""
    sink.handler.pipelining = request.param
    return request.param


def refuse_recipient(sink, address: str) -> None:
    sink.fail_rcpt[address] = (550, f"5.1.1 <{address}>: no such user")


# -- through Dovecot submission ------------------------------------------------


def test_relay_account_starttls_through_dovecot_is_byte_exact(dovecot, sink, spool, clock, workers):
    worker = make_worker(workers, via_dovecot(dovecot), spool, clock)
    queued = spool.enqueue("alice@acme.test", ["buyer@customer.example"], MESSAGE)
    assert run_once(worker) == 1
    [got] = received(sink)
    assert got.mail_from == "alice@acme.test"
    assert list(got.rcpt_tos) == ["buyer@customer.example"]
    assert got.data.endswith(MESSAGE)  # only the upstream's trace headers in front
    done = row(queued.queue_id)
    assert done.state == "sent" and done.done_at is not None and done.attempts == 1
    assert json.loads(done.recipients) == [] and done.claimed_by is None
    assert not spool.path_for(queued.queue_id).exists()


def test_employee_credentials_are_used_and_erased(dovecot, sink, spool, clock, workers, key):
    cfg = via_dovecot(dovecot, mode="employee_credentials")
    worker = make_worker(workers, cfg, spool, clock, key)
    queue_id = new_queue_id()
    sealed = seal(key, "bob@acme.test", "bob-pw", queue_id)
    spool.enqueue("bob@acme.test", ["buyer@customer.example"], MESSAGE, credentials=sealed, queue_id=queue_id)
    assert run_once(worker) == 1
    [got] = received(sink)
    assert got.mail_from == "bob@acme.test" and got.data.endswith(MESSAGE)
    done = row(queue_id)
    assert done.state == "sent" and done.credentials is None
    log = dovecot.log_path.read_text(errors="replace")
    assert "bob@acme.test" in log and "bob-pw" not in log


def test_refused_employee_password_bounces_5_7_8(dovecot, sink, spool, clock, workers, key):
    cfg = via_dovecot(dovecot, mode="employee_credentials")
    # System mail (the DSN) goes out with the relay account.
    cfg.relay.username, cfg.relay.password = "relay@acme.test", "relay-pw"
    worker = make_worker(workers, cfg, spool, clock, key)
    queue_id = new_queue_id()
    sealed = seal(key, "bob@acme.test", "changed-since", queue_id)
    spool.enqueue("bob@acme.test", ["buyer@customer.example"], MESSAGE, credentials=sealed, queue_id=queue_id)
    assert run_once(worker) == 1
    clock.advance(60)  # the DSN was queued at the real time, after the failed login
    assert run_once(worker) == 1
    failed = row(queue_id)
    assert failed.state == "bounced" and failed.credentials is None
    [dsn] = bounces()
    assert dsn.credentials is None and dsn.state == "sent"  # a refused password is not reused
    [got] = received(sink)
    assert list(got.rcpt_tos) == ["bob@acme.test"]
    [status] = dsn_status(got.data)
    assert status["Status"] == "5.7.8" and status["Action"] == "failed"


def test_implicit_tls_through_dovecot(dovecot, sink, spool, clock, workers):
    cfg = config(dovecot.host, dovecot.submissions_port, "tls", ca_file=dovecot.cert_path)
    worker = make_worker(workers, cfg, spool, clock)
    spool.enqueue("alice@acme.test", ["buyer@customer.example"], MESSAGE)
    assert run_once(worker) == 1
    assert received(sink)[0].data.endswith(MESSAGE)


def test_one_session_for_consecutive_messages(dovecot, sink, spool, clock, workers):
    worker = make_worker(workers, via_dovecot(dovecot), spool, clock)
    for n in range(3):
        spool.enqueue("alice@acme.test", [f"buyer{n}@customer.example"], MESSAGE)
    assert run_once(worker) == 3
    assert len(received(sink, 3)) == 3
    assert worker.connection.sessions_opened == 1


def test_untrusted_certificate_is_not_used(dovecot, sink, spool, clock, workers):
    cfg = config(dovecot.host, dovecot.submission_port, "starttls")  # no ca_file: system CAs
    worker = make_worker(workers, cfg, spool, clock)
    queued = spool.enqueue("alice@acme.test", ["buyer@customer.example"], MESSAGE)
    run_once(worker)
    waiting = row(queued.queue_id)
    assert waiting.state == "queued" and "TLS" in waiting.last_error
    assert sink.messages() == []


def test_starttls_required_when_configured(sink, spool, clock, workers):
    worker = make_worker(workers, config("127.0.0.1", sink.port, "starttls"), spool, clock)
    queued = spool.enqueue("alice@acme.test", ["buyer@customer.example"], MESSAGE)
    run_once(worker)
    waiting = row(queued.queue_id)
    assert waiting.state == "queued" and "STARTTLS" in waiting.last_error
    assert sink.messages() == []


def test_plaintext_only_to_loopback(spool, clock, workers):
    with pytest.raises(ConfigError):
        RelayWorker(config("192.0.2.1", 25, "none"), spool, "w1", None, now=clock)


# -- upstream down, retries, expiry ----------------------------------------------


def test_upstream_down_then_up(tmp_path, spool, clock, workers):
    [port] = free_ports(1)
    worker = make_worker(workers, config("127.0.0.1", port, "none"), spool, clock)
    queued = spool.enqueue("alice@acme.test", ["buyer@customer.example"], MESSAGE)
    assert run_once(worker) == 1
    waiting = row(queued.queue_id)
    assert waiting.state == "queued" and waiting.attempts == 1
    assert waiting.next_attempt_at == clock() + dt.timedelta(seconds=60)
    assert "refused" in waiting.last_error
    assert run_once(worker) == 0  # not due yet
    with SinkServer(tmp_path / "late-sink", port=port) as late:  # the upstream is back
        clock.advance(60)
        assert run_once(worker) == 1
        assert late.wait_for(1, timeout=20)[0].data == MESSAGE
    assert row(queued.queue_id).state == "sent"


def test_expiry_bounces_with_4_4_7(sink, spool, clock, workers):
    cfg = via_sink(sink)
    [closed] = free_ports(1)
    cfg.relay.port = closed
    worker = make_worker(workers, cfg, spool, clock)
    queued = spool.enqueue("alice@acme.test", ["buyer@customer.example", "x@customer.example"], MESSAGE)
    delays = []
    for _ in range(3):
        assert run_once(worker) == 1
        current = row(queued.queue_id)
        delays.append((current.next_attempt_at - clock()).total_seconds())
        clock.value = current.next_attempt_at
    assert delays == [60, 120, 240]
    # The message has been waiting longer than relay.lifetime.
    OutboundMessage.update(created_at=clock() - dt.timedelta(seconds=3601)).where(
        OutboundMessage.queue_id == queued.queue_id
    ).execute()
    run_once(worker)
    gone = row(queued.queue_id)
    assert gone.state == "bounced" and gone.attempts == 4
    assert sorted(json.loads(gone.recipients)) == ["buyer@customer.example", "x@customer.example"]
    assert not spool.path_for(queued.queue_id).exists()
    [dsn] = bounces()
    assert dsn.mail_from == "" and json.loads(dsn.recipients) == ["alice@acme.test"]
    assert dsn.state == "queued"  # the upstream is still down for the DSN too
    statuses = dsn_status(spool.read(dsn))
    assert [(s["Action"], s["Status"]) for s in statuses] == [("failed", "4.4.7")] * 2
    assert "refused" in statuses[0]["Diagnostic-Code"]


# -- per-recipient results ------------------------------------------------------


def test_refused_recipient_bounces_to_sender_others_delivered(dovecot, sink, spool, clock, workers):
    refuse_recipient(sink, "nobody@customer.example")
    worker = make_worker(workers, via_dovecot(dovecot), spool, clock)
    queued = spool.enqueue("alice@acme.test", ["buyer@customer.example", "nobody@customer.example"], MESSAGE)
    assert run_once(worker) == 1
    [got] = received(sink)
    assert list(got.rcpt_tos) == ["buyer@customer.example"]
    done = row(queued.queue_id)
    assert done.state == "sent" and json.loads(done.recipients) == ["nobody@customer.example"]
    [dsn] = bounces()
    assert dsn.mail_from == "" and json.loads(dsn.recipients) == ["alice@acme.test"]
    # The DSN itself goes out on the next run and reaches the sender.
    clock.advance(60)
    assert run_once(worker) == 1
    notice = received(sink, 2)[1]
    assert list(notice.rcpt_tos) == ["alice@acme.test"] and notice.mail_from in ("", "<>")
    [status] = dsn_status(notice.data)
    assert status["Final-Recipient"] == "rfc822;nobody@customer.example"
    assert status["Action"] == "failed" and status["Status"].startswith("5.")
    assert "550" in status["Diagnostic-Code"]
    headers = email.message_from_bytes(notice.data).get_payload()[2]
    assert "Subject: Quotation 2024-17" in headers.get_payload()


def test_all_recipients_refused_direct_to_sink(sink, pipelining, spool, clock, workers):
    refuse_recipient(sink, "nobody@customer.example")
    worker = make_worker(workers, via_sink(sink), spool, clock)
    queued = spool.enqueue("alice@acme.test", ["nobody@customer.example"], MESSAGE)
    run_once(worker)
    assert row(queued.queue_id).state == "bounced"
    clock.advance(60)
    run_once(worker)
    [notice] = received(sink)
    assert list(notice.rcpt_tos) == ["alice@acme.test"]
    assert dsn_status(notice.data)[0]["Status"].startswith("5.1.")


def test_temporary_failure_is_retried(sink, pipelining, spool, clock, workers):
    sink.defer_next = 1
    worker = make_worker(workers, via_sink(sink), spool, clock)
    queued = spool.enqueue("alice@acme.test", ["buyer@customer.example"], MESSAGE)
    assert run_once(worker) == 1
    waiting = row(queued.queue_id)
    assert waiting.state == "queued" and waiting.attempts == 1 and "451" in waiting.last_error
    assert waiting.next_attempt_at == clock() + dt.timedelta(seconds=60)
    assert sink.messages() == [] and bounces() == []
    clock.advance(60)
    assert run_once(worker) == 1
    assert received(sink)[0].data == MESSAGE
    assert row(queued.queue_id).state == "sent" and row(queued.queue_id).attempts == 2


def test_a_failing_bounce_is_dropped_not_bounced(sink, spool, clock, workers):
    refuse_recipient(sink, "alice@acme.test")
    worker = make_worker(workers, via_sink(sink), spool, clock)
    queued = spool.enqueue("", ["alice@acme.test"], b"Subject: a DSN\r\n\r\nx\r\n", is_bounce=True)
    run_once(worker)
    assert row(queued.queue_id).state == "bounced"
    assert bounces() == [row(queued.queue_id)]  # no new DSN about the DSN


def test_bare_line_ends_are_sent_as_crlf(sink, pipelining, spool, clock, workers):
    worker = make_worker(workers, via_sink(sink), spool, clock)
    spool.enqueue("alice@acme.test", ["buyer@customer.example"], b"Subject: x\n\nline1\rline2\n.\nend\r\n")
    run_once(worker)
    assert received(sink)[0].data == b"Subject: x\r\n\r\nline1\r\nline2\r\n.\r\nend\r\n"


# -- concurrency and the loop -------------------------------------------------------


def test_two_workers_deliver_each_message_once(sink, spool, clock, workers):
    for n in range(30):
        spool.enqueue("alice@acme.test", [f"buyer{n}@customer.example"], MESSAGE)
    one = make_worker(workers, via_sink(sink), spool, clock, name="w1")
    two = make_worker(workers, via_sink(sink), spool, clock, name="w2")

    async def both() -> list[int]:
        return await asyncio.gather(one.run_once(), two.run_once())

    counts = asyncio.run(both())
    assert sum(counts) == 30
    got = received(sink, 30)
    rcpts = [m.rcpt_tos[0] for m in got]
    assert len(rcpts) == 30 and len(set(rcpts)) == 30
    assert OutboundMessage.select().where(OutboundMessage.state == "sent").count() == 30


def test_run_wakes_up_on_demand_and_stops_promptly(sink, spool, workers):
    cfg = via_sink(sink)
    cfg.relay.poll_interval = 3600  # only wakeup() can make it look again
    worker = RelayWorker(cfg, spool, "looper", None)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        await asyncio.to_thread(spool.enqueue, "alice@acme.test", ["buyer@customer.example"], MESSAGE)
        worker.wakeup()
        got = await asyncio.to_thread(sink.wait_for, 1, 20)
        assert len(got) == 1
        stop.set()
        await asyncio.wait_for(task, timeout=10)

    asyncio.run(scenario())
    assert OutboundMessage.get().state == "sent"


def test_a_session_that_answers_auth_with_250_is_not_a_delivery(tmp_path, spool, clock, workers):
    """Postfix's smtp-sink offers AUTH and answers it with "250 2.0.0 Ok" — a broken
    session.  Nothing was handed over, so the message must stay queued, not be marked sent."""
    import shutil
    import subprocess

    if not shutil.which("smtp-sink"):
        pytest.skip("smtp-sink (Debian package postfix) is not installed")
    [port] = free_ports(1)
    proc = subprocess.Popen(["smtp-sink", "-u", "nobody", f"127.0.0.1:{port}", "10"])
    try:
        import socket
        import time

        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
        qid = spool.enqueue("alice@acme.test", ["buyer@customer.example"], MESSAGE).queue_id
        worker = make_worker(workers, config("127.0.0.1", port, "none"), spool, clock)
        run_once(worker)
        state = row(qid)
        assert state.state == "queued" and state.attempts == 1
        assert "refused the session" in state.last_error
        assert spool.path_for(qid).exists()
    finally:
        proc.kill()
        proc.wait()


def test_session_kept_open_across_wake_ups_of_a_running_worker(sink, spool, workers):
    """``run`` keeps the upstream session between runs while work keeps coming (no new
    EHLO/AUTH per wake-up) and closes it only after a wait that ended without work."""
    worker = RelayWorker(via_sink(sink), spool, "steady", None)
    workers.append(worker)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        for n in range(3):
            await asyncio.to_thread(spool.enqueue, "alice@acme.test", [f"buyer{n}@customer.example"], MESSAGE)
            worker.wakeup()
            await asyncio.to_thread(received, sink, n + 1)
        stop.set()
        await task

    asyncio.run(scenario())
    assert worker.connection.sessions_opened == 1
    assert OutboundMessage.select().where(OutboundMessage.state == "sent").count() == 3


@pytest.mark.parametrize("bare_lf", [False, True])
def test_a_row_queued_as_its_archive_blob_is_relayed_byte_exact(sink, tmp_path, clock, workers, monkeypatch,
                                                                 bare_lf):
    """Accepted mail is queued as its archive blob (no spool file): the relay reads it back
    through the archive, sends the very bytes, records relay:sent and keeps the blob.  The
    relay:sent copy is described by the blob just read (no second hash, stat or seal) —
    unless the relay changed the bytes (a bare LF made CRLF): then that copy is archived as
    what was sent, a blob of its own."""
    from gateway.archive import Archive
    from gateway.archive.schema import ArchiveRecord, ArchiveSighting
    from gateway.archive.store import BlobStore
    from gateway.spool import archive_ref

    connect("sqlite:///" + str(tmp_path / "mailgate.db"))
    cfg = via_sink(sink)
    cfg.node.data_dir = tmp_path / "var"
    cfg.archive.key_file = tmp_path / "archive.keys"
    archive = Archive.from_config(cfg)
    spool = Spool(tmp_path / "spool", archive=archive)
    queued = MESSAGE.replace(b"\r\n\r\n", b"\r\n\nbare LF above\r\n\r\n", 1) if bare_lf else MESSAGE
    sent = queued.replace(b"\r\n\n", b"\r\n\r\n") if bare_lf else MESSAGE
    prepared: list[bytes] = []
    real_prepare = BlobStore.prepare
    try:
        blob = archive.store.put(queued)
        monkeypatch.setattr(BlobStore, "prepare",
                            lambda self, raw, *a: prepared.append(raw) or real_prepare(self, raw, *a))
        spool.insert("QARCH1", "alice@acme.test", ["buyer@customer.example"], len(queued),
                     spool_path=archive_ref(blob.name, blob.sha256))
        worker = make_worker(workers, cfg, spool, clock)
        assert run_once(worker) == 1
        assert received(sink)[0].data.endswith(sent)
        assert row("QARCH1").state == "sent"
        assert archive.store.path_of(blob.name).exists()
        copy = ArchiveSighting.get((ArchiveSighting.queue_id == "QARCH1") & (ArchiveSighting.place == "relay:sent"))
        rec = ArchiveRecord.get_by_id(copy.record_id)
        assert prepared == ([sent] if bare_lf else [])
        assert archive.read(rec) == sent
        if not bare_lf:  # the record made from the blob read: its file, key and sizes
            assert (rec.sha256, rec.blob_path, rec.size) == (blob.sha256, blob.name, len(MESSAGE))
            assert (rec.key_id, rec.stored_size) == (blob.key_id, blob.stored_size)
    finally:
        database.close()


@pytest.mark.parametrize("with_committer", [False, True])
def test_a_claim_lost_during_delivery_records_nothing(sink, spool, clock, workers, with_committer):
    """Another worker took the row over (our claim expired) while we delivered: our outcome
    is not written — no state change, no bounce — whether it goes through a group committer
    (its own savepoint per job) or commits alone."""
    from gateway.groupcommit import GroupCommitter

    committer = GroupCommitter() if with_committer else None
    worker = RelayWorker(via_sink(sink), spool, "loser", None, now=clock, committer=committer)
    workers.append(worker)
    refuse_recipient(sink, "gone@customer.example")  # a 5xx would queue a bounce if recorded
    queued = spool.enqueue("alice@acme.test", ["gone@customer.example"], MESSAGE)
    real_send = worker.connection.send

    def send_while_stolen(*args, **kwargs):
        OutboundMessage.update(claimed_by="other-node/w9/abc").where(OutboundMessage.id == queued.id).execute()
        return real_send(*args, **kwargs)

    worker.connection.send = send_while_stolen
    try:
        assert run_once(worker) == 1
    finally:
        if committer is not None:
            committer.stop()
    stolen = row(queued.queue_id)
    assert (stolen.state, stolen.attempts, stolen.claimed_by) == ("queued", 0, "other-node/w9/abc")
    assert bounces() == []


def test_pipelining_when_offered_one_write_for_the_commands(sink, pipelining, spool, clock, workers, monkeypatch):
    """MAIL, every RCPT and DATA go in one write when the upstream offers PIPELINING (the
    message in a second), one command at a time otherwise; a refused recipient among them
    and a leading dot come out the same either way."""
    import smtplib

    writes: list[bytes] = []
    real = smtplib.SMTP.send

    def send(self, s):  # noqa: ANN001, ANN202
        writes.append(s if isinstance(s, bytes) else s.encode())
        return real(self, s)

    monkeypatch.setattr(smtplib.SMTP, "send", send)
    refuse_recipient(sink, "nobody@customer.example")
    worker = make_worker(workers, via_sink(sink), spool, clock)
    rcpts = ["buyer@customer.example", "nobody@customer.example", "agent@customer.example"]
    queued = spool.enqueue("alice@acme.test", rcpts, MESSAGE)
    assert run_once(worker) == 1
    [got] = received(sink)
    assert got.data == MESSAGE and list(got.rcpt_tos) == [rcpts[0], rcpts[2]]
    assert json.loads(row(queued.queue_id).recipients) == ["nobody@customer.example"]
    transaction = [w for w in writes if not w.startswith((b"ehlo", b"EHLO", b"quit", b"QUIT"))]
    if pipelining:
        assert transaction[0] == (b"MAIL FROM:<alice@acme.test> SIZE=%d BODY=8BITMIME\r\n" % len(MESSAGE)
                                  + b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts) + b"DATA\r\n")
        assert len(transaction) == 2 and transaction[1].endswith(b"\r\n.\r\n")
        assert b"\r\n..leading dot line\r\n" in transaction[1]  # dot-stuffed on the wire
    else:
        assert len(transaction) == 6  # MAIL, 3 × RCPT, DATA, the message


def test_a_pipelined_session_closed_while_idle_is_reopened_once(sink, pipelining, spool, clock, workers):
    """A kept session the upstream dropped meanwhile: the next transaction opens a new one
    and goes through, nothing counted as failed."""
    worker = make_worker(workers, via_sink(sink), spool, clock)
    spool.enqueue("alice@acme.test", ["buyer@customer.example"], MESSAGE)
    assert asyncio.run(worker.run_once(keep_open=True)) == 1
    received(sink)
    worker.connection._smtp.sock.shutdown(2)  # as if the server had timed the idle session out
    queued = spool.enqueue("alice@acme.test", ["buyer@customer.example"], MESSAGE)
    clock.advance(1)
    assert run_once(worker) == 1
    assert len(received(sink, 2)) == 2 and row(queued.queue_id).state == "sent"
    assert worker.connection.sessions_opened == 2


# -- an outcome whose commit failed (the database away for a moment) -------------------


class FailingStore:
    """``gateway.relay.store_attempts`` failing as a restarting database makes it fail, on its
    first ``failures`` calls (every call when None), then doing its work.  ``on_call`` runs
    before each call (the test's probe of the moment)."""

    def __init__(self, failures: int | None, on_call=None) -> None:
        from gateway import relay

        self.real, self.failures, self.on_call, self.calls = relay.store_attempts, failures, on_call, 0

    def __call__(self, jobs):
        from peewee import OperationalError

        self.calls += 1
        if self.on_call is not None:
            self.on_call(self.calls)
        if self.failures is None or self.calls <= self.failures:
            raise OperationalError("server closed the connection unexpectedly")
        return self.real(jobs)


def relayed_count() -> float:
    from gateway.metrics import REGISTRY

    return REGISTRY.get_sample_value("mailgate_relay_messages_total", {"result": "relayed"}) or 0.0


def quick_retries(worker: RelayWorker) -> RelayWorker:
    """Retries 10 ms apart instead of 0.5, 1, 2, 4 s: the test waits for nothing."""
    worker.unrecorded.first = worker.unrecorded.cap = 0.01
    return worker


@pytest.mark.parametrize("with_committer", [False, True])
def test_an_outcome_whose_commit_failed_is_recorded_again_and_the_message_delivered_once(
        sink, spool, clock, workers, monkeypatch, caplog, with_committer):
    """The commit of a delivered message's outcome fails three times (the database restarting):
    the same outcome is recorded on a later try — row sent, spool file removed only then,
    counted once — and after the claim would have expired nothing is delivered again."""
    from gateway import relay
    from gateway.groupcommit import GroupCommitter

    committer = GroupCommitter() if with_committer else None
    worker = quick_retries(RelayWorker(via_sink(sink), spool, "w1", None, now=clock, committer=committer))
    workers.append(worker)
    queued = spool.enqueue("alice@acme.test", ["buyer@customer.example"], MESSAGE)
    file_there: list[bool] = []
    store = FailingStore(3, on_call=lambda _: file_there.append(spool.path_for(queued.queue_id).exists()))
    monkeypatch.setattr(relay, "store_attempts", store)
    before = relayed_count()
    try:
        with caplog.at_level(logging.DEBUG, logger="gateway.relay"):
            assert run_once(worker) == 1
    finally:
        if committer is not None:
            committer.stop()
    assert len(received(sink)) == 1
    assert store.calls >= 4 and all(file_there)  # the file stayed while no commit had succeeded
    done = row(queued.queue_id)
    assert (done.state, done.attempts, done.claimed_by) == ("sent", 1, None)
    assert not spool.path_for(queued.queue_id).exists()
    assert relayed_count() == before + 1
    assert "could not record the relay outcome" in caplog.text
    assert "relay outcome recorded after" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    clock.advance(worker.config.relay.claim_timeout + 1)  # the claim would have run out by now
    assert run_once(worker) == 0
    assert len(sink.messages()) == 1  # delivered exactly once


@pytest.mark.parametrize("with_committer", [False, True])
def test_an_outcome_never_recorded_is_given_up_before_its_claim_runs_out_and_delivered_again(
        sink, spool, clock, workers, monkeypatch, caplog, with_committer):
    """Recording keeps failing until the claim is about to run out, and the worker has no
    outcome journal (or a full one): the worker stops trying, says so at ERROR, and the message
    is delivered again after the claim expired — the documented at-least-once fallback,
    nothing lost.  (With the journal: the next test.)"""
    from gateway import relay
    from gateway.groupcommit import GroupCommitter

    committer = GroupCommitter() if with_committer else None
    worker = quick_retries(RelayWorker(via_sink(sink), spool, "w1", None, now=clock, committer=committer))
    workers.append(worker)
    queued = spool.enqueue("alice@acme.test", ["buyer@customer.example"], MESSAGE)
    timeout = worker.config.relay.claim_timeout

    def third_call_late(calls: int) -> None:  # after a retry or two, time has run on
        if calls == 3:
            clock.advance(timeout - 30)  # within CLAIM_MARGIN_MAX (a tenth of 600 s) of the expiry

    monkeypatch.setattr(relay, "store_attempts", FailingStore(None, on_call=third_call_late))
    before = relayed_count()
    try:
        with caplog.at_level(logging.INFO, logger="gateway.relay"):
            assert run_once(worker) == 1
            [error] = [r for r in caplog.records if r.levelno >= logging.ERROR]
        waiting = row(queued.queue_id)
        assert (waiting.state, waiting.attempts, waiting.claimed_by) == ("queued", 0, worker.owner)
        assert spool.path_for(queued.queue_id).exists() and relayed_count() == before
        assert error.levelno == logging.ERROR and "may be delivered again" in error.getMessage()
        assert queued.queue_id in error.getMessage()
        assert len(received(sink)) == 1
        monkeypatch.undo()  # the database is back
        assert run_once(worker) == 0  # still claimed …
        clock.advance(31)  # … until the claim has run out
        assert run_once(worker) == 1
    finally:
        if committer is not None:
            committer.stop()
    assert len(received(sink, 2)) == 2  # delivered twice, not lost
    assert row(queued.queue_id).state == "sent" and relayed_count() == before + 1



@pytest.mark.parametrize("with_committer", [False, True])
def test_an_outcome_whose_claim_runs_out_unrecorded_is_journalled_and_recorded_not_delivered_again(
        sink, spool, clock, workers, monkeypatch, caplog, tmp_path, with_committer):
    """As above, with the node's journal: the outcome given up before its claim runs out goes
    to the journal (a WARNING, no ERROR).  The database back, the claim run out, the worker
    claims the row again and records the journalled outcome instead of delivering it: one
    delivery, the row sent, its spool file and the journal entry gone."""
    from gateway import relay
    from gateway.groupcommit import GroupCommitter
    from gateway.relayjournal import OutcomeJournal

    committer = GroupCommitter() if with_committer else None
    journal = OutcomeJournal(tmp_path / "relay-journal" / "n1.journal")
    worker = quick_retries(RelayWorker(via_sink(sink), spool, "w1", None, now=clock, committer=committer,
                                       journal=journal))
    workers.append(worker)
    queued = spool.enqueue("alice@acme.test", ["buyer@customer.example"], MESSAGE)
    timeout = worker.config.relay.claim_timeout

    def third_call_late(calls: int) -> None:
        if calls == 3:
            clock.advance(timeout - 30)

    monkeypatch.setattr(relay, "store_attempts", FailingStore(None, on_call=third_call_late))
    before = relayed_count()
    try:
        with caplog.at_level(logging.INFO, logger="gateway.relay"):
            assert run_once(worker) == 1
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("kept in the node's outcome journal" in r.getMessage() for r in caplog.records)
        assert [e["row"] for e in OutcomeJournal(journal.path).entries()] == [queued.id]  # on disk
        waiting = row(queued.queue_id)
        assert (waiting.state, waiting.attempts, waiting.claimed_by) == ("queued", 0, worker.owner)
        assert len(received(sink)) == 1
        monkeypatch.undo()  # the database is back
        clock.advance(31)  # the claim has run out: the worker claims the row again …
        with caplog.at_level(logging.INFO, logger="gateway.relay"):
            assert run_once(worker) == 1  # … and records the journalled outcome
        assert "relay outcome recorded from the node's journal" in caplog.text
    finally:
        if committer is not None:
            committer.stop()
    done = row(queued.queue_id)
    assert (done.state, done.attempts, done.claimed_by) == ("sent", 1, None)
    assert not spool.path_for(queued.queue_id).exists()
    assert len(journal) == 0 and not journal.path.exists()
    assert relayed_count() == before + 1
    clock.advance(3600)
    assert run_once(worker) == 0
    assert len(sink.messages()) == 1  # delivered once


def journalled_outcome(sink, spool, clock, workers, tmp_path, monkeypatch):
    """A delivered message whose outcome went to the journal at the worker's close (the
    database away for the whole run): returns (journal, queue row id, the worker's owner)."""
    from gateway import relay
    from gateway.relayjournal import OutcomeJournal

    journal = OutcomeJournal(tmp_path / "relay-journal" / "n1.journal")
    worker = quick_retries(RelayWorker(via_sink(sink), spool, "w1", None, now=clock, journal=journal))
    queued = spool.enqueue("alice@acme.test", ["buyer@customer.example"], MESSAGE)

    async def stopped_after_the_delivery() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        await asyncio.to_thread(sink.wait_for, 1, 20)
        stop.set()
        await asyncio.wait_for(task, timeout=10)

    with monkeypatch.context() as patch:
        patch.setattr(relay, "CLOSE_WAIT", 0.05)
        patch.setattr(relay, "store_attempts", FailingStore(None))
        asyncio.run(stopped_after_the_delivery())
    assert len(received(sink)) == 1 and len(journal) == 1
    return journal, queued, worker.owner


def test_a_journalled_outcome_is_recorded_at_the_next_start_before_the_claims_are_released(
        sink, spool, clock, workers, tmp_path, monkeypatch, caplog):
    """The node's start (``apply_outcome_journal``, then ``release_node_claims``): the row is
    recorded sent from the journal — loaded again from its file, as a new process does — and
    the release finds nothing left to deliver."""
    from gateway.relay import apply_outcome_journal, release_node_claims
    from gateway.relayjournal import OutcomeJournal

    journal, queued, _ = journalled_outcome(sink, spool, clock, workers, tmp_path, monkeypatch)
    cfg = via_sink(sink)
    assert apply_outcome_journal(cfg, spool, None, OutcomeJournal(journal.path)) == 1
    assert not journal.path.exists()
    assert release_node_claims(cfg.node.name) == 0
    done = row(queued.queue_id)
    assert (done.state, done.attempts, done.claimed_by) == ("sent", 1, None)
    assert not spool.path_for(queued.queue_id).exists()
    assert run_once(make_worker(workers, cfg, spool, Clock(), name="w2")) == 0
    assert len(sink.messages()) == 1


def test_a_journalled_outcome_waits_while_another_node_holds_the_row_and_is_dropped_once_it_recorded_one(
        sink, spool, clock, workers, tmp_path, monkeypatch, caplog):
    """Across nodes (the journal is per node): the claim ran out and another node claimed the
    row — the entry waits; once that node recorded an attempt of its own, the entry no longer
    applies and is dropped at WARNING ("may have been delivered twice"): at least once."""
    from gateway.relay import apply_outcome_journal
    from gateway.relayjournal import OutcomeJournal

    journal, queued, _ = journalled_outcome(sink, spool, clock, workers, tmp_path, monkeypatch)
    cfg = via_sink(sink)
    later = utcnow() + dt.timedelta(seconds=cfg.relay.claim_timeout + 1)
    m = OutboundMessage
    m.update(claimed_by="n2/n2-relay0/abcdef", claimed_until=later + dt.timedelta(seconds=600)).where(
        m.id == queued.id).execute()
    assert apply_outcome_journal(cfg, spool, None, journal) == 0
    assert len(OutcomeJournal(journal.path)) == 1  # kept
    assert row(queued.queue_id).claimed_by == "n2/n2-relay0/abcdef"
    m.update(claimed_by=None, claimed_until=None, attempts=1, last_error="<buyer@customer.example>: 451 later"
             ).where(m.id == queued.id).execute()
    with caplog.at_level(logging.INFO, logger="gateway.relay"):
        assert apply_outcome_journal(cfg, spool, None, journal) == 0
    assert "may have been delivered twice" in caplog.text
    assert not journal.path.exists()
    waiting = row(queued.queue_id)
    assert (waiting.state, waiting.attempts) == ("queued", 1)  # the other node's state stands


@pytest.mark.parametrize("mode", ["refused", "applied"])
def test_the_bounce_of_an_outcome_whose_commit_failed_leaves_no_orphan_file(
        sink, spool, clock, workers, monkeypatch, caplog, mode):
    """A refused recipient: the outcome's job in the group commit writes a bounce (DSN) file
    and row, and the batch's COMMIT fails.  refused (nothing stored): the bounce's file goes at
    once, the retry writes a new one and is recorded — one bounce, one file.  applied (the
    reply lost, the rows stored): the file stays (its row may exist), the retry finds the claim
    gone, the orphan sweep keeps the file, and the bounce reaches the sender."""
    from gateway.groupcommit import GroupCommitter
    from tests.harness.commitfault import CommitFault

    committer = GroupCommitter()
    worker = quick_retries(RelayWorker(via_sink(sink), spool, "w1", None, now=clock, committer=committer))
    workers.append(worker)
    refuse_recipient(sink, "nobody@customer.example")
    queued = spool.enqueue("alice@acme.test", ["nobody@customer.example"], MESSAGE)
    fault = CommitFault(monkeypatch, mode, thread="group-commit")
    try:
        with caplog.at_level(logging.INFO, logger="gateway.relay"):
            assert run_once(worker) == 1
        assert fault.failed == 1
        [dsn] = bounces()
        assert row(queued.queue_id).state == "bounced"
        files = sorted(p.name for p in spool.directory.iterdir())
        if mode == "refused":  # only the bounce recorded has a file: none of the failed try is left
            assert files == [dsn.spool_path]
            assert spool.sweep_orphans(older_than=0) == 0
        else:  # the retry found the claim gone (the first commit went through after all): the
            # bounced message's own file waits for the sweep (as documented), the bounce's is kept
            assert "claim is gone" in caplog.text
            assert files == sorted([dsn.spool_path, spool.path_for(queued.queue_id).name])
            assert spool.sweep_orphans(older_than=0) == 1
            assert [p.name for p in spool.directory.iterdir()] == [dsn.spool_path]
        clock.advance(60)
        assert run_once(worker) == 1  # the bounce goes out
    finally:
        committer.stop()
    [notice] = received(sink)
    assert list(notice.rcpt_tos) == ["alice@acme.test"]
    assert row(dsn.queue_id).state == "sent" and list(spool.directory.iterdir()) == []


def test_a_stop_gives_up_unrecorded_outcomes_in_bounded_time(sink, spool, monkeypatch, caplog):
    """Recording fails for as long as the worker runs (the database stays away): a stop ends
    the retries within CLOSE_WAIT — the outcome given up at ERROR, its slot freed — instead
    of waiting for the claim."""
    from gateway import relay

    cfg = via_sink(sink)
    cfg.relay.poll_interval = 3600  # only wakeup() makes it look again
    worker = RelayWorker(cfg, spool, "w1", None)  # the real clock: the message is queued after the start
    worker.unrecorded.first = worker.unrecorded.cap = 0.05
    monkeypatch.setattr(relay, "store_attempts", FailingStore(None))
    monkeypatch.setattr(relay, "CLOSE_WAIT", 0.5)
    failing = LogSeen("could not record the relay outcome")
    logging.getLogger("gateway.relay").addHandler(failing)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        await asyncio.to_thread(spool.enqueue, "alice@acme.test", ["buyer@customer.example"], MESSAGE,
                                queue_id="QSTOP1")
        worker.wakeup()
        assert await asyncio.to_thread(failing.event.wait, 20)
        assert worker._outstanding._value < worker._slots  # it holds its slot while it waits
        stop.set()
        await asyncio.wait_for(task, timeout=5)

    try:
        with caplog.at_level(logging.INFO, logger="gateway.relay"):
            asyncio.run(scenario())
    finally:
        logging.getLogger("gateway.relay").removeHandler(failing)
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "QSTOP1" in error.getMessage() and "the worker is stopping" in error.getMessage()
    assert worker._outstanding._value == worker._slots  # every slot given back
    assert row("QSTOP1").state == "queued" and len(sink.messages()) == 1


@pytest.mark.parametrize("with_committer", [False, True])
def test_outcomes_waiting_to_be_recorded_count_against_the_outstanding_limit(
        sink, spool, clock, workers, monkeypatch, with_committer):
    """Every outcome's first commit fails.  With room for one outstanding outcome, the worker
    has at most that one delivered and unrecorded when it sends the next message (the slot is
    taken after a delivery, as before): an outcome waiting to be recorded again keeps its
    slot, so the worker does not go on delivering while outcomes pile up unrecorded."""
    from gateway import relay
    from gateway.groupcommit import GroupCommitter

    monkeypatch.setattr(relay, "MAX_OUTSTANDING_OUTCOMES", 1)
    committer = GroupCommitter() if with_committer else None
    worker = RelayWorker(via_sink(sink), spool, "w1", None, now=clock, committer=committer)
    worker.unrecorded.first = worker.unrecorded.cap = 0.2  # long enough to send others meanwhile
    workers.append(worker)
    for n in range(4):
        spool.enqueue("alice@acme.test", [f"buyer{n}@customer.example"], MESSAGE)
    real_send = worker.connection.send
    unrecorded_at_send: list[int] = []

    def send(*args, **kwargs):
        recorded = OutboundMessage.select().where(OutboundMessage.attempts > 0).count()
        unrecorded_at_send.append(len(unrecorded_at_send) - recorded)
        return real_send(*args, **kwargs)

    real_store = relay.store_attempts
    seen: dict[str, int] = {}

    def first_commit_fails(jobs):  # the group committer's batch form and its one-by-one rerun alike
        from peewee import OperationalError

        for (attempt,) in jobs:
            seen[attempt.row.queue_id] = seen.get(attempt.row.queue_id, 0) + 1
        if any(seen[a.row.queue_id] <= (2 if with_committer else 1) for (a,) in jobs):
            raise OperationalError("server closed the connection unexpectedly")
        return real_store(jobs)

    worker.connection.send = send
    monkeypatch.setattr(relay, "store_attempts", first_commit_fails)
    try:
        assert run_once(worker) == 4
    finally:
        if committer is not None:
            committer.stop()
    assert len(unrecorded_at_send) == 4 and max(unrecorded_at_send) <= 1, unrecorded_at_send
    assert len(received(sink, 4)) == 4
    assert OutboundMessage.select().where(OutboundMessage.state == "sent").count() == 4
    assert all(count >= 2 for count in seen.values())  # every outcome was tried again


# -- a stop while a delivery is under way (relay.py module doc, "Stopping") ------------


def stop_during_delivery(worker: RelayWorker, sink, *, on_stop_sending=None) -> None:
    """Run ``worker`` until the sink holds a reply of its delivery, then stop it; wait for the
    worker to end.  ``on_stop_sending`` runs (in the event loop) once the worker has passed
    its STOP_SEND_WAIT deadline."""
    if on_stop_sending is not None:
        real = worker.connection.stop_sending

        def stop_sending() -> str:
            phase = real()
            on_stop_sending()
            return phase

        worker.connection.stop_sending = stop_sending

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        assert await asyncio.to_thread(sink.held.wait, 20)
        stop.set()
        await asyncio.wait_for(task, timeout=10)

    asyncio.run(scenario())


def test_a_stop_lets_a_delivery_past_its_end_of_data_wait_for_its_reply_and_records_it(
        sink, spool, monkeypatch, caplog):
    """The upstream took the end of data and is slow to answer when the worker stops: the
    worker does not cut it at STOP_SEND_WAIT but waits for the 250 and records it through the
    group committer — sent, delivered once, claim and spool file gone."""
    from gateway import relay
    from gateway.groupcommit import GroupCommitter

    monkeypatch.setattr(relay, "STOP_SEND_WAIT", 0.05)
    committer = GroupCommitter()
    worker = RelayWorker(via_sink(sink), spool, "w1", None, committer=committer)
    queued = spool.enqueue("alice@acme.test", ["buyer@customer.example"], MESSAGE)
    sink.hold("DATA")
    try:
        with caplog.at_level(logging.INFO, logger="gateway.relay"):
            stop_during_delivery(worker, sink, on_stop_sending=sink.release)
    finally:
        committer.stop()
    done = row(queued.queue_id)
    assert (done.state, done.attempts, done.claimed_by) == ("sent", 1, None)
    assert not spool.path_for(queued.queue_id).exists()
    assert len(sink.messages()) == 1
    assert any("s more for the upstream's reply" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_stop_cuts_a_delivery_before_its_end_of_data_and_releases_the_row(
        sink, pipelining, spool, monkeypatch, caplog, workers):
    """The upstream holds its RCPT reply when the worker stops: at STOP_SEND_WAIT the
    transaction is cut before any end of data — nothing delivered, no attempt counted, the
    claim released at once — and the next worker delivers the message exactly once."""
    from gateway import relay

    monkeypatch.setattr(relay, "STOP_SEND_WAIT", 0.05)
    worker = RelayWorker(via_sink(sink), spool, "w1", None)
    queued = spool.enqueue("alice@acme.test", ["buyer@customer.example"], MESSAGE)
    due = row(queued.queue_id).next_attempt_at
    sink.hold("RCPT")
    with caplog.at_level(logging.INFO, logger="gateway.relay"):
        stop_during_delivery(worker, sink)
    waiting = row(queued.queue_id)
    assert (waiting.state, waiting.attempts, waiting.claimed_by, waiting.claimed_until) == ("queued", 0, None, None)
    assert waiting.next_attempt_at == due and waiting.last_error in ("", None)
    assert spool.path_for(queued.queue_id).exists()
    assert any("delivery aborted by the stop before the end of data; released" in r.getMessage()
               for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    sink.release()
    assert sink.messages() == []
    again = make_worker(workers, via_sink(sink), spool, Clock(), name="w2")
    assert run_once(again) == 1
    assert len(received(sink)) == 1 and row(queued.queue_id).state == "sent"


def test_a_reply_that_does_not_come_before_the_stop_deadline_is_recorded_as_a_deferral(
        sink, spool, monkeypatch, caplog):
    """The upstream never answers the end of data: at STOP_REPLY_WAIT the wait ends and the
    attempt is recorded — deferred, its reply "may have been delivered", a WARNING — not left
    unknown under a claim; the message goes out again after the backoff (at least once)."""
    from gateway import relay

    monkeypatch.setattr(relay, "STOP_SEND_WAIT", 0.05)
    monkeypatch.setattr(relay, "STOP_REPLY_WAIT", 0.3)
    worker = RelayWorker(via_sink(sink), spool, "w1", None)
    queued = spool.enqueue("alice@acme.test", ["buyer@customer.example"], MESSAGE)
    sink.hold("DATA")
    try:
        with caplog.at_level(logging.INFO, logger="gateway.relay"):
            stop_during_delivery(worker, sink)
    finally:
        sink.release()
    waiting = row(queued.queue_id)
    assert (waiting.state, waiting.attempts, waiting.claimed_by) == ("queued", 1, None)
    assert "may have been delivered" in waiting.last_error
    assert waiting.next_attempt_at > waiting.created_at
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
                 and "stop ended the wait" in r.getMessage()]
    assert queued.queue_id in warning and "will be tried again" in warning
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture
def blackhole():
    """A loopback port whose connects stay pending: a listener with backlog 0 that never
    accepts, its one queue slot taken — the kernel drops every further SYN."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname(), timeout=5)  # the queue is full now
    try:
        yield listener.getsockname()[1]
    finally:
        filler.close()
        listener.close()


def test_a_stop_aborts_a_connect_to_the_upstream_still_pending_and_releases_the_row(
        blackhole, spool, monkeypatch, caplog):
    """The upstream does not answer the TCP connect (SYN dropped) when the worker stops: at
    STOP_SEND_WAIT the connect is aborted — not left to [upstream] timeout — nothing was sent,
    no attempt is counted and the row is released at once."""
    from gateway import relay

    monkeypatch.setattr(relay, "STOP_SEND_WAIT", 0.05)
    cfg = config("127.0.0.1", blackhole, "none")
    cfg.upstream.timeout = 60  # far above the wait below: only the cut can end the connect
    worker = RelayWorker(cfg, spool, "w1", None)
    queued = spool.enqueue("alice@acme.test", ["buyer@customer.example"], MESSAGE)
    connecting = threading.Event()
    real_open = worker.connection._open_socket

    def open_socket(*args):
        connecting.set()  # the stop's deadline (50 ms after the stop) comes while it connects
        return real_open(*args)

    worker.connection._open_socket = open_socket

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        assert await asyncio.to_thread(connecting.wait, 20)
        stop.set()
        await asyncio.wait_for(task, timeout=10)

    with caplog.at_level(logging.INFO, logger="gateway.relay"):
        asyncio.run(scenario())
    waiting = row(queued.queue_id)
    assert (waiting.state, waiting.attempts, waiting.claimed_by, waiting.claimed_until) == ("queued", 0, None, None)
    assert waiting.last_error in ("", None)
    assert any("delivery aborted by the stop before the end of data; released" in r.getMessage()
               for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
