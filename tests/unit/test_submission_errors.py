"""Unexpected exceptions at the end of DATA (gateway/smtp/handler.py, gateway/smtp/errors.py):
a rule's bug or a database error while deciding, a mutation or the archive's staging failing,
anything else before the 250 — a 4xx the client retries, a log line with the queue id and the
user (never the mail's text or the password), the "tempfail" count, and nothing stored.  The
answers that were deliberate before (a refusal, a full disk) stay as they were."""

from __future__ import annotations

import asyncio
import errno
import logging
from types import SimpleNamespace

import pytest
from aiosmtpd.smtp import Envelope
from peewee import OperationalError

import gateway.smtp.handler as handler_module
from gateway import metrics
from gateway.archive import Archive
from gateway.archive.schema import ArchiveRecord
from gateway.config import PUBLIC_MAIL_DOMAINS, Config
from gateway.db.models import Employee, OutboundMessage
from gateway.directory import Directory
from gateway.groupcommit import GroupCommitter
from gateway.policy import HOLD, Policy, Verdict
from gateway.smtp.errors import LOCAL_TEMPFAIL, POLICY_TEMPFAIL
from gateway.smtp.guard import LoginGuard
from gateway.smtp.handler import Identity, SubmissionHandler
from gateway.spool import Spool

SECRET_SUBJECT = "Salary of Mr Zhang 42000"  # must never reach the log
PASSWORD = "alice-secret-pw"
RAW = (f"From: alice@acme.test\r\nTo: buyer@example.com, other@example.org\r\nSubject: {SECRET_SUBJECT}\r\n"
       "\r\nPrices inside.\r\n").encode()
QUEUE_ID = "0000000000AABBCC"

STORE_TEMPFAIL = "451 4.3.0 Temporary local problem storing the message, try again later"


class Switch:
    """A rule that raises ``error`` while ``on``; otherwise it does nothing (accept)."""

    name = "buggy-rule"
    priority = 50
    mode = "enforce"

    def __init__(self, error: Exception | None = None):
        self.error = error
        self.calls = 0

    def evaluate(self, ctx, directory):  # noqa: ANN001, ANN201 - the policy's Rule protocol
        self.calls += 1
        if self.error is not None:
            raise self.error
        return None


def make_world(tmp_path, monkeypatch, rule, queue_id: str = QUEUE_ID, password: str = PASSWORD) -> SimpleNamespace:
    """A SubmissionHandler on the test database with a real GroupCommitter (stop it after),
    one employee (alice, logged in as the session's user) and ``rule`` as the whole policy;
    every message gets ``queue_id`` (also used by tests/unit/test_submission_cancel.py)."""
    monkeypatch.setattr(handler_module, "new_queue_id", lambda: queue_id)
    alice = Employee.create(email="alice@acme.test", name="Alice")
    directory = Directory(["acme.test"], PUBLIC_MAIL_DOMAINS)
    directory.load()
    cfg = Config()
    cfg.node.data_dir = tmp_path / "var"
    cfg.company.domains = ["acme.test"]
    cfg.company.language = "en"
    archive = Archive(tmp_path / "archive", tmp_path / "archive.keys")
    spool = Spool(tmp_path / "spool", node="n1", archive=archive)
    committer = GroupCommitter()
    queued: list[int] = []
    handler = SubmissionHandler(cfg, directory, Policy(directory, [rule]), spool, archive, authenticator=None,
                                guard=LoginGuard(0.0, 0.0, 60.0), on_queued=lambda: queued.append(1),
                                committer=committer)
    session = SimpleNamespace(peer=("192.0.2.7", 40000), host_name="client.example", authenticated=True,
                              auth_data=Identity("alice@acme.test", directory.employee_for_address(alice.email),
                                                 password))
    return SimpleNamespace(handler=handler, rule=rule, spool=spool, archive=archive, session=session,
                           queued=queued, cfg=cfg, tmp=tmp_path, committer=committer)


@pytest.fixture
def world(db, tmp_path, monkeypatch):
    built = make_world(tmp_path, monkeypatch, Switch())
    yield built
    built.committer.stop()


def send(world, raw: bytes = RAW, rcpts: tuple[str, ...] = ("buyer@example.com", "other@example.org")) -> str:
    envelope = Envelope()
    envelope.mail_from = "alice@acme.test"
    envelope.rcpt_tos = list(rcpts)
    envelope.original_content = raw
    return asyncio.run(world.handler.handle_DATA(SimpleNamespace(is_tls=True), world.session, envelope))


