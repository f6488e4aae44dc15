"""The shared failed-login record (gateway/loginfail.py) on SQLite: two ``SharedFailures``
stand for two processes (or nodes) on one database."""

from __future__ import annotations

import asyncio

from gateway import loginfail
from gateway.db.models import LoginFailure
from gateway.loginfail import SharedFailures, ip_key, user_key
from gateway.smtp.guard import LoginGuard
from panel.auth import LoginLimiter


class Wall:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def fail(guard: LoginGuard, ip: str, user: str) -> None:
    async def attempt() -> None:
        await guard.prepare(ip, user)
        guard.begin(ip, user)
        await guard.settle(ip, user, False)

    asyncio.run(attempt())


def succeed(guard: LoginGuard, ip: str, user: str) -> float:
    async def attempt() -> float:
        await guard.prepare(ip, user)
        delay = guard.delay(ip, user)
        guard.begin(ip, user)
        await guard.settle(ip, user, True)
        return delay

    return asyncio.run(attempt())


def checked_delay(guard: LoginGuard, ip: str, user: str) -> float:
    asyncio.run(guard.prepare(ip, user))
    return guard.delay(ip, user)


def test_failures_in_two_processes_add_up(db):
    wall = Wall()
    a, b = SharedFailures(window=60, wall=wall), SharedFailures(window=60, wall=wall)
    ga, gb = LoginGuard(1, 64, 60, shared=a), LoginGuard(1, 64, 60, shared=b)
    b.poll()  # b starts with an empty record
    fail(ga, "10.0.0.1", "Alice@acme.test")
    fail(ga, "10.0.0.2", "alice@acme.test")
    # b knows nothing yet (no database read for an unknown user: the fast path) ...
    assert gb.delay("10.0.0.3", "alice@acme.test") == 0
    # ... until its feed brings a's two failures.
    assert b.poll() == 4  # two keys per failure
    assert checked_delay(gb, "10.0.0.3", "alice@acme.test") == 2
    fail(gb, "10.0.0.3", "alice@acme.test")
    # a knows the user: its check reads the database and sees b's failure as well.
    assert checked_delay(ga, "10.0.0.9", "alice@acme.test") == 4
    # The IP's failures are shared too: one user failing from it slows nobody else there, a
    # second one (failing in b) gives everybody there the base delay (a reads b's row).
    assert checked_delay(gb, "10.0.0.1", "nobody@acme.test") == 0
    fail(gb, "10.0.0.1", "carol@acme.test")
    assert checked_delay(ga, "10.0.0.1", "nobody@acme.test") == 1
    # Each learns only the other's rows, once: a read b's alice row and 10.0.0.1 row already,
    # not the 10.0.0.3 one nor carol's.
    assert a.poll() == 2 and b.poll() == 0


def test_a_success_in_one_process_clears_the_user_for_the_other(db):
    wall = Wall()
    a, b = SharedFailures(window=60, wall=wall), SharedFailures(window=60, wall=wall)
    ga, gb = LoginGuard(1, 64, 60, shared=a), LoginGuard(1, 64, 60, shared=b)
    for _ in range(3):
        fail(ga, "10.0.0.1", "bob@acme.test")
    fail(ga, "10.0.0.1", "eve@acme.test")  # a second user name failing from the IP
    b.poll()
    assert succeed(gb, "10.0.0.5", "bob@acme.test") == 4
    assert LoginFailure.select().where(LoginFailure.key == user_key("bob@acme.test")).count() == 0
    # a still held three failures in memory and its own local count; the read shows them gone.
    assert checked_delay(ga, "10.0.0.6", "bob@acme.test") == 0
    assert checked_delay(ga, "10.0.0.1", "carol@acme.test") == 1  # not the IP's (two failing names)


def test_failures_expire_and_old_rows_are_swept(db):
    wall = Wall()
    a = SharedFailures(window=60, wall=wall)
    g = LoginGuard(1, 64, 60, shared=a)
    fail(g, "10.0.0.1", "dave@acme.test")
    wall.t += 30
    fail(g, "10.0.0.1", "dave@acme.test")
    assert checked_delay(g, "10.0.0.7", "dave@acme.test") == 2
    wall.t += 31  # the first is out of the window
    g.clock = lambda: 1e12  # (the guard's own record, in its clock, has expired as well)
    assert checked_delay(g, "10.0.0.7", "dave@acme.test") == 1
    assert a.sweep() == 2  # the first failure's two rows
    assert LoginFailure.select().count() == 2
    wall.t += 60
    assert checked_delay(g, "10.0.0.7", "dave@acme.test") == 0
    assert a.sweep() == 2 and LoginFailure.select().count() == 0


