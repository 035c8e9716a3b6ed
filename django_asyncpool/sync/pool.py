"""The sync pool: Django's psycopg_pool, made to fail fast and to check liveness cheaply.

Owns, for the ENGINE: building an alias's pool from its wrapper and config
(:meth:`SyncPool.for_wrapper`), the counted checkout path (:func:`checkout`,
:func:`checkin`), the pool's snapshot, and the process lifecycle of the sync side
(the wrappers of this process; after a fork the child forgets the parent's
connections; at exit the pools are closed).

psycopg_pool internals :class:`SyncPool` relies on (``pyproject.toml`` pins
``psycopg-pool<3.4``; ``tests/sync/test_pool.py`` fails when one disappears):
attributes ``_opened``, ``_lock``, ``_nconns``, ``_pool``, ``_stats``, ``_waiting``,
``_min_size``; methods ``_maybe_grow_pool``, ``_add_connection``, ``_connect``,
``_check_open_getconn``, ``_getconn_with_check_loop``, ``_getconn_unchecked``,
``_start_initial_tasks``, ``run_task``, ``schedule_task``,
``_set_connection_expiry_date`` (and the ``_created_at``/``_expire_at`` it stamps); classes
``psycopg_pool.pool.{AddConnection, MaintenanceTask, Schedule}`` and
``psycopg_pool.base.AttemptWithBackoff``.
"""

from __future__ import annotations

import logging
import select
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import psycopg
import psycopg_pool
from django.core.exceptions import ImproperlyConfigured
from psycopg import pq
from psycopg_pool.base import AttemptWithBackoff
from psycopg_pool.pool import AddConnection, MaintenanceTask, Schedule

from ..core import registry as _registry
from ..core import stats as _stats
from ..core.checkout import RETURNED, Leaks
from ..core.hangups import clear_hint, hung_up, maybe_closed, watch_hangups
from ..core.liveness import DUE, GONE, LIVE, clock, verdict
from ..core.renewal import lifetime, rejected
from ..core.sqlstate import CONFIG, QuietPool, classify
from ..errors import PoolError, SyncPoolClosed, SyncPoolTimeout, pool_timeout

if TYPE_CHECKING:
    from ..config import AliasConfig

__all__ = ["PING", "SyncPool", "error", "without_conn_max_age"]

T = TypeVar("T")

logger = logging.getLogger("django_asyncpool")
# psycopg_pool logs each failed attempt of its reconnection loop: once a minute is enough.
logging.getLogger("psycopg.pool").addFilter(QuietPool())

#: A connection returned broken (one lookup, not two, per check-in).
_UNKNOWN = pq.TransactionStatus.UNKNOWN
#: ``checkout_check=PING``: ping at every checkout (Django's CONN_HEALTH_CHECKS).
PING = "ping"
#: What the sync pool does with a leaked connection, and what to do about it.
_REPLACED = (
    "reported as leaked and replaced; it is closed when it comes back. Make the code that "
    "took it close it (a thread should call django.db.connection.close() when done)."
)


def without_conn_max_age(settings_dict: dict[str, Any]) -> dict[str, Any]:
    """Return ``settings_dict``, with CONN_MAX_AGE 0 when it is not while pooling in DEBUG.

    Then the system check warns (dbpool.W007: the default is used); with DEBUG off it
    is an error (E007) and :meth:`SyncPool.for_wrapper` refuses it.
    """
    from django.conf import settings

    pooled = (settings_dict.get("OPTIONS") or {}).get("pool", True) not in (False, None)
    if pooled and settings_dict.get("CONN_MAX_AGE", 0) != 0 and settings.DEBUG:
        return {**settings_dict, "CONN_MAX_AGE": 0}
    return settings_dict


class _Reconnect(AttemptWithBackoff):
    """Reconnection attempts at most a second apart.

    psycopg_pool doubles the delay up to minutes; while the server is down every
    failed attempt fails the waiting clients, and once it is back the pool should
    notice within a second, not after the next long sleep.
    """

    INITIAL_DELAY = 0.2
    MAX_DELAY = 1.0

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, self.MAX_DELAY)


