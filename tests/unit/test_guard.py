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
    for _ in range(2):
        g.begin("1.1.1.1", "a")
        g.end("1.1.1.1", "a", False)
    g.begin("1.1.1.1", "a")
    g.end("1.1.1.1", "a", True)
    assert g.delay("5.5.5.5", "a") == 0
    assert g.delay("1.1.1.1", "z") == 2


def test_memory_bounded():
    g = LoginGuard(max_keys=100, clock=Clock())
    for i in range(1000):
        g.begin(f"10.0.{i // 256}.{i % 256}", f"u{i}")
    assert len(g._records) <= 100


def test_an_abandoned_attempt_is_neither_in_flight_nor_a_failure():
    g = LoginGuard(base_delay=1, clock=Clock())
    g.begin("1.1.1.1", "a")
    assert g.delay("1.1.1.1", "b") == 1
    g.abandon("1.1.1.1", "a")  # the upstream was unavailable: nothing was decided
    assert g.delay("1.1.1.1", "a") == 0
