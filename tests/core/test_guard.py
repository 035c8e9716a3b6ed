"""The breaker and retry policy (``_guard.Guard``) alone: no database, no sleeping.

A fake ``acquire`` plays the server, a fake clock is both the guard's and pybreaker's
time, and a fake ``sleep`` moves that clock, so every state change is exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pybreaker
import pytest
from django.core.exceptions import ImproperlyConfigured

from django_asyncpool import config
from django_asyncpool.core.guard import Guard
from django_asyncpool.core.stats import Stats
from django_asyncpool.errors import (
    CircuitOpenError,
    ConfigurationFault,
    DatabaseUnavailable,
    PoolClosed,
    PoolTimeout,
)

RESET = 30.0  # reset_timeout of every guard here, seconds


class Clock:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    slept: list[float]


class Server:
    """A fake ``acquire``: each call takes ``cost`` seconds and plays the next outcome."""

    def __init__(self, clock: Clock, *outcomes: Any, cost: float = 0.0) -> None:
        self.clock = clock
        self.outcomes = list(outcomes)
        self.cost = cost
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        self.clock.now += self.cost
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if callable(outcome):
            outcome = outcome()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def refused() -> OSError:
    return ConnectionRefusedError("connection refused")


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The fake clock, also what pybreaker's ``datetime.now()`` reads."""
    fake = Clock()
    fake.slept = []

    class FakeDatetime(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> FakeDatetime:  # type: ignore[override]
            return cls.fromtimestamp(fake.now, tz or UTC)

    monkeypatch.setattr(pybreaker, "datetime", FakeDatetime)
    return fake


@pytest.fixture
def make_guard(clock: Clock) -> Iterator[Callable[..., Guard]]:
    """``make_guard(fail_max=..., max_tries=..., ...)``: a Guard on the fake clock."""

    def make(*, count_pool_timeouts: bool = False, fail_max: int = 3, **retry: Any) -> Guard:
        retry.setdefault("max_tries", 1)
        settings_dict = {
            "ENGINE": "django_asyncpool",
            "NAME": "app",
            "OPTIONS": {
                "circuit_breaker": {
                    "fail_max": fail_max,
                    "reset_timeout": RESET,
                    "count_pool_timeouts": count_pool_timeouts,
                },
                "retry": retry,
            },
        }
        conf = config.from_settings("g", settings_dict, environ={})
        assert not conf.problems
        return Guard(conf, clock=clock)

    yield make


def run(guard: Guard, server: Server, clock: Clock, stats: Stats | None = None) -> Any:
    return guard.acquire(server, sleep=clock.sleep, stats=stats)


def trip(guard: Guard, clock: Clock) -> None:
    """Open the breaker with ``fail_max`` refused connections."""
    server = Server(clock, refused)
    while guard.state != "open":
        with pytest.raises((DatabaseUnavailable, CircuitOpenError)):
            run(guard, server, clock)
    assert server.calls == guard.breaker.fail_max
    clock.slept.clear()


# -- the breaker -------------------------------------------------------------------------


def test_closed_opens_after_fail_max_counted_failures(
    make_guard: Callable[..., Guard], clock: Clock
) -> None:
    guard = make_guard(fail_max=3)
    server = Server(clock, refused)
    for n in (1, 2):
        with pytest.raises(DatabaseUnavailable) as info:
            run(guard, server, clock)
        assert isinstance(info.value.__cause__, ConnectionRefusedError)
        assert guard.state == "closed"
        assert guard.breaker.fail_counter == n
    with pytest.raises(DatabaseUnavailable):
        run(guard, server, clock)
    assert guard.state == "open"
    assert guard.opened_at == clock.now
    assert guard.entered == {"open": 1}
    assert server.calls == 3


def test_a_success_resets_the_consecutive_failures(
    make_guard: Callable[..., Guard], clock: Clock
) -> None:
    guard = make_guard(fail_max=2)
    server = Server(clock, refused(), "conn", refused())
    with pytest.raises(DatabaseUnavailable):
        run(guard, server, clock)
    assert run(guard, server, clock) == "conn"
    assert guard.breaker.fail_counter == 0
    with pytest.raises(DatabaseUnavailable):
        run(guard, server, clock)
    assert guard.state == "closed"


def test_open_fails_fast_with_retry_after(make_guard: Callable[..., Guard], clock: Clock) -> None:
    guard = make_guard(fail_max=1, max_tries=3)
    trip(guard, clock)
    clock.now = guard.opened_at + 10.0
    server = Server(clock, "conn")
    with pytest.raises(CircuitOpenError) as info:
        run(guard, server, clock)
    assert server.calls == 0
    assert info.value.retry_after == pytest.approx(RESET - 10.0)
    assert info.value.alias == "g"
    assert "retrying in 20.0s" in str(info.value)
    assert not clock.slept  # failing fast is not retried
    assert guard.state == "open"


def test_half_open_admits_exactly_one_trial(make_guard: Callable[..., Guard], clock: Clock) -> None:
    guard = make_guard(fail_max=1)
    trip(guard, clock)
    clock.now += RESET
    others: list[BaseException] = []
    states: list[str] = []

    def trial() -> str:
        # Callers arriving while the trial is under way fail fast.
        states.append(guard.state)
        for _ in range(3):
            try:
                run(guard, Server(clock, "never"), clock)
            except CircuitOpenError as exc:
                others.append(exc)
        return "conn"

    assert run(guard, Server(clock, trial), clock) == "conn"
    assert states == ["half-open"]
    assert len(others) == 3
    assert all(exc.retry_after == 0.0 for exc in others)
    assert all("a trial connection is being made" in str(exc) for exc in others)


def test_a_successful_trial_closes(make_guard: Callable[..., Guard], clock: Clock) -> None:
    guard = make_guard(fail_max=1)
    trip(guard, clock)
    clock.now += RESET
    assert run(guard, Server(clock, "conn"), clock) == "conn"
    assert guard.state == "closed"
    assert guard.breaker.fail_counter == 0
    assert run(guard, Server(clock, "again"), clock) == "again"  # no trial gate held
    assert guard.entered == {"open": 1, "half-open": 1, "closed": 1}


def test_a_failed_trial_reopens(make_guard: Callable[..., Guard], clock: Clock) -> None:
    guard = make_guard(fail_max=5, max_tries=3)
    trip(guard, clock)
    clock.now += RESET + 1
    server = Server(clock, refused)
    with pytest.raises(CircuitOpenError) as info:
        run(guard, server, clock)
    assert server.calls == 1  # reopened: the retry fails fast, without a try
    assert guard.state == "open"
    assert guard.opened_at == clock.now - sum(clock.slept)
    assert info.value.retry_after == pytest.approx(RESET - sum(clock.slept))
    assert guard.entered == {"open": 2, "half-open": 1}


def test_a_late_failure_while_open_is_timed_by_pybreakers_clock(
    make_guard: Callable[..., Guard], clock: Clock
) -> None:
    """A caller admitted while closed fails after another opened the breaker."""
    guard = make_guard(fail_max=1)
    opened: list[float] = []

    def late(delay: float) -> Callable[[], BaseException]:
        def fail() -> BaseException:
            with pytest.raises(DatabaseUnavailable):
                run(guard, Server(clock, refused), clock)  # this one opens it
            opened.append(guard.opened_at)
            clock.now += delay
            return refused()

        return fail

    # Within reset_timeout: the late failure changes nothing.
    with pytest.raises(DatabaseUnavailable):
        run(guard, Server(clock, late(RESET - 1)), clock)
    assert guard.state == "open"
    assert guard.opened_at == opened[0]
    assert guard.entered == {"open": 1}
    # After it: pybreaker takes the late failure as a failed trial and reopens.
    clock.now += RESET
    run(guard, Server(clock, "conn"), clock)  # closed again
    with pytest.raises(DatabaseUnavailable):
        run(guard, Server(clock, late(RESET + 1)), clock)
    assert guard.state == "open"
    assert guard.opened_at == clock.now
    assert guard.entered == {"open": 3, "half-open": 2, "closed": 1}


def test_entered_counts_every_transition(make_guard: Callable[..., Guard], clock: Clock) -> None:
    guard = make_guard(fail_max=1)
    seen: list[tuple[str | None, str]] = []
    guard.transitions.append(lambda old, new: seen.append((old, new)))
    trip(guard, clock)
    clock.now += RESET
    with pytest.raises(DatabaseUnavailable):
        run(guard, Server(clock, refused), clock)
    clock.now += RESET
    run(guard, Server(clock, "conn"), clock)
    assert seen == [
        ("closed", "open"),
        ("open", "half-open"),
        ("half-open", "open"),
        ("open", "half-open"),
        ("half-open", "closed"),
    ]
    assert guard.entered == {"open": 2, "half-open": 2, "closed": 1}


# -- what is counted, what is retried --------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        CircuitOpenError("open elsewhere", alias="g"),
        PoolClosed("closed", alias="g"),
        ImproperlyConfigured("bad settings"),
    ],
    ids=["CircuitOpenError", "PoolClosed", "ImproperlyConfigured"],
)
def test_not_counted_errors_are_neither_counted_nor_retried(
    make_guard: Callable[..., Guard], clock: Clock, error: Exception
) -> None:
    guard = make_guard(fail_max=1, max_tries=5)
    server = Server(clock, error)
    stats = Stats()
    for _ in range(3):
        with pytest.raises(type(error)) as info:
            run(guard, server, clock, stats)
        assert info.value is error  # raised as it is, not wrapped
    assert server.calls == 3
    assert stats.retries == 0
    assert not clock.slept
    assert guard.state == "closed"
    assert guard.breaker.fail_counter == 0


