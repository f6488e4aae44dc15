"""The real PostgreSQL fixture stopped and started again under running code.

The database layer (gateway.db.ReconnectingPostgres): a thread's idle connection the server
dropped is replaced before its next statement, one lost inside a transaction fails that
transaction (nothing of it stored, no silent reconnect) and the next one works.  The IMAP
proxy's tag decisions are stored and read again from the same thread; the distribution
watcher distributes mail that arrives after a restart; a periodic task fails while the
server is down and works again after it.  A relay worker keeps running through the outage
and delivers after it.  A whole node: while the server is down a submission is answered
4xx (never a 250 for a message that is not stored); once it is back the very next
submissions are answered 250, stored (archive record, queue row) and relayed by the relay
process, and the panel signs in.  (Before, every thread kept the connection the server had
dropped — "connection already closed" for good: a 451 for every message — and the relay
process's workers died of the first failed claim.)  A relay outcome whose commit meets the
outage is recorded again once the server is back: the message is delivered once; one the
node's stop leaves unrecorded during the outage goes to the node's outcome journal and is
recorded at the next start, before the node releases its old claims: delivered once too."""

from __future__ import annotations

import asyncio
import logging
import smtplib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from peewee import InterfaceError, OperationalError

from gateway.archive.schema import ArchiveRecord
from gateway.db import connect, drop_connection
from gateway.db.models import OutboundMessage, database
from gateway.groupcommit import GroupCommitter
from gateway.relay import RelayWorker
from gateway.spool import Spool
from tests.harness import LogSeen
from tests.harness.gateway import GatewayProcess
from tests.harness.pgdb import pg_db
from tests.integration.test_relay import MESSAGE, Clock, via_sink
from tests.integration.test_submission import QUEUED, message, tls_ctx
from tests.panel.conftest import PanelClient

pytestmark = pytest.mark.integration


db = pg_db("t_restart_")


def queued() -> list[str]:
    return sorted(m.queue_id for m in OutboundMessage.select())


def test_a_connection_the_server_dropped_is_replaced_but_never_inside_a_transaction(db, postgres, tmp_path):
    spool = Spool(tmp_path / "spool")
    thread = ThreadPoolExecutor(1)  # a long-lived thread: one connection, kept between units of work
    try:
        thread.submit(spool.enqueue, "alice@acme.test", ["a@customer.example"], MESSAGE, queue_id="QR1").result()
        postgres.stop()
        try:  # down: the unit of work fails (the reconnect is refused), the next one tries again
            with pytest.raises(OperationalError):
                thread.submit(queued).result()
        finally:
            postgres.start()
        assert thread.submit(queued).result() == ["QR1"]  # no failure first: replaced before use

        def lost_mid_transaction() -> None:
            with database.atomic():
                OutboundMessage.update(attempts=7).execute()
                postgres.stop()
                postgres.start()
                OutboundMessage.update(attempts=8).execute()  # must not run on a new connection

        with pytest.raises((OperationalError, InterfaceError)):
            thread.submit(lost_mid_transaction).result()
        assert thread.submit(lambda: OutboundMessage.get().attempts).result() == 0  # nothing of it committed

        def lost_before_commit() -> None:  # the COMMIT must fail, not succeed on a new connection
            with database.atomic():
                OutboundMessage.update(attempts=9).execute()
                postgres.stop()
                postgres.start()

        with pytest.raises((OperationalError, InterfaceError)):
            thread.submit(lost_before_commit).result()
        assert thread.submit(lambda: OutboundMessage.get().attempts).result() == 0
        # An idle connection after a restart, from a thread that did nothing meanwhile: this one.
        assert queued() == ["QR1"]
    finally:
        thread.submit(lambda: database.is_closed() or database.close()).result()
        thread.shutdown()


