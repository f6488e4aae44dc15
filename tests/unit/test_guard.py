from gateway.smtp.guard import LoginGuard


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_delay_grows_per_ip_and_user_and_is_capped():
    clock = Clock()
    g = LoginGuard(base_delay=1, max_delay=8, window=60, clock=clock)
    assert g.delay("1.1.1.1", "a") == 0
    for expected in (1, 2, 4, 8, 8):
        g.begin("1.1.1.1", "a")
        g.end("1.1.1.1", "a", success=False)
        assert g.delay("1.1.1.1", "a") == expected
    # Another IP guessing the same user is slowed too; a fresh IP+user is not.
    assert g.delay("2.2.2.2", "a") == 8
    assert g.delay("3.3.3.3", "b") == 0
    clock.t += 61
    assert g.delay("1.1.1.1", "a") == 0


def test_parallel_attempts_count():
    g = LoginGuard(base_delay=1, max_delay=30, clock=Clock())
    for _ in range(3):
        g.begin("9.9.9.9", "victim")
    assert g.delay("9.9.9.9", "victim") == 4


def test_success_clears_user_not_ip():
    g = LoginGuard(base_delay=1, clock=Clock())
    for user in ("a", "b", "a"):
        g.begin("1.1.1.1", user)
        g.end("1.1.1.1", user, False)
    g.begin("1.1.1.1", "a")
    g.end("1.1.1.1", "a", True)
    assert g.delay("5.5.5.5", "a") == 0
    assert g.delay("1.1.1.1", "z") == 1  # the IP still has two failing user names: not laundered


def test_memory_bounded():
    g = LoginGuard(max_keys=100, clock=Clock())
    for i in range(1000):
        g.begin(f"10.0.{i // 256}.{i % 256}", f"u{i}")
    assert len(g._records) <= 100


def test_an_abandoned_attempt_is_neither_in_flight_nor_a_failure():
    g = LoginGuard(base_delay=1, clock=Clock())
    g.begin("1.1.1.1", "a", b"one")
    assert g.delay("1.1.1.1", "a", b"two") == 1  # a parallel guess of a
    g.abandon("1.1.1.1", "a", b"one")  # the upstream was unavailable: nothing was decided
    assert g.delay("1.1.1.1", "a", b"two") == 0


def fail(g: LoginGuard, ip: str, user: str, password: bytes) -> None:
    g.begin(ip, user, password)
    g.end(ip, user, False, password)


def test_parallel_attempts_with_one_password_do_not_slow_each_other():
    # A mail client opening five sessions at once logs in five times with the same password.
    g = LoginGuard(base_delay=1, max_delay=30, clock=Clock())
    for _ in range(5):
        assert g.delay("9.9.9.9", "alice", b"alice-pw") == 0
        g.begin("9.9.9.9", "alice", b"alice-pw")
    # A guess beside them waits as before; parallel guesses (other passwords) still count.
    assert g.delay("9.9.9.9", "alice", b"guess-1") == 16
    g.begin("9.9.9.9", "alice", b"guess-1")
    assert g.delay("9.9.9.9", "alice", b"guess-2") == 30  # 32, capped
    assert g.delay("9.9.9.9", "alice", b"alice-pw") == 1  # the guess in flight counts for them
    for _ in range(5):
        g.end("9.9.9.9", "alice", True, b"alice-pw")
    g.end("9.9.9.9", "alice", False, b"guess-1")
    assert g.delay("9.9.9.9", "alice", b"alice-pw") == 1  # a finished failure counts for everyone
    assert not any(rec.in_flight for rec in g._records.values())  # nothing left in flight


def test_a_password_tried_again_counts_once():
    # A phone retrying an old saved password: one failure, for the user and the IP alike.
    g = LoginGuard(base_delay=1, max_delay=30, clock=Clock())
    for _ in range(10):
        fail(g, "10.0.0.1", "phone", b"old-pw")
    assert g.delay("10.0.0.1", "phone", b"new-pw") == 1
    assert g.delay("10.0.0.2", "phone", b"old-pw") == 1
    # A user name is part of the mark: another user with that password is another failure.
    fail(g, "10.0.0.1", "other", b"old-pw")
    assert g.delay("10.0.0.9", "other", b"x") == 1


def test_guessing_one_user_is_slowed_from_any_address():
    g = LoginGuard(base_delay=1, max_delay=30, clock=Clock())
    for i in range(5):
        fail(g, f"10.0.0.{i}", "victim", b"guess-%d" % i)
    assert g.delay("10.9.9.9", "victim", b"guess-9") == 16
    # One user's failures do not slow the others behind those addresses.
    assert g.delay("10.0.0.1", "colleague", b"pw") == 0


def test_one_users_failures_do_not_slow_colleagues_on_the_same_address():
    g = LoginGuard(base_delay=1, max_delay=30, clock=Clock())
    for i in range(10):
        fail(g, "192.0.2.1", "phone", b"guess-%d" % i)  # even ten different passwords
    assert g.delay("192.0.2.1", "phone", b"x") == 30  # the user waits
    assert g.delay("192.0.2.1", "colleague", b"pw") == 0  # the colleague behind the NAT does not
    # A second user name failing from the address: everybody there gets the base delay.
    fail(g, "192.0.2.1", "someone", b"typo")
    assert g.delay("192.0.2.1", "colleague", b"pw") == 1


def test_spraying_many_users_from_one_address_is_slowed():
    g = LoginGuard(base_delay=1, max_delay=30, clock=Clock())
    delays = []
    for i in range(10):
        user = f"user{i}"
        delays.append(g.delay("203.0.113.5", user, b"Winter2026!"))
        fail(g, "203.0.113.5", user, b"Winter2026!")
    assert delays == [0, 0, 1, 2, 4, 8, 16, 30, 30, 30]
    # The same user names from another address are not slowed by the first one's count.
    assert g.delay("203.0.113.6", "fresh", b"pw") == 0


def test_marks_are_keyed_digests_not_the_password():
    from gateway import loginfail

    who, pw = loginfail.marks("Alice@acme.test", b"secret-pw")
    assert (who, pw) == loginfail.marks("alice@acme.test", b"secret-pw")  # names are case-blind
    assert pw != loginfail.marks("alice@acme.test", b"secret-pX")[1]
    assert len(pw) == 8 and b"secret" not in pw.encode()
    old = loginfail._MARK_KEY
    try:
        loginfail.set_mark_key(b"k" * 32)  # another deployment key: other marks
        assert loginfail.marks("alice@acme.test", b"secret-pw")[1] != pw
    finally:
        loginfail._MARK_KEY = old


def test_an_office_logging_in_at_once_is_not_a_spray():
    # Twenty people behind one NAT at 9 a.m.: attempts in flight count for their own names only.
    g = LoginGuard(base_delay=1, max_delay=30, clock=Clock())
    for i in range(20):
        assert g.delay("192.0.2.1", f"user{i}", b"pw-%d" % i) == 0
        g.begin("192.0.2.1", f"user{i}", b"pw-%d" % i)
    for i in range(20):
        g.end("192.0.2.1", f"user{i}", True, b"pw-%d" % i)
    assert g.delay("192.0.2.1", "late", b"pw") == 0