def test_a_pool_timeout_is_not_retried_nor_counted_by_default(
    make_guard: Callable[..., Guard], clock: Clock
) -> None:
    guard = make_guard(fail_max=1, max_tries=5)
    timeout = PoolTimeout("full", alias="g")
    server = Server(clock, timeout)
    stats = Stats()
    for _ in range(3):
        with pytest.raises(PoolTimeout) as info:
            run(guard, server, clock, stats)
        assert info.value is timeout
    assert server.calls == 3
    assert stats.retries == 0
    assert guard.state == "closed"
    assert guard.breaker.fail_counter == 0


def test_count_pool_timeouts_counts_them_but_does_not_retry(
    make_guard: Callable[..., Guard], clock: Clock
) -> None:
    guard = make_guard(fail_max=2, max_tries=5, count_pool_timeouts=True)
    server = Server(clock, PoolTimeout("full", alias="g"))
    stats = Stats()
    with pytest.raises(PoolTimeout):
        run(guard, server, clock, stats)
    assert guard.breaker.fail_counter == 1
    with pytest.raises(PoolTimeout):
        run(guard, server, clock, stats)
    assert guard.state == "open"
    assert server.calls == 2
    assert stats.retries == 0


def test_retries_until_a_try_succeeds(make_guard: Callable[..., Guard], clock: Clock) -> None:
    guard = make_guard(fail_max=5, max_tries=3, base_delay=0.1, max_delay=2.0)
    server = Server(clock, refused(), refused(), "conn")
    stats = Stats()
    assert run(guard, server, clock, stats) == "conn"
    assert server.calls == 3
    assert stats.retries == 2
    assert len(clock.slept) == 2
    # Full jitter on 0.1, 0.2: each delay is somewhere in [0, base * 2**n].
    assert 0 <= clock.slept[0] <= 0.1
    assert 0 <= clock.slept[1] <= 0.2
    assert guard.breaker.fail_counter == 0  # the success ended the run of failures