def tempfails() -> float:
    return metrics.REGISTRY.get_sample_value("mailgate_smtp_messages_total", {"verdict": "tempfail"}) or 0.0


def assert_nothing_stored(world) -> None:
    assert OutboundMessage.select().count() == 0
    assert ArchiveRecord.select().count() == 0
    assert [p.name for p in world.spool.directory.glob("*")] == []
    assert world.queued == []


def failure_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mailgate.smtp" and r.levelno >= logging.ERROR]


def assert_log_is_clean(text: str) -> None:
    assert SECRET_SUBJECT not in text and "Zhang" not in text
    assert PASSWORD not in text and "Prices inside" not in text


@pytest.mark.parametrize("error", [
    RuntimeError(f"rule bug on subject {SECRET_SUBJECT}"),  # a rule's bug; its text quotes the mail
    OperationalError("database is locked"),  # a transient database error while deciding
], ids=["rule-bug", "database"])
def test_the_policy_raising_answers_451_logs_counts_and_stores_nothing(world, caplog, error):
    world.rule.error = error
    before = tempfails()
    with caplog.at_level(logging.INFO, logger="mailgate.smtp"):
        reply = send(world)
    assert reply == POLICY_TEMPFAIL == "451 4.3.0 Temporary policy error, try again later"
    assert tempfails() == before + 1
    assert_nothing_stored(world)
    [line] = failure_lines(caplog)
    first = line.splitlines()[0]
    assert first.startswith(f"{QUEUE_ID}: policy decision failed user=alice@acme.test ip=192.0.2.7 error=")
    assert f"error={type(error).__module__}.{type(error).__qualname__}".replace("builtins.", "") in first
    assert "in evaluate" in first and first.endswith("answered 451, nothing stored")
    assert "test_submission_errors.py" in line  # the frames: where the rule raised
    assert_log_is_clean(caplog.text)

    # The fault gone, the client's retry of the same message is stored and queued.
    world.rule.error = None
    assert send(world).startswith("250 2.0.0")
    assert OutboundMessage.select().count() == 1 and world.queued == [1]


def test_a_policy_error_while_splitting_a_held_message_is_a_policy_error_too(world, caplog):
    """With approval.split_recipients, a held message is decided again per recipient
    (gateway/policy/split.py): those decisions raising are answered like the first."""
    world.cfg.approval.split_recipients = True

    class HoldThenFail(Switch):
        def evaluate(self, ctx, directory):  # noqa: ANN001, ANN201
            self.calls += 1
            if self.calls == 1:
                return Verdict(action=HOLD, reason="check", approvers=["boss@acme.test"], rule=self.name)
            raise KeyError("narrowed")

    rule = HoldThenFail()
    world.handler.policy.replace_rules([rule])
    with caplog.at_level(logging.INFO, logger="mailgate.smtp"):
        assert send(world) == POLICY_TEMPFAIL
    assert rule.calls == 2
    assert_nothing_stored(world)
    assert "policy decision failed" in failure_lines(caplog)[0]


class ExplodingMutation:
    """A DKIM signer (the last mutation stage) with a bug."""

    stage = "sign"

    def apply(self, out, ctx):  # noqa: ANN001, ANN201
        raise ValueError(f"cannot sign {SECRET_SUBJECT}")


