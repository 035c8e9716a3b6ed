"""The breaker and retry policy around getting a connection, shared by both pools.

One :class:`Guard` per alias serves the sync and the async pool: they reach the
same server, so when one side learns that the server is down the other should
fail fast too, and an operator sees one breaker state per database.

pybreaker keeps the state machine (closed -> open -> half-open) and notifies its
listeners. It is driven here with short ``call()``s that only *record* an
outcome, because ``CircuitBreaker.call()`` holds a lock for the whole call (it
would serialise every thread waiting for a connection) and works on plain
functions only. Half-open admits one trial at a time; the rest fail fast.

A failed attempt is classified by :func:`.sqlstate.classify`: a configuration fault
(authentication, unknown database or role, SSL refused) is raised at once as a
:class:`ConfigurationFault` in the server's own words, neither retried nor counted
(the server answered: it is up, and one process's wrong settings must not open a
breaker shared with every other process), and logged once a minute per cause.
Several hosts none of which is what ``target_session_attrs`` asks for, though one
answered (a failover under way), are retried but not counted: an open breaker would
fail every caller for ``reset_timeout`` after the promotion.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import backoff
import pybreaker
from django.core.exceptions import ImproperlyConfigured

from ..config import AliasConfig
from ..errors import (
    CircuitOpenError,
    ConfigurationFault,
    DatabaseUnavailable,
    PoolClosed,
    PoolError,
    PoolTimeout,
    redact,
)
from . import breaker_redis as _shared
from . import sqlstate as _sqlstate

__all__ = ["Guard"]

logger = logging.getLogger("django_asyncpool")
T = TypeVar("T")

#: Errors that say nothing about the server's health: never counted, never retried.
NOT_COUNTED: tuple[type[BaseException], ...] = (CircuitOpenError, PoolClosed, ImproperlyConfigured)
#: Not retried either: waiting again would exceed the pool timeout. A pool timeout is
#: the application's own load, so the breaker counts it only with
#: ``OPTIONS["circuit_breaker"]["count_pool_timeouts"]`` (opening it on a full pool
#: would turn a slow-down into an outage).
NOT_RETRIED: tuple[type[BaseException], ...] = (*NOT_COUNTED, PoolTimeout)
#: Seconds between two log lines of one configuration fault of an alias.
FAULT_LOG_EVERY = 60.0
#: Seconds between two replacements of a pool's connections after 25006: a server that
#: stays read-only is not reconnected to for every write.
DEMOTION_EVERY = 1.0


def _raise(exc: BaseException) -> None:
    raise exc


def _noop() -> None:
    return None


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def state_change(self, cb: Any, old: Any, new: Any) -> None:
        self.guard.on_state_change(old.name if old else None, new.name)


class Guard:
    """Circuit breaker and retries for getting connections of one alias."""

    def __init__(
        self,
        config: AliasConfig,
        entered: Counter[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        #: Seconds, monotonic: when the breaker opened, when a trial is due, the retry budget.
        self.clock = clock
        #: How many times the breaker entered each state (the registry keeps it across
        #: guards: a counter for the life of the process).
        self.entered: Counter[str] = Counter() if entered is None else entered
        self.alias = config.alias
        self.opened_at = 0.0  # self.clock() when the breaker last opened
        #: The server's words for the last failure the breaker counted (passwords redacted).
        self.last_cause: str | None = None
        self._fault_log = _sqlstate.OncePerMinute(FAULT_LOG_EVERY, clock=clock)
        self._demoted = _sqlstate.OncePerMinute(DEMOTION_EVERY, clock=clock)
        self.transitions: list[Callable[[str | None, str], None]] = []
        # Read on every checkout: one property away, not three. With
        # OPTIONS["circuit_breaker"]["storage"], a local view of the state in Redis.
        self._not_counted = NOT_COUNTED if config.breaker.count_pool_timeouts else NOT_RETRIED
        self.storage = _shared.storage(config)
        self.breaker = pybreaker.CircuitBreaker(
            state_storage=self.storage,
            fail_max=config.breaker.fail_max,
            reset_timeout=config.breaker.reset_timeout,
            name=config.alias,
            listeners=[_Listener(self)],
            throw_new_error_on_trip=False,
        )
        # One trial at a time: in this process, and with shared state in every process.
        self._trial = _shared.trial_gate(self.storage, self.breaker)

    # -- the breaker ---------------------------------------------------------------------

    @property
    def state(self) -> str:
        """Return ``closed``, ``open`` or ``half-open``."""
        return str(self.breaker.current_state)

    def on_state_change(self, old: str | None, new: str) -> None:
        self.entered[new] += 1
        if new == pybreaker.STATE_OPEN:
            self.opened_at = self.clock()
            why = (
                "another process opened it: the state is shared through Redis"
                if getattr(self.storage, "remote", False)
                else "the trial connection failed"
                if old == pybreaker.STATE_HALF_OPEN
                else f"{self.breaker.fail_max} consecutive connection failures"
            )
            logger.error(
                "Circuit breaker for database %s opened (%s): failing fast for %gs.",
                self.config.describe(),
                why,
                self.breaker.reset_timeout,
            )
        elif new == pybreaker.STATE_CLOSED and old is not None:
            logger.warning(
                "Circuit breaker for database %s closed: the database is back.",
                self.config.describe(),
            )
        for callback in self.transitions:
            callback(old, new)

    def check_open(self) -> None:
        """Raise :class:`CircuitOpenError` while the breaker is open and not yet due a trial."""
        if self.breaker.current_state == pybreaker.STATE_OPEN:
            remaining = self.opened_at + self.breaker.reset_timeout - self.clock()
            if remaining > 0:
                raise self._open_error(remaining)

    def admit(self) -> bool:
        """Let a call through or raise :class:`CircuitOpenError`; return True for a trial."""
        state = self.breaker.current_state
        if state == pybreaker.STATE_CLOSED:
            return False
        self.check_open()
        if not self._trial.acquire(blocking=False):
            raise self._open_error(0.0, trial=True)
        if self.breaker.current_state == pybreaker.STATE_CLOSED:
            self._trial.release()  # another trial closed it meanwhile
            return False
        if self.breaker.current_state == pybreaker.STATE_OPEN:
            self.breaker.half_open()
        return True

    def succeeded(self, trial: bool) -> None:
        if trial:
            try:
                self.breaker.close()
            finally:
                self._trial.release()
        elif self.breaker.fail_counter:
            self.breaker.call(_noop)  # a success resets the consecutive-failure count

    def failed(self, exc: Exception, trial: bool) -> None:
        """Record a failed attempt: counted by the breaker unless it says nothing of the server."""
        if isinstance(exc, PoolTimeout):
            logger.warning(
                "%s%s",
                exc,
                "" if self._not_counted is NOT_COUNTED else " (not counted by the circuit breaker)",
            )
        try:
            if not isinstance(exc, self._not_counted):
                self.last_cause = self._words(exc)
                # In closed state this counts and may open; in half-open it re-opens.
                self.breaker.call(_raise, exc)
        except BaseException:
            pass
        finally:
            if trial:
                self._trial.release()

    def _open_error(self, remaining: float, trial: bool = False) -> CircuitOpenError:
        what = "a trial connection is being made" if trial else f"retrying in {remaining:.1f}s"
        # The cause, when this process saw it (with shared state, another may have).
        cause = f" The last one: {self.last_cause}." if self.last_cause else ""
        return CircuitOpenError(
            f"Database {self.config.describe()} is unavailable: the circuit breaker is open "
            f"after repeated connection failures ({what}).{cause} Check that the server is up "
            "and reachable; calls fail fast until it answers again.",
            alias=self.alias,
            retry_after=max(remaining, 0.0),
        )

    # -- getting a connection --------------------------------------------------------------

    def acquire(
        self,
        acquire: Callable[..., T],
        *args: Any,
        sleep: Callable[[float], object] = time.sleep,
        stats: Any = None,
    ) -> T:
        """Return ``acquire(*args)`` through the breaker, retried with backoff and full jitter.

        ``sleep`` waits between tries: ``time.sleep`` in threads, an awaiting sleep in
        SQLAlchemy's greenlet. Only ``Exception``s count: a cancelled task is no failure.
        ``stats.retries``, if given, counts the retries.
        """
        return self.attempt(acquire, args, sleep, stats, self.clock(), None)

    def attempt(
        self,
        acquire: Callable[..., T],
        args: tuple[Any, ...],
        sleep: Callable[[float], object],
        stats: Any,
        started: float,
        failure: Exception | None,
    ) -> T:
        """:meth:`acquire`, its arguments positional and ``started`` (``self.clock()`` when
        the caller began, the start of the retry budget) given.

        ``failure`` is what a first try already made raised (the counted checkout,
        :func:`.checkout.checkout`, makes it itself while the breaker is closed with no
        failure counted), or None to make that try here. The backoff schedule is made
        only after a failure.
        """
        retry = self.config.retry
        delays = None
        tries = 0 if failure is None else 1
        trial = False
        while True:
            if failure is None:
                trial = self.storage.state != pybreaker.STATE_CLOSED and self.admit()
                tries += 1
                try:
                    conn = acquire(*args)
                except Exception as caught:
                    failure = caught
                except BaseException:
                    if trial:
                        self._trial.release()
                    raise
                else:
                    if trial or self.storage.counter:
                        self.succeeded(trial)
                    return conn
            exc: Exception = failure
            failure = None
            retried = not isinstance(exc, NOT_RETRIED)
            kind = _sqlstate.classify(exc, connecting=True) if retried else None
            if kind in (_sqlstate.CONFIG, _sqlstate.READ_ONLY):
                # The server answered: not counted. A configuration fault is not retried
                # either; no host accepting the alias yet (a failover under way) is.
                if trial:
                    self._trial.release()
                if kind == _sqlstate.CONFIG:
                    raise self.fault(exc) from exc
            else:
                self.failed(exc, trial)
            remaining = retry.max_time - (self.clock() - started)
            if not retried or tries >= retry.max_tries or remaining <= 0:
                error = self.translate(exc)
                if error is exc:
                    raise exc  # ours already: not its own cause (that breaks pickling)
                raise error from exc
            if delays is None:
                delays = backoff.expo(factor=retry.base_delay, max_value=retry.max_delay)
                next(delays)  # backoff's generators are primed with one next()
            delay = min(backoff.full_jitter(next(delays)), remaining)
            if stats is not None:
                stats.retries += 1
            logger.warning(
                "Connecting to database %s failed (try %d of %d), retrying in %.2fs: %s",
                self.config.describe(),
                tries,
                retry.max_tries,
                delay,
                redact(str(exc).strip(), self.config.password),
            )
            sleep(delay)

    def _words(self, exc: BaseException) -> str:
        """Return the server's own words for ``exc``, without the password."""
        return redact(_sqlstate.server_words(exc), self.config.password)

    def fault(self, exc: Exception) -> ConfigurationFault:
        """Return the ConfigurationFault for ``exc``, logged once a minute per cause."""
        reason = self._words(exc)
        code = _sqlstate.sqlstate(exc) or _sqlstate.inferred(reason)
        where = self.config.describe()
        if self._fault_log.first(reason):
            logger.error(
                "Database %s refused the connection: %s (SQLSTATE %s). A configuration "
                "fault: not retried, not counted by the circuit breaker; logged once a "
                "minute while it lasts.",
                where,
                reason,
                code or "none",
            )
        return ConfigurationFault(
            f"Database {where} refused the connection: {reason}. {_sqlstate.advice(reason)} "
            "This is a configuration fault, not an outage: it is not retried.",
            alias=self.alias,
            sqlstate=code,
            reason=reason,
        )

    def demoted(self, side: str, stats: Any) -> bool:
        """Return True if the ``side`` pool should replace its connections after a 25006.

        The server refused a write as read-only: a demoted primary, whose idle
        connections are stale the same way. At most once a second per pool (counted in
        ``stats.demotions``), logged once a minute per pool.
        """
        if not self._demoted.first(side):
            return False
        stats.demotions += 1
        if self._fault_log.first(f"25006 {side}"):
            logger.error(
                "Database %s refused a write: the server is read-only (SQLSTATE 25006, a "
                "demoted primary?). The %s pool replaces its connections; logged once a "
                "minute while it lasts.",
                self.config.describe(),
                side,
            )
        return True

    def translate(self, exc: Exception) -> Exception:
        """Return the error a caller should see for ``exc``: ours, with what to do."""
        if isinstance(exc, (PoolError, ImproperlyConfigured)):
            return exc
        return DatabaseUnavailable(
            f"Could not connect to database {self.config.describe()}: "
            f"{redact(str(exc).strip(), self.config.password) or type(exc).__name__}. "
            "Check that the server is running and reachable, and that NAME, USER, PASSWORD, "
            "HOST and PORT are right.",
            alias=self.alias,
        )