def test_retries_stop_after_max_tries(make_guard: Callable[..., Guard], clock: Clock) -> None:
    guard = make_guard(fail_max=10, max_tries=3)
    server = Server(clock, refused)
    stats = Stats()
    with pytest.raises(DatabaseUnavailable) as info:
        run(guard, server, clock, stats)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert "Could not connect to database" in str(info.value)
    assert server.calls == 3
    assert stats.retries == 2
    assert guard.breaker.fail_counter == 3  # each try is a counted failure


def test_retries_stop_when_max_time_is_spent(
    make_guard: Callable[..., Guard], clock: Clock
) -> None:
    guard = make_guard(fail_max=100, max_tries=100, max_time=1.0, base_delay=0.5, max_delay=5.0)
    server = Server(clock, refused, cost=0.3)  # each try takes 0.3 s
    stats = Stats()
    started = clock.now
    budget: list[float] = []

    def sleep(seconds: float) -> None:
        budget.append(1.0 - (clock.now - started))
        clock.sleep(seconds)

    with pytest.raises(DatabaseUnavailable):
        guard.acquire(server, sleep=sleep, stats=stats)
    assert 2 <= server.calls <= 4  # cut by time, far before max_tries
    assert stats.retries == server.calls - 1
    assert all(d <= left for d, left in zip(clock.slept, budget, strict=True))  # cut to the budget
    assert clock.now - started >= 1.0  # it stopped because the budget was spent
    assert clock.now - started <= 1.0 + 0.3  # ... by the last try, never by a sleep