def test_a_flood_of_names_is_bounded_in_the_table_and_in_memory(db, monkeypatch):
    monkeypatch.setattr(loginfail, "MAX_ROWS", 50)
    monkeypatch.setattr(loginfail, "SWEEP_EVERY_WRITES", 20)
    wall = Wall()
    a = SharedFailures(window=600, max_keys=30, wall=wall)
    b = SharedFailures(window=600, max_keys=30, wall=wall)
    g = LoginGuard(1, 64, 600, max_keys=30, shared=a)
    for i in range(200):
        fail(g, f"10.1.{i // 250}.{i % 250}", f"spray{i}@acme.test")
        wall.t += 0.01
    # Swept after every 20 writes: never more than the cap plus what came since.
    assert LoginFailure.select().count() <= 50 + 2 * 20
    b.poll()
    assert len(a._known) <= 30 and len(b._known) <= 30
    a.sweep()
    rows = LoginFailure.select().count()
    assert rows == 50
    newest = LoginFailure.select().order_by(LoginFailure.id.desc()).first()
    assert newest.key == user_key("spray199@acme.test")  # the newest are the ones kept


def test_database_away_falls_back_to_the_process_counter(db):
    wall = Wall()
    a = SharedFailures(window=60, wall=wall)
    g = LoginGuard(1, 64, 60, shared=a)
    fail(g, "10.0.0.1", "erin@acme.test")
    db.execute_sql("DROP TABLE loginfailure")  # every statement on the record fails from now on
    fail(g, "10.0.0.1", "erin@acme.test")
    assert not a.available
    # Not everybody locked out (a stranger passes at once), and guessing stays slowed.
    assert checked_delay(g, "10.0.0.50", "frank@acme.test") == 0
    assert checked_delay(g, "10.0.0.51", "erin@acme.test") == 2
    fail(g, "10.0.0.51", "erin@acme.test")
    assert checked_delay(g, "10.0.0.52", "erin@acme.test") == 4
    assert a.poll() == 0 and not a.available


def test_panel_failures_slow_the_mail_logins_and_lock_the_panel_everywhere(db):
    wall = Wall()
    gateway_side, panel_side = SharedFailures(window=900, wall=wall), SharedFailures(window=900, wall=wall)
    other_panel = SharedFailures(window=900, wall=wall)  # another panel process or node
    guard = LoginGuard(1, 64, 900, shared=gateway_side)
    limiter = LoginLimiter(3, 30, 900, 300, shared=panel_side)
    elsewhere = LoginLimiter(3, 30, 900, 300, shared=other_panel)
    limiter.failed("192.0.2.1", "Grace@acme.test")
    limiter.failed("192.0.2.1", "grace@acme.test")
    gateway_side.poll()
    # The panel's failures slow the user's next SMTP or IMAP login (not its IP: another one).
    assert checked_delay(guard, "10.0.0.1", "grace@acme.test") == 2
    elsewhere.failed("192.0.2.2", "grace@acme.test")
    # Three failed sign-ins anywhere: the panel's lockout (its own limits), from any IP.
    assert 0 < limiter.wait_seconds("192.0.2.77", "grace@acme.test") <= 301
    assert limiter.wait_seconds("192.0.2.77", "heidi@acme.test") == 0
    # A success (here: the panel's) clears the user for everyone.
    limiter.succeeded("grace@acme.test")
    assert checked_delay(guard, "10.0.0.2", "grace@acme.test") == 0
    assert limiter.wait_seconds("192.0.2.77", "grace@acme.test") == 0
    assert elsewhere.wait_seconds("192.0.2.77", "grace@acme.test") == 0


def test_mail_login_failures_do_not_lock_the_user_out_of_the_panel(db):
    """Anybody who reaches the SMTP port (a phone with an old saved password, or a stranger
    failing on purpose) must not be able to keep a manager locked out of the panel."""
    wall = Wall()
    gateway_side, panel_side = SharedFailures(window=900, wall=wall), SharedFailures(window=900, wall=wall)
    guard = LoginGuard(1, 64, 900, shared=gateway_side)
    limiter = LoginLimiter(3, 30, 900, 300, shared=panel_side)
    for _ in range(5):
        fail(guard, "10.0.0.1", "grace@acme.test")
    panel_side.poll()
    assert limiter.wait_seconds("192.0.2.77", "grace@acme.test") == 0
    assert checked_delay(guard, "10.0.0.9", "grace@acme.test") > 0  # the mail side still slows them