class SyncPool(psycopg_pool.ConnectionPool[psycopg.Connection[Any]]):
    """A psycopg_pool.ConnectionPool for one alias of the ENGINE.

    Two changes to psycopg_pool's behaviour:

    * When an attempt to open a connection fails, the clients waiting for one are
      failed with that error at once, instead of sleeping out the whole timeout
      while the server is down. The breaker and the retry policy take it from there.
    * Connections are checked on checkout without a round trip: an idle connection
      whose socket is readable was closed by the server (terminated backend,
      restart). Only a connection idle for longer than ``liveness_bypass`` seconds
      is pinged. ``checkout_check`` replaces that ping: :data:`PING` pings at every
      checkout (CONN_HEALTH_CHECKS), a callable is the user's own check
      (``OPTIONS["pool"]["check"]``). psycopg_pool's ``check=`` only mirrors it: its
      loop sleeps about a second after each failed check, stalling every request
      after a restart.

    With ``leak_threshold``, a connection held longer than that is reported as
    leaked (with where it was taken) and replaced, so that a thread that never
    gives its connection back does not shrink the pool for good (psycopg_pool,
    and so Django's own pool, would lose it). The leaked connection stays usable
    by its holder and is closed when it comes back.

    Leaks, connections found dead (at checkout or returned broken) and pings are
    counted into ``stats``, the alias's :class:`~django_asyncpool.core.stats.Stats`.
    """

    def __init__(
        self,
        *args: Any,
        liveness_bypass: float,  # no default here: AliasConfig's is the one
        checkout_check: Callable[[psycopg.Connection[Any]], object] | Literal["ping"] | None = None,
        leak_threshold: float | None = None,
        stats: _stats.Stats | None = None,
        alias: str = "default",
        password_source: Callable[[], str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.alias = alias
        self.password_source = password_source
        self.liveness_bypass = liveness_bypass
        self.checkout_check = checkout_check
        self.leak_threshold = leak_threshold
        self.stats = stats if stats is not None else _stats.Stats()
        self.last_connect_error: BaseException | None = None
        self._last_connect_failed_at = 0.0  # clock() of last_connect_error
        self.in_use = 0
        self._count_lock = threading.Lock()
        # psycopg_pool's check= only mirrors it, for code that inspects ``pool._check``
        # (Django's tests do); _check_connection() keeps psycopg_pool from running it.
        mirror = SyncPool.check_connection if checkout_check == PING else checkout_check
        super().__init__(*args, check=mirror, **kwargs)  # type: ignore[arg-type]
        #: Where each connection out was taken; only with a leak_threshold.
        self.leaks = (
            None
            if leak_threshold is None
            else Leaks(self.name, leak_threshold, self.stats, _REPLACED, on_loop=False)
        )

    @classmethod
    def for_wrapper(cls, wrapper: Any, config: AliasConfig) -> SyncPool | None:
        """Return a new (unopened) pool for a DatabaseWrapper, or None with the pool off.

        Raise ImproperlyConfigured for a pool asked for with CONN_MAX_AGE, as Django does.
        """
        settings_dict = wrapper.settings_dict
        options = settings_dict.get("OPTIONS") or {}
        age = settings_dict.get("CONN_MAX_AGE", 0)
        if options.get("pool") and age != 0:
            # Refused as Django's own backend refuses it (its words first); when the pool
            # is on only by our default, the system check dbpool.E007 reports it instead.
            raise ImproperlyConfigured(
                f"Pooling doesn't support persistent connections. Database {wrapper.alias!r} "
                f"has CONN_MAX_AGE = {age!r}: set CONN_MAX_AGE to 0 (the pool keeps the "
                "connections), or OPTIONS['pool'] to False (dbpool.E007)."
            )
        if config.sync_pool is None:
            return None
        connect_kwargs = wrapper.get_connection_params()
        # Ensure we run in autocommit, Django properly sets it later on.
        connect_kwargs["autocommit"] = True
        # Every checkout is checked with OPTIONS["pool"]["check"] (Django >= 6.1), or
        # pinged with CONN_HEALTH_CHECKS, as with Django's own backend.
        check: Any = PING if settings_dict.get("CONN_HEALTH_CHECKS") else None
        if isinstance(options.get("pool"), dict) and "check" in options["pool"]:
            check = options["pool"]["check"]
        return cls(
            kwargs=connect_kwargs,
            open=False,  # opened by the first getconn, never at import or startup
            configure=wrapper._configure_connection,
            checkout_check=check,
            name=f"django_asyncpool:{wrapper.alias}",
            liveness_bypass=config.liveness_bypass,
            leak_threshold=config.leak_threshold,
            stats=_registry.stats(wrapper.alias, "sync"),
            alias=wrapper.alias,
            password_source=config.password_source,
            **config.sync_pool,
        )

    def _check_open_getconn(self) -> None:
        # getconn() calls it when the pool is not open or a connect failed: opened by
        # the first checkout, never at import or startup (as Django); a fresh
        # configuration fault refused at once.
        if not self._opened:
            self.open()
        if self.last_connect_error is not None and not self._pool:
            self._refuse_fast(clock())
        if self._closed:
            super()._check_open_getconn()

    def wait(self, timeout: float = 30.0) -> None:
        if not self._opened:  # not opened by a wait, as psycopg_pool: only by a checkout
            psycopg_pool.ConnectionPool._check_open_getconn(self)
        super().wait(timeout)

    def getconn(self, timeout: float | None = None) -> psycopg.Connection[Any]:
        # psycopg_pool's getconn() and its _getconn_with_check_loop() (which runs check=
        # on a connection, sleeping about a second after each failed check) in one, with
        # the liveness rules (_checked) for the check, one clock read for the wait and
        # the rules, and no INFO log line: every checkout's path
        # (benchmarks/bench_checkout.py).
        if timeout is None:
            timeout = self.timeout
        now = clock()
        self._stats[self._REQUESTS_NUM] += 1
        if not self._opened or self._closed or self.last_connect_error is not None:
            self._check_open_getconn()
        try:
            conn = self._getconn_unchecked(timeout)
            # The common case: a connection returned moments ago, not hung up on by the
            # server, with no check of its own to run: one test.
            if (
                self.checkout_check is not None
                or verdict(
                    maybe_closed(conn), getattr(conn, RETURNED, 0.0), now, self.liveness_bypass
                )
                != LIVE
            ):
                conn = self._checked(conn, now + timeout)
        except psycopg_pool.PoolTimeout:
            # As psycopg_pool: the whole timeout, not what was left of it.
            raise psycopg_pool.PoolTimeout(
                f"couldn't get a connection after {timeout:.2f} sec"
            ) from None
        leaks = self.leaks
        if leaks is None:
            # No sweep to race with: an increment, as Stats' counters (under the GIL an
            # attribute increment is not interrupted). The lock, taken twice per checkout
            # (here and in putconn), is where threads queued behind one another.
            self.in_use += 1
            return conn
        with self._count_lock:
            self.in_use += 1
            leaks.taken(conn)
        return conn

    def _refuse_fast(self, now: float) -> None:
        """Raise the last connect error if it is a fresh configuration fault.

        The reconnection loop tries at most :attr:`_Reconnect.MAX_DELAY` apart: a
        caller would wait for its next attempt to fail the same way (a second each).
        """
        error = self.last_connect_error
        fresh = now - self._last_connect_failed_at < 2 * _Reconnect.MAX_DELAY
        if error is not None and fresh and classify(error, connecting=True) == CONFIG:
            # The same object for every caller: a fresh traceback each time, not a longer one.
            raise error.with_traceback(None)

    def _checked(self, conn: psycopg.Connection[Any], deadline: float) -> psycopg.Connection[Any]:
        """Return ``conn`` if it passes the liveness check, else another one that does."""
        for _ in range(self.max_size):
            try:
                self._check_liveness(conn)
            except psycopg.Error:
                conn.close()
                self.stats.invalidated += 1
                super().putconn(conn)  # a bad return for psycopg_pool: it replaces it
            except BaseException:
                super().putconn(conn)
                raise
            else:
                clear_hint(conn)  # a stale hint: reused number
                return conn
            conn = self._getconn_unchecked(max(deadline - clock(), 0.0))
        return conn

    def putconn(self, conn: psycopg.Connection[Any]) -> None:
        leaks = self.leaks
        if leaks is None:  # no sweep: never reported as leaked (see getconn)
            leaked = False
            self.in_use -= 1
        else:
            with self._count_lock:  # the same lock as the sweep: a leak is decided once
                leaked = not leaks.back(conn)
                if not leaked:
                    self.in_use -= 1
        if leaked:
            # Replaced when it was reported: the pool no longer counts it.
            logger.info("A connection of pool %r reported as leaked came back: closed", self.name)
            conn.close()
            return
        if conn.pgconn.transaction_status == _UNKNOWN:
            self.stats.invalidated += 1  # returned broken: psycopg_pool replaces it
        # Stamped RETURNED by the counted check-in (core.checkout.checkin, from the
        # ENGINE's close()); one given back without it is pinged sooner, never later.
        if getattr(conn, "_pool", None) is not self or self._closed:
            # Not this pool's, or the pool is closed: psycopg_pool's checks and errors.
            psycopg_pool.ConnectionPool.putconn(self, conn)
        else:
            # psycopg_pool's putconn() past those checks, without its INFO log line:
            # every check-in's path (benchmarks/bench_checkout.py).
            self._putconn(conn, from_getconn=False)

    def _start_initial_tasks(self) -> None:
        super()._start_initial_tasks()
        if self.leaks is not None:
            every = self.leaks.every
            self.run_task(Schedule(self, _LeakSweep(self, every), every))

    def sweep_leaks(self) -> None:
        """Report and replace the connections held for longer than ``leak_threshold``."""
        if self.leaks is None:
            return
        with self._count_lock:
            late = self.leaks.due()
            self.in_use -= len(late)
        for _ in late:
            with self._lock:
                # No longer one of the pool's: let it open a replacement, now if
                # clients are waiting or the pool is below min_size.
                self._nconns -= 1
                self._stats["connections_leaked"] += 1
                if self._nconns < self._min_size:
                    self._nconns += 1
                    self.run_task(AddConnection(self))
                elif self._waiting:
                    self._maybe_grow_pool()
        self.leaks.report(late)

    def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        super()._add_connection(attempt or _Reconnect(timeout=self.reconnect_timeout), growing)

    def _connect_renewed(self, timeout: float | None) -> psycopg.Connection[Any]:
        """Open a connection, with a password asked of OPTIONS["password"] if it names one."""
        source = self.password_source
        if source is None:
            return super()._connect(timeout)
        self.kwargs["password"] = source()  # type: ignore[index]  # a dict: for_wrapper's
        try:
            return super()._connect(timeout)
        except psycopg.OperationalError as exc:
            if not rejected(exc):
                raise
        self.kwargs["password"] = source()  # type: ignore[index]  # expired meanwhile: once more
        return super()._connect(timeout)

    def _set_connection_expiry_date(self, conn: Any) -> None:
        # psycopg_pool spreads lifetimes by -5 %..0; the package's pools all by +-10 %.
        super()._set_connection_expiry_date(conn)
        conn._expire_at = conn._created_at + lifetime(self.max_lifetime)

    def _connect(self, timeout: float | None = None) -> psycopg.Connection[Any]:
        try:
            conn = self._connect_renewed(timeout)
        except Exception as exc:
            self.last_connect_error = exc
            self._last_connect_failed_at = clock()
            with self._lock:
                waiting = list(self._waiting)
                self._waiting.clear()
            for client in waiting:
                client.fail(exc)
            raise
        self.last_connect_error = None
        setattr(conn, RETURNED, clock())  # new: no ping at its first checkout
        watch_hangups(conn)
        return conn

    def _check_liveness(self, conn: psycopg.Connection[Any]) -> None:
        found = verdict(hung_up(conn), getattr(conn, RETURNED, 0.0), clock(), self.liveness_bypass)
        if found == GONE:
            raise psycopg.OperationalError("the server closed the connection")
        check = self.checkout_check
        if check is not None and check != PING:
            check(conn)  # type: ignore[operator]  # the user's own (OPTIONS["pool"]["check"])
        elif check == PING or found == DUE:
            self._ping(conn)

    def _ping(self, conn: psycopg.Connection[Any]) -> None:
        """Run an empty query, giving up after the pool timeout.

        psycopg_pool's check_connection() waits for the answer for good: on a dead
        network path (packets dropped, nothing refused) the checkout would hang.
        """
        self.stats.pings += 1
        pgconn = conn.pgconn
        deadline = clock() + self.timeout
        with conn.lock:
            pgconn.send_query(b"")
            while pgconn.flush():  # non-blocking mode: 1 while bytes remain to send
                self._wait(pgconn.socket, deadline, write=True)
            while pgconn.is_busy():
                self._wait(pgconn.socket, deadline)
                pgconn.consume_input()
            while (result := pgconn.get_result()) is not None:
                if result.status != pq.ExecStatus.EMPTY_QUERY:
                    raise psycopg.OperationalError("the connection failed a ping")

    def _wait(self, sock: int, deadline: float, write: bool = False) -> None:
        remaining = deadline - clock()
        ready = (
            select.select([], [sock], [], max(remaining, 0))
            if write
            else (select.select([sock], [], [], max(remaining, 0)))
        )
        if not (ready[1] if write else ready[0]):
            raise psycopg.OperationalError(f"no answer to a ping within {self.timeout:g}s")

    def _check_connection(self, conn: psycopg.Connection[Any]) -> None:
        return  # getconn() runs checkout_check itself, in _check_liveness

    def snapshot(self) -> dict[str, Any]:
        """Return this pool's snapshot (the keys of ``_stats.SNAPSHOT_KEYS``)."""
        raw = self.get_stats()
        return _stats.snapshot(
            self.alias,
            "sync",
            self.stats,
            _registry.guards().get(self.alias),
            idle=raw.get("pool_available", 0),
            in_use=self.in_use,
            waiting=raw.get("requests_waiting", 0),
            min_size=self.min_size,
            max_size=self.max_size,
        )

    def describe_state(self) -> str:
        """Return "size 3/10, in use 3, idle 0, waiting 2" for error messages."""
        return _stats.describe(self.snapshot())


class _LeakSweep(MaintenanceTask):
    """Run :meth:`SyncPool.sweep_leaks` every ``every`` seconds."""

    def __init__(self, pool: SyncPool, every: float) -> None:
        super().__init__(pool)
        self.every = every

    def _run(self, pool: psycopg_pool.ConnectionPool[Any]) -> None:
        pool.schedule_task(self, self.every)  # first, so that an error never stops it
        if isinstance(pool, SyncPool):
            pool.sweep_leaks()


def error(exc: BaseException, pool: SyncPool | None, config: AliasConfig) -> PoolError:
    """Return django-asyncpool's error for psycopg_pool's PoolTimeout, PoolClosed or
    TooManyRequests (the latter two are the application's load: never counted by the
    breaker, never retried)."""
    if isinstance(exc, psycopg_pool.PoolClosed):
        return SyncPoolClosed(
            f"The pool of database {config.describe()} is closed.", alias=config.alias
        )
    if isinstance(exc, psycopg_pool.TooManyRequests):
        return SyncPoolTimeout(
            f"Too many callers were already waiting for a connection to database "
            f"{config.describe()} ({pool.describe_state() if pool else 'no pool'}): "
            f"{exc}. Raise OPTIONS['pool']['max_waiting'] (0: no limit) or "
            "['max_size'], or shed load before the database.",
            alias=config.alias,
        )
    return pool_timeout(
        SyncPoolTimeout,
        config,
        "sync",
        pool.timeout if pool else 0.0,
        pool.describe_state() if pool else "no pool",
    )


# -- the sync kind of pool, for the registry ----------------------------------------------


def _snapshots() -> list[dict[str, Any]]:
    return [pool.snapshot() for pool in list(_registry.sync_pools.values())]


def _close(alias: str) -> None:
    """Close ``alias``'s pool (its settings changed)."""
    pool = _registry.sync_pools.pop(alias, None)
    if pool is not None:
        try:
            pool.close(timeout=1.0)
        except Exception:
            logger.debug("closing the pool of %r failed", alias, exc_info=True)


def _forget() -> list[Any]:
    """In a forked child: drop the parent's pools, close nothing; return them to keep."""
    pools = list(_registry.sync_pools.values())
    _registry.sync_pools.clear()
    return pools


def _drain(alias: str) -> int:
    """Replace every connection of ``alias``'s pool: psycopg_pool's own ``drain()``.

    The idle ones are closed now and replaced, those in use when they come back (the
    same call as after a write refused as read-only, ``DatabaseWrapper.demoted``).
    Return 1 if there was an open pool, else 0.
    """
    pool = _registry.sync_pools.get(alias)
    if pool is None or not pool._opened or pool.closed:
        return 0
    pool.drain()
    return 1


_registry.register_kind("sync", snapshots=_snapshots, reset=_close, forget=_forget, drain=_drain)