def test_retries_stop_when_the_breaker_opens(
    make_guard: Callable[..., Guard], clock: Clock
) -> None:
    guard = make_guard(fail_max=2, max_tries=5)
    server = Server(clock, refused)
    stats = Stats()
    with pytest.raises(CircuitOpenError):
        run(guard, server, clock, stats)
    assert server.calls == 2
    assert guard.state == "open"


# -- cancellation ------------------------------------------------------------------------------


@pytest.mark.parametrize("cancel", [asyncio.CancelledError, KeyboardInterrupt])
def test_a_cancelled_trial_releases_the_gate(
    make_guard: Callable[..., Guard], clock: Clock, cancel: type[BaseException]
) -> None:
    guard = make_guard(fail_max=1, max_tries=3)
    trip(guard, clock)
    clock.now += RESET
    stats = Stats()
    with pytest.raises(cancel):
        run(guard, Server(clock, cancel()), clock, stats)
    assert stats.retries == 0  # a cancel is no failure: not retried
    assert guard.state == "half-open"  # nor counted
    assert run(guard, Server(clock, "conn"), clock) == "conn"  # the next caller is the trial
    assert guard.state == "closed"


def test_a_cancelled_acquire_is_not_counted(make_guard: Callable[..., Guard], clock: Clock) -> None:
    guard = make_guard(fail_max=1, max_tries=3)
    with pytest.raises(asyncio.CancelledError):
        run(guard, Server(clock, asyncio.CancelledError()), clock)
    assert guard.state == "closed"
    assert guard.breaker.fail_counter == 0
    assert not clock.slept


# -- configuration faults ------------------------------------------------------------------


def auth_failed() -> Exception:
    """libpq's words for a wrong password (its connect errors carry no SQLSTATE)."""
    return psycopg.OperationalError(
        'connection failed: connection to server at "db", port 5432 failed: '
        'FATAL:  password authentication failed for user "app"'
    )


def test_a_configuration_fault_is_not_retried_nor_counted_and_logged_once_a_minute(
    make_guard: Callable[..., Guard], clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    guard = make_guard(fail_max=2, max_tries=3)
    server = Server(clock, auth_failed)
    stats = Stats()
    with caplog.at_level("WARNING", logger="django_asyncpool"):
        for step in (0.0, 30.0, 31.0):  # at 0 s, 30 s and 61 s
            clock.now += step
            with pytest.raises(ConfigurationFault) as info:
                run(guard, server, clock, stats)
    assert server.calls == 3 and stats.retries == 0 and clock.slept == []
    assert guard.state == "closed" and guard.breaker.fail_counter == 0
    assert info.value.sqlstate == "28P01"
    assert info.value.reason == 'password authentication failed for user "app"'
    assert "Check USER and PASSWORD" in str(info.value)
    lines = [r for r in caplog.records if "refused the connection" in r.getMessage()]
    assert len(lines) == 2  # at 0 s and at 61 s


def test_a_configuration_fault_in_a_trial_frees_the_trial(
    make_guard: Callable[..., Guard], clock: Clock
) -> None:
    guard = make_guard(fail_max=2)
    trip(guard, clock)
    with pytest.raises(CircuitOpenError) as info:
        run(guard, Server(clock, "conn"), clock)
    assert "The last one: connection refused." in str(info.value)
    clock.now += RESET
    with pytest.raises(ConfigurationFault):
        run(guard, Server(clock, auth_failed), clock)
    assert guard.state == "half-open"  # not re-opened: the server answered
    assert run(guard, Server(clock, "conn"), clock) == "conn"  # the next trial is let in
    assert guard.state == "closed"