def test_a_periodic_task_fails_while_the_server_is_down_and_works_again_after(db, postgres):
    """``gateway.periodic.periodically`` (approval expiry, directory refresh, statistics, the
    panel's pool sweep) on the node's IO threads: here one thread, a run every 10 ms."""
    from gateway.periodic import periodically

    outcomes: list[str] = []
    changed = threading.Condition()

    def count() -> None:
        try:
            OutboundMessage.select().count()
        except (OperationalError, InterfaceError):
            with changed:
                outcomes.append("failed")
                changed.notify_all()
            raise  # logged by periodically; the next run comes as planned
        with changed:
            outcomes.append("ok")
            changed.notify_all()

    def wait_for(what: str, after: int) -> int:
        with changed:
            assert changed.wait_for(lambda: what in outcomes[after:], timeout=20), outcomes[after:]
            return len(outcomes)

    stopping = asyncio.Event()
    loop = asyncio.new_event_loop()
    loop.set_default_executor(ThreadPoolExecutor(1))
    runner = threading.Thread(target=loop.run_until_complete,
                              args=(periodically(stopping, count, 0.01, first=0, failure="count failed"),))
    runner.start()
    try:
        seen = wait_for("ok", 0)
        postgres.stop()
        try:
            seen = wait_for("failed", seen)
        finally:
            postgres.start()
        wait_for("ok", seen)
    finally:
        loop.call_soon_threadsafe(stopping.set)
        runner.join(10)
        loop.run_until_complete(loop.run_in_executor(None, lambda: database.is_closed() or database.close()))
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def test_the_imap_proxys_tag_decisions_are_stored_and_read_after_a_restart(db, postgres):
    from gateway.imap.decisions import EMPTY, DecisionStore

    store = DecisionStore()
    pool = ThreadPoolExecutor(1)  # as the reactor's thread pool: a thread keeps its connection
    try:
        assert pool.submit(store.save, "alice@acme.test", "INBOX", 7, {1: EMPTY}).result() == {1: EMPTY}
        postgres.stop()
        postgres.start()
        assert pool.submit(store.save, "alice@acme.test", "INBOX", 7, {2: EMPTY}).result() == {2: EMPTY}
        assert pool.submit(store.load, "alice@acme.test", "INBOX", 7, [1, 2, 3]).result() == {1: EMPTY, 2: EMPTY}
    finally:
        pool.submit(lambda: database.is_closed() or database.close()).result()
        pool.shutdown()


def test_the_distribution_watcher_distributes_after_a_restart(postgres, dovecot, tmp_path, monkeypatch):
    from gateway.distribute.schema import DistCheckpoint
    from tests.harness import wait_until
    from tests.integration import test_distribution as dist

    postgres.drop_database("t_restart_dist")
    url = postgres.create_database("t_restart_dist")
    on_sqlite = dist.make_config

    def on_postgres(*args, **kwargs):
        cfg = on_sqlite(*args, **kwargs)
        cfg.database.url = url
        return cfg

    monkeypatch.setattr(dist, "make_config", on_postgres)
    env = dist.Env(tmp_path, dovecot)
    try:
        env.start()  # the watcher's thread: a connection of its own, kept while it waits in IDLE
        first = dist.message("buyer@customer.example", "Before the restart")
        env.deliver(first)
        rec = env.record_for(first)
        assert env.queued_to(rec) == ["bob@acme.test"]
        # The watcher's last write for it (the checkpoint) before the server stops: a restart
        # in the middle of handling a message fails that session, which is not what this tests.
        wait_until(lambda: DistCheckpoint.get(DistCheckpoint.mailbox == env.shared).last_uid >= rec.uid,
                   what="the checkpoint past the first message")
        postgres.stop()
        postgres.start()
        drop_connection()  # the test's own (so that what is tested is the watcher's)
        second = dist.message("buyer@customer.example", "After the restart")
        env.deliver(second)  # IDLE wakes the watcher, whose connection the server dropped
        assert env.queued_to(env.record_for(second)) == ["bob@acme.test"]
        assert env.runner.watchers[0].sessions == 1  # no failed session in between
    finally:
        env.stop()
        database.close()



def test_a_relay_worker_runs_through_a_restart_and_delivers_after_it(db, postgres, sink, tmp_path):
    sink.clear()
    cfg = via_sink(sink)
    cfg.relay.poll_interval = 3600  # only wakeup() makes it look again
    spool = Spool(tmp_path / "spool")
    committer = GroupCommitter()  # outcomes through a group committer, as in the node
    worker = RelayWorker(cfg, spool, "w1", None, committer=committer)
    failed = LogSeen("run failed")
    logging.getLogger("gateway.relay").addHandler(failed)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        await asyncio.to_thread(spool.enqueue, "alice@acme.test", ["a@customer.example"], MESSAGE, queue_id="QW1")
        worker.wakeup()
        await asyncio.to_thread(sink.wait_for, 1, 20)
        # QW1's outcome committed: drain() queued in the worker's thread behind its delivery.
        assert await worker._call(worker.drain)
        await asyncio.to_thread(postgres.stop)
        try:
            worker.wakeup()  # its claim fails: logged, and the worker goes on
            assert await asyncio.to_thread(failed.event.wait, 20)
            assert not task.done()
        finally:
            await asyncio.to_thread(postgres.start)
        await asyncio.to_thread(spool.enqueue, "alice@acme.test", ["b@customer.example"], MESSAGE, queue_id="QW2")
        worker.wakeup()
        got = await asyncio.to_thread(sink.wait_for, 2, 20)
        assert sorted(m.rcpt_tos[0] for m in got) == ["a@customer.example", "b@customer.example"]
        stop.set()
        await asyncio.wait_for(task, timeout=10)

    try:
        asyncio.run(scenario())
    finally:
        logging.getLogger("gateway.relay").removeHandler(failed)
        committer.stop()
    assert {m.queue_id: m.state for m in OutboundMessage.select()} == {"QW1": "sent", "QW2": "sent"}