@pytest.mark.parametrize("where", ["sign", "stage", "reply"])
def test_a_failure_preparing_the_message_answers_451_and_leaves_nothing(world, caplog, monkeypatch, where):
    """After the decision (mutations, DKIM, the archive's staging, the 250's text — made
    before the commit, so that nothing can fail between the commit and the 250): the 451
    these always had, now with a log line that says where, without the exception's text."""
    if where == "sign":
        world.handler.sign = ExplodingMutation()
    elif where == "reply":
        def broken_text(key, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            raise LookupError(f"no text {key} for {SECRET_SUBJECT}")

        monkeypatch.setattr(handler_module, "t", broken_text)
    else:
        def stage(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - after the blob was written
            raise TypeError(f"staging {SECRET_SUBJECT}")

        monkeypatch.setattr(world.archive, "stage", stage)
        world.cfg.node.shared_spool = True  # so a spool file is written too, and must go again
        written: list[str] = []
        real_write = world.spool.write
        monkeypatch.setattr(world.spool, "write", lambda q, *a, **k: written.append(q) or real_write(q, *a, **k))
    before = tempfails()
    with caplog.at_level(logging.INFO, logger="mailgate.smtp"):
        assert send(world) == STORE_TEMPFAIL
    assert tempfails() == before + 1
    assert_nothing_stored(world)
    [line] = failure_lines(caplog)
    expected = {"sign": "ValueError", "stage": "TypeError", "reply": "LookupError"}[where]
    assert line.startswith(f"{QUEUE_ID}: store failed user=alice@acme.test ip=192.0.2.7 error={expected} at ")
    assert "answered 451, nothing stored" in line
    assert_log_is_clean(caplog.text)
    if where == "stage":
        assert written == [QUEUE_ID]  # the spool file was there before the failure, and is gone


def test_anything_else_before_the_decision_answers_451(world, caplog, monkeypatch):
    def broken(*args):  # noqa: ANN002, ANN202
        raise AttributeError("header parser bug")

    monkeypatch.setattr(handler_module, "parse_headers", broken)
    with caplog.at_level(logging.INFO, logger="mailgate.smtp"):
        assert send(world) == LOCAL_TEMPFAIL == "451 4.3.0 Temporary local error, try again later"
    assert world.rule.calls == 0
    assert_nothing_stored(world)
    assert failure_lines(caplog)[0].startswith(f"{QUEUE_ID}: submission failed user=alice@acme.test ")


def test_deliberate_answers_are_unchanged(world, monkeypatch):
    """A refusal keeps its 5xx, a full disk its 452 (not turned into the new 451s)."""

    class Refuse(Switch):
        def evaluate(self, ctx, directory):  # noqa: ANN001, ANN201
            return Verdict.reject(self.name, "not to them", 550, "5.7.1")

    world.handler.policy.replace_rules([Refuse()])
    assert send(world) == "550 5.7.1 not to them"
    world.handler.policy.replace_rules([Switch()])

    def full(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(world.archive.store, "write", full)
    assert send(world) == "452 4.3.1 Insufficient system storage, try again later"
    assert OutboundMessage.select().count() == 0


def test_a_failure_after_the_store_keeps_the_250(world, caplog):
    """Stored is stored: answering 4xx now would make the client send it again (a duplicate)."""

    def wake() -> None:
        raise RuntimeError("relay pipe")

    world.handler.on_queued = wake
    with caplog.at_level(logging.INFO, logger="mailgate.smtp"):
        assert send(world).startswith("250 2.0.0")
    assert OutboundMessage.select().count() == 1
    assert "stored and answered 250; what follows the store failed: RuntimeError" in failure_lines(caplog)[0]


def test_another_command_raising_answers_451_through_aiosmtpd(caplog):
    """A real session (SubmissionSMTP on loopback, smtplib): a hook other than DATA raising
    is answered 451 by SubmissionSMTP.handle_exception, not aiosmtpd's "500 Error: (Type) text"."""
    from gateway.smtp.server import SubmissionSMTP

    class Handler:
        fail = True

        async def handle_RCPT(self, server, session, envelope, address, options):  # noqa: ANN001, ANN201
            if self.fail:
                raise RuntimeError(f"lookup failed for {address}")
            envelope.rcpt_tos.append(address)
            return "250 OK"

    handler = Handler()

    async def run() -> tuple:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SubmissionSMTP(handler, hostname="gw.test"), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        def client() -> tuple:
            import smtplib

            with smtplib.SMTP("127.0.0.1", port, timeout=10) as conn:
                conn.ehlo("client.example")
                conn.mail("alice@acme.test")
                failed = conn.rcpt("secret-buyer@example.com")
                handler.fail = False
                return failed, conn.rcpt("secret-buyer@example.com")

        try:
            return await asyncio.to_thread(client)
        finally:
            server.close()
            await server.wait_closed()

    with caplog.at_level(logging.INFO, logger="mailgate.smtp"):
        failed, retried = asyncio.run(run())
    assert failed == (451, LOCAL_TEMPFAIL[4:].encode())
    assert retried[0] == 250  # the session goes on
    [line] = failure_lines(caplog)
    assert line.startswith("command failed user=- ip=127.0.0.1 error=RuntimeError at ")
    assert "secret-buyer" not in caplog.text


def fail_the_commit(world, monkeypatch, error: Exception) -> None:
    """The message's commit job (and its batch form) raises ``error`` in the group commit."""

    def raising(*args):  # noqa: ANN002, ANN202
        raise error

    monkeypatch.setattr(world.handler, "_commit_parts", raising)
    monkeypatch.setattr(world.handler, "_commit_many", raising)


@pytest.mark.parametrize(("kind", "sqlstate"), [("unique", "23505"), ("integer", "22P02"), ("not_null", "23502")])
def test_a_postgresql_error_in_the_store_is_logged_without_the_values_it_quotes(
        world, caplog, monkeypatch, postgres_errors, kind, sqlstate):
    """A real PostgreSQL error quotes the row (DETAIL: Key (email)=(…)) or the input (invalid
    input syntax …: "…"): the store-failure line says what failed — type, SQLSTATE, the
    primary message with its quotes emptied — and nothing of the values."""
    from tests.unit.conftest import PG_SECRET_ADDRESS, PG_SECRET_SUBJECT

    error = postgres_errors[kind]
    assert PG_SECRET_ADDRESS.lower() in str(error).lower() or PG_SECRET_SUBJECT in str(error)
    fail_the_commit(world, monkeypatch, error)
    with caplog.at_level(logging.INFO, logger="mailgate"):
        assert send(world) == STORE_TEMPFAIL
    assert_nothing_stored(world)
    [line] = failure_lines(caplog)
    assert line.startswith(f"{QUEUE_ID}: store failed user=alice@acme.test ip=192.0.2.7: peewee.")
    assert f"from psycopg2.errors.{type(error.orig).__name__} SQLSTATE {sqlstate}: " in line
    for text in (line, caplog.text):  # the group commit's own lines too
        assert PG_SECRET_ADDRESS.lower() not in text.lower() and PG_SECRET_SUBJECT not in text
        assert "DETAIL" not in text and "Zhang" not in text


def test_a_full_sqlite_database_still_answers_452_and_says_so(world, caplog, monkeypatch, tmp_path):
    """A real SQLITE_FULL (a page limit) from the commit: 452, as before, and the log line
    keeps SQLite's text."""
    import peewee

    full_db = peewee.SqliteDatabase(str(tmp_path / "full.db"))
    full_db.execute_sql("CREATE TABLE t (x text)")
    full_db.execute_sql("PRAGMA max_page_count = 2")
    with pytest.raises(peewee.OperationalError) as full:
        full_db.execute_sql("INSERT INTO t VALUES (?)", ("x" * 100_000,))
    full_db.close()
    fail_the_commit(world, monkeypatch, full.value)
    with caplog.at_level(logging.INFO, logger="mailgate.smtp"):
        assert send(world) == "452 4.3.1 Insufficient system storage, try again later"
    assert_nothing_stored(world)
    [line] = failure_lines(caplog)
    assert line.endswith(": peewee.OperationalError from sqlite3.OperationalError SQLITE_FULL: "
                         "database or disk is full")


def test_a_message_after_the_group_commit_stopped_is_answered_451(world, caplog):
    """A session still in DATA when the node's committer has stopped: 451 (the client sends it
    again), nothing stored, and no group-commit thread started again for it."""
    import threading

    world.handler.committer.stop()
    before = {t for t in threading.enumerate() if t.name.startswith("group-commit")}
    with caplog.at_level(logging.INFO, logger="mailgate.smtp"):
        assert send(world) == STORE_TEMPFAIL
    assert_nothing_stored(world)
    assert {t for t in threading.enumerate() if t.name.startswith("group-commit")} <= before
    [line] = failure_lines(caplog)
    assert line == f"{QUEUE_ID}: store failed user=alice@acme.test ip=192.0.2.7: gateway.groupcommit.CommitterStopped"

    class Refuse(Switch):
        def evaluate(self, ctx, directory):  # noqa: ANN001, ANN201
            return Verdict.reject(self.name, "not to them", 550, "5.7.1")

    world.handler.policy.replace_rules([Refuse()])  # a refusal is answered as such all the same
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mailgate.smtp"):
        assert send(world) == "550 5.7.1 not to them"
    [line] = failure_lines(caplog)
    assert line.startswith(f"{QUEUE_ID}: archive record of a refused message failed: "
                           "gateway.groupcommit.CommitterStopped\n")