def test_keys_are_bounded_and_case_blind():
    assert user_key("A" * 1000).startswith("user:aaa") and len(user_key("A" * 1000)) == loginfail.KEY_MAX
    assert user_key("Bob@X") == "user:bob@x" and ip_key("::1") == "ip:::1"


def test_a_database_that_does_not_answer_counts_as_away(monkeypatch):
    import threading
    import time

    monkeypatch.setattr(loginfail, "DB_TIMEOUT", 0.05)
    shared = SharedFailures(window=60, wall=Wall())
    guard = LoginGuard(1, 64, 60, shared=shared)
    guard.begin("10.0.0.1", "ivan@acme.test")
    guard.end("10.0.0.1", "ivan@acme.test", False)  # a failure this guard saw (not written)
    release = threading.Event()
    monkeypatch.setattr(shared, "fresh", lambda keys: release.wait(30))  # the read hangs

    async def check() -> tuple[float, float]:
        started = time.monotonic()
        try:
            await guard.prepare("10.0.0.2", "ivan@acme.test")
            return guard.delay("10.0.0.2", "ivan@acme.test"), time.monotonic() - started
        finally:
            release.set()  # (asyncio.run waits for the thread)

    delay, took = asyncio.run(check())
    # Given up after DB_TIMEOUT: the record counts as away, the guard's own count decides.
    assert delay == 1 and took < 5 and not shared.available


def test_a_password_tried_again_in_two_processes_counts_once(db):
    # The marks' key is the deployment's (for_process: from the approval key every node shares),
    # so a phone's old password retried through either process is one failure.
    wall = Wall()
    a, b = SharedFailures(window=60, wall=wall), SharedFailures(window=60, wall=wall)
    ga, gb = LoginGuard(1, 64, 60, shared=a), LoginGuard(1, 64, 60, shared=b)
    for guard in (ga, gb, ga, gb):
        asyncio.run(guard.prepare("10.0.0.1", "phone@acme.test"))
        guard.begin("10.0.0.1", "phone@acme.test", b"old-pw")
        asyncio.run(guard.settle("10.0.0.1", "phone@acme.test", False, b"old-pw"))
    assert LoginFailure.select().where(LoginFailure.key == user_key("phone@acme.test")).count() == 4
    assert all(row.mark and len(row.mark) == 8 for row in LoginFailure.select())  # digests, not passwords
    assert checked_delay(gb, "10.0.0.2", "phone@acme.test") == 1
    assert checked_delay(ga, "10.0.0.1", "colleague@acme.test") == 0
    # A new password is a new failure, wherever it is tried.
    asyncio.run(ga.settle("10.0.0.3", "phone@acme.test", False, b"other-pw"))
    assert checked_delay(gb, "10.0.0.2", "phone@acme.test") == 2


def test_the_marks_key_comes_from_the_approval_key_and_its_first_start_is_race_free(tmp_path):
    # Every process of a node loads (or makes) the approval key at start: they must end up with
    # one key, or a password tried again through two processes would count twice.
    import threading
    from types import SimpleNamespace

    from gateway.approval import load_or_create_token_key

    path = tmp_path / "certs" / "approval.key"
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(load_or_create_token_key(path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8 and len(set(keys)) == 1 and len(keys[0]) == 32
    assert oct(path.stat().st_mode & 0o777) == "0o600" and list(path.parent.iterdir()) == [path]  # no leftovers
    old = loginfail._MARK_KEY
    try:
        cfg = SimpleNamespace(approval=SimpleNamespace(key_file="certs/approval.key"), path=tmp_path / "mailgate.toml")
        loginfail._load_mark_key(cfg)
        first = loginfail.marks("alice@acme.test", b"pw")
        loginfail._MARK_KEY = b"other"
        loginfail._load_mark_key(cfg)  # another process of the node, same key file: same marks
        assert loginfail.marks("alice@acme.test", b"pw") == first
    finally:
        loginfail._MARK_KEY = old