def test_a_relay_outcome_whose_commit_meets_a_restart_is_recorded_after_it_one_delivery(db, postgres, sink,
                                                                                         tmp_path):
    """The server goes down right after the upstream's 250, before the outcome's commit: the
    group commit fails, the worker records the same outcome again once the server is back —
    the row sent, the spool file gone — and after the claim would have run out the message
    is not delivered a second time."""
    sink.clear()
    cfg = via_sink(sink)
    spool = Spool(tmp_path / "spool")
    committer = GroupCommitter()  # outcomes through a group committer, as in the node
    clock = Clock()
    worker = RelayWorker(cfg, spool, "w1", None, now=clock, committer=committer)
    spool.enqueue("alice@acme.test", ["a@customer.example"], MESSAGE, queue_id="QRS1")
    real_send = worker.connection.send
    failed = LogSeen("could not record the relay outcome")
    log = logging.getLogger("gateway.relay")
    log.addHandler(failed)

    def send_then_stop_the_server(*args, **kwargs):
        replies = real_send(*args, **kwargs)
        postgres.stop()
        return replies

    def start_once_a_commit_failed() -> None:
        try:
            failed.event.wait(30)
        finally:
            postgres.start()

    worker.connection.send = send_then_stop_the_server
    starter = threading.Thread(target=start_once_a_commit_failed)
    starter.start()
    try:
        try:
            asyncio.run(worker.run_once())  # its outcomes recorded (retried meanwhile) before it returns
        except (OperationalError, InterfaceError):
            pass  # its next claim met the server still down (``run`` logs that and goes on)
        starter.join()
        assert failed.event.is_set()  # the first commit met the server down
        assert len(sink.wait_for(1, 20)) == 1
        drop_connection()  # the test's own, from before the restart
        done = OutboundMessage.get(OutboundMessage.queue_id == "QRS1")
        assert (done.state, done.attempts, done.claimed_by) == ("sent", 1, None)
        assert not spool.path_for("QRS1").exists()
        clock.advance(cfg.relay.claim_timeout + 1)  # the claim would have run out by now
        assert asyncio.run(worker.run_once()) == 0
    finally:
        starter.join()
        log.removeHandler(failed)
        committer.stop()
        asyncio.run(worker.aclose())
    assert len(sink.messages()) == 1  # delivered once


def subject(data: bytes) -> bytes:
    return data.split(b"Subject: ", 1)[1].split(b"\n", 1)[0].strip()


def attempt(gw: GatewayProcess, subject: str) -> tuple[int, bytes]:
    """One submission; the first reply that is not a success (any stage), else DATA's."""
    msg = message("alice@acme.test", "einkauf@hamburg-tools.de", subject)
    try:
        with smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30) as conn:
            conn.starttls(context=tls_ctx(gw))
            conn.login("alice@acme.test", "alice-pw")
            for code, text in (conn.mail("alice@acme.test"), conn.rcpt("einkauf@hamburg-tools.de")):
                if code >= 300:
                    return code, text
            return conn.data(msg.as_bytes())
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code, exc.smtp_error


def signs_in(gw: GatewayProcess) -> bool:
    """The node's panel: a sign-in (session row written) and the dashboard behind it."""
    client = PanelClient(f"http://127.0.0.1:{gw.panel_port}")
    response = client.login("admin", "Sys-Technik-99")
    assert response.status == 303, (response.status, response.text[:300])
    return client.get("/").status == 200


def test_a_node_answers_4xx_while_postgresql_is_down_and_250_right_after_it_restarts(postgres, dovecot, sink,
                                                                                       tmp_path):
    from gateway.demo.sample_data import seed
    from panel.auth import create_local_account

    sink.clear()
    postgres.drop_database("t_db_restart")
    url = postgres.create_database("t_db_restart")
    # Two SMTP processes: the node and an acceptor child (the kernel spreads the sessions).
    gw = GatewayProcess(tmp_path / "gw", dovecot, {"database": {"url": url}, "smtp": {"processes": 2}})
    connect(url)
    seed()
    create_local_account("admin", "Sys-Technik-99", ("it_admin",), name="Admin")
    gw.start()
    try:
        code, text = attempt(gw, "before the restart")
        assert code == 250, text
        sink.wait_for(1)
        assert signs_in(gw)

        postgres.stop()
        try:
            code, text = attempt(gw, "while the database is down")
            assert 400 <= code < 500, (code, text)
        finally:
            postgres.start()

        # Right after the restart: every thread's connection was dropped by the server.
        code, text = attempt(gw, "right after the restart")
        assert code == 250, text
        first = QUEUED.search(text).group(1).decode()
        with ThreadPoolExecutor(8) as pool:  # more sessions at once: other worker threads, both processes
            replies = list(pool.map(lambda i: attempt(gw, f"after the restart {i}"), range(8)))
        assert [code for code, _ in replies] == [250] * 8, replies
        assert signs_in(gw)  # the panel (a connection per request) signs in and shows a page
        queue_ids = {first} | {QUEUED.search(text).group(1).decode() for _, text in replies}

        # The relay process's workers claim again.  (Should the first message's relay outcome
        # have met the stop, it is recorded again once the server is back: still one delivery.)
        wanted = [b"before the restart", b"right after the restart"] + [f"after the restart {i}".encode()
                                                                        for i in range(8)]
        assert sorted(subject(m.data) for m in sink.wait_for(len(wanted), timeout=30)) == sorted(wanted)
    finally:
        assert gw.stop() == 0
    assert len(sink.messages()) == len(wanted)  # none of them twice
    stored = {r.queue_id for r in ArchiveRecord.select().where(ArchiveRecord.queue_id.in_(sorted(queue_ids)))}
    assert stored == queue_ids
    rows = OutboundMessage.select().where(OutboundMessage.queue_id.in_(sorted(queue_ids)))
    assert {m.queue_id for m in rows} == queue_ids
    assert OutboundMessage.select().count() == 10  # nothing of the refused submission
    database.close()


@pytest.mark.parametrize("process", ["separate", "inline"])
def test_an_outcome_unrecorded_at_the_stop_is_journalled_and_recorded_at_the_next_start(
        postgres, dovecot, tmp_path, process):
    """PostgreSQL stops while a delivery waits for the upstream's reply; the 250 comes, its
    outcome cannot be recorded, and the node stops meanwhile: the outcome goes to the node's
    journal.  PostgreSQL back, the node started: the outcome is recorded from the journal
    before the node releases its old claims — the row sent, and the message delivered once
    (before, the released row went out a second time)."""
    from gateway.demo.sample_data import seed
    from gateway.demo.sink import SinkServer
    from tests.integration.test_stop import delivered, rows, sigterm, submit

    postgres.drop_database("t_journal")
    url = postgres.create_database("t_journal")
    with SinkServer(tmp_path / "upstream") as upstream:
        gw = GatewayProcess(tmp_path / "gw", dovecot, {"database": {"url": url}, "relay": {
            "host": "127.0.0.1", "port": upstream.port, "security": "none", "process": process}})
        connect(url)
        seed()
        gw.start()
        try:
            upstream.hold("DATA")
            submit(gw, "Quote J-1", "j1@acme.test")
            assert upstream.held.wait(20)  # the end of data went out; its reply held
            postgres.stop()
            try:
                mark = len(gw.log_lines)
                upstream.release()  # the 250 comes; its commit meets the server down
                gw.wait_for_log("could not record the relay outcome", after=mark)
                sigterm(gw)
                assert gw.stop(timeout=40) is not None
                assert "kept in the node's outcome journal" in gw.log_text()
                assert delivered(upstream, "j1@acme.test") == 1
            finally:
                postgres.start()
            drop_connection()  # the test's own, from before the restart
            [row] = rows("j1@acme.test")
            assert (row.state, row.attempts) == ("queued", 0) and row.claimed_by is not None
            journal = tmp_path / "gw" / "var" / "relay-journal" / "test.journal"
            assert journal.exists()

            mark = len(gw.log_lines)
            gw.start()
            gw.wait_for_log("relay outcome recorded from the node's journal", after=mark)
            assert not journal.exists()
            [row] = rows("j1@acme.test")
            assert (row.state, row.attempts, row.claimed_by) == ("sent", 1, None)
            # The relay claims and delivers again after the start: a second message goes out, the first not.
            submit(gw, "Quote J-2", "j2@acme.test")
            upstream.wait_for(2, timeout=20)
            assert delivered(upstream, "j1@acme.test") == 1 and delivered(upstream, "j2@acme.test") == 1
        finally:
            upstream.release()
            gw.stop()
    database.close()
