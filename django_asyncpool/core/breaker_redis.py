"""Breaker state shared by every process through Redis, never a new point of failure.

With ``OPTIONS["circuit_breaker"]["storage"] = "redis://host:port/db"`` the alias's
breaker keeps its state with pybreaker's own :class:`~pybreaker.CircuitRedisStorage`,
so the process that opens it makes every process on every host fail fast. What a
checkout reads is a local view of that state (an attribute, as with the memory
storage): a daemon thread per alias re-reads Redis every ``storage_refresh``
seconds, so a process learns what another did within that bound. Only what is
rare goes to Redis from the caller's thread: a failure, the success that ends a
run of failures, a state change, a half-open trial's gate.

The gate is one key with a TTL (``SET NX PX``): opening the breaker writes it for
``reset_timeout``, and once it expires the one process whose ``SET NX`` wins runs
the trial, holding it for at most the checkout's own bound. So one trial runs
cluster-wide at a time, timed by Redis's clock rather than each host's.

Redis down, slow or refusing: the call that finds out (bounded by
``storage_timeout``) and every call after it use the local state at once, the
outage is logged once and counted, and the daemon thread asks Redis again every
:data:`RECHECK` seconds; when it answers, the shared state is used again (a local
open breaker is written there first: it is the newer news). A request never fails
because Redis did.

Keys (``prefix`` is ``storage_prefix``; never a host or a password)::

    {prefix}:{alias}:pybreaker:state         closed | open | half-open (pybreaker's)
    {prefix}:{alias}:pybreaker:fail_counter  consecutive failures, all processes
    {prefix}:{alias}:trial                   the gate: "open" while open, a token in a trial
    {prefix}:{alias}:drain                   the number of the last drain asked for
    {prefix}:{alias}:drain:{n}:acks          the processes that did drain n (for an hour)

The same thread carries drains (``manage.py dbpool_check --drain``): :func:`request_drain`
raises the alias's drain number; each process's follower, when it reads a higher one
than it last saw, has every pool of the alias in its process replace its connections
(the hooks of :data:`on_drain`) and adds itself to the drain's acknowledgements. A
process that started after it has nothing to replace: its first read only notes it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pybreaker

if TYPE_CHECKING:
    from redis import Redis

    from ..config import AliasConfig

__all__ = [
    "ACKS_KEPT",
    "RECHECK",
    "SharedStorage",
    "acks",
    "close",
    "forget",
    "live",
    "on_drain",
    "request_drain",
    "snapshot",
    "storage",
    "trial_gate",
]

logger = logging.getLogger("django_asyncpool")

#: Seconds between two tries to reach Redis again while falling back to local state.
RECHECK = 1.0
#: Seconds between two reads while failures are counted but the breaker is closed: another
#: process may open it before this one's retry (the retries' backoff starts at 0.1 s).
EPISODE = 0.01
#: Compare-and-delete: end a trial only if the gate is still this trial's token.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"

#: Seconds a drain's acknowledgements are kept in Redis.
ACKS_KEPT = 3600
#: Called with ``(alias, drain number)`` in the follower thread when another process asked
#: for a drain: the registry replaces the connections of every pool of the alias here.
on_drain: list[Callable[[str, int], object]] = []

_lock = threading.Lock()
_live: dict[str, SharedStorage] = {}  # this process's shared storage of each alias
_errors: dict[str, int] = {}  # failed Redis calls per alias, for the life of the process


def where(url: str) -> str:
    """Return ``redis://host:port/db`` of ``url``: no user, no password."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


# -- the storage ----------------------------------------------------------------------------------


def storage(config: AliasConfig) -> pybreaker.CircuitBreakerStorage:
    """Return the breaker storage of ``config``: in memory, or a local view of Redis."""
    if config.breaker.storage:
        try:
            return SharedStorage(config)
        except Exception as exc:  # a URL redis-py refuses: the checkouts go on, locally
            password = urlsplit(config.breaker.storage).password or ""
            text = str(exc).replace(password, "***") if password else str(exc)
            logger.error(
                "Breaker state of database %s is not shared: OPTIONS['circuit_breaker']"
                "['storage'] was refused (%s: %s). Fix the URL; this process uses its own "
                "breaker state.",
                config.describe(),
                type(exc).__name__,
                text,
            )
    return LocalStorage(pybreaker.STATE_CLOSED)


class LocalStorage(pybreaker.CircuitMemoryStorage):
    """pybreaker's memory storage with its state and failure counter plain attributes:
    every checkout reads both (core.checkout), and a property read costs a call."""

    state: str = pybreaker.STATE_CLOSED
    counter: int = 0

    def increment_counter(self) -> None:
        self.counter += 1

    def reset_counter(self) -> None:
        self.counter = 0


def trial_gate(store: pybreaker.CircuitBreakerStorage, breaker: pybreaker.CircuitBreaker) -> Any:
    """Return what a half-open trial holds, and start following the shared state.

    A ``threading.Lock`` for a local breaker; for a shared one, an object with the
    same ``acquire(blocking=False)``/``release()`` that also holds the gate in Redis.
    """
    if not isinstance(store, SharedStorage):
        return threading.Lock()
    store.follow(breaker)
    return _TrialGate(store)


class _TrialGate:
    """One trial per process (a lock), and one per cluster (the gate in Redis)."""

    def __init__(self, store: SharedStorage) -> None:
        self._store = store
        self._lock = threading.Lock()

    def acquire(self, blocking: bool = False) -> bool:
        if not self._lock.acquire(blocking=False):
            return False
        if self._store.claim_trial():
            return True
        self._lock.release()
        return False

    def release(self) -> None:
        try:
            self._store.release_trial()
        finally:
            self._lock.release()


class _Tripwire(logging.Logger):
    """Stands in for pybreaker's logger: its storage logs a swallowed RedisError, we note it."""

    def __init__(self, store: SharedStorage) -> None:
        super().__init__("django_asyncpool.redis")
        self.store = store

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        # Called in the thread whose Redis call failed: that call's _io() sees it.
        self.store.trip.error = sys.exc_info()[1] or RuntimeError(str(msg))


class SharedStorage(pybreaker.CircuitBreakerStorage):
    """A breaker storage whose reads are local and whose state is shared through Redis."""

    def __init__(self, config: AliasConfig) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        super().__init__("redis")
        conf = config.breaker
        self.alias = config.alias
        self.config = config
        self.where = where(conf.storage)
        self.namespace = f"{conf.storage_prefix}:{config.alias}"
        self.gate = f"{self.namespace}:trial"
        self.drain_key = f"{self.namespace}:drain"
        #: The last drain number read (None: not read yet, so nothing to compare with).
        self.drain_seen: int | None = None
        self._drain_lock = threading.Lock()  # a drain asked here is not followed here again
        self.refresh = conf.storage_refresh
        # The longest a checkout (so a trial) may take: then another process may try.
        self.trial_ms = int(1000 * max(config.retry.max_time, config.async_pool.timeout, 1.0))
        self._password = urlsplit(conf.storage).password or ""
        # What a checkout reads: plain attributes, as in pybreaker's memory storage.
        self._state = pybreaker.STATE_CLOSED
        self._counter = 0
        self._successes = 0
        self._opened_at: datetime | None = None
        self.shared = False  # True while Redis answers: only then do callers talk to it
        self.since = time.monotonic()  # when ``shared`` last changed
        self.trip = threading.local()  # .error: what the last Redis call of a thread raised
        self.remote = False  # True while applying what another process did
        self._ever = False  # shared at least once
        self._down_logged = False
        self._writes = 0  # local changes: a refresh that read Redis before one is stale
        self._retry_at = 0.0  # while falling back: when to ask Redis again
        self._busy_until = 0.0  # another process holds the trial: don't ask before then
        self._token: str | None = None
        self._flip = threading.Lock()
        self._stopped = False
        self._wake = threading.Event()  # the follower reads Redis now, not after its sleep
        self._breaker: pybreaker.CircuitBreaker | None = None
        # One try, short timeouts: a slow Redis must cost a caller no more than that.
        self.client: Redis = redis.Redis.from_url(
            conf.storage,
            socket_timeout=conf.storage_timeout,
            socket_connect_timeout=conf.storage_timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._release = self.client.register_script(_RELEASE)
        self._backend: pybreaker.CircuitRedisStorage | None = None

    # -- pybreaker's storage interface: reads are local --------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        self._state = state
        if self.remote:
            return
        self._writes += 1
        if self.shared and self._put_state(state) and state == pybreaker.STATE_OPEN:
            self._lease(self.config.breaker.reset_timeout)

    @property
    def counter(self) -> int:
        return self._counter

    def increment_counter(self) -> None:
        self._counter += 1
        backend = self._backend
        if backend is not None and self.shared and not self.remote:
            self._writes += 1
            if self._io(backend.increment_counter)[0]:
                # Failures of every process count towards fail_max.
                ok, shared = self._io(lambda: backend.counter)
                if ok:
                    self._counter = max(self._counter, shared)
                self._wake.set()  # follow the others closely until this episode ends

    def reset_counter(self) -> None:
        self._counter = 0
        backend = self._backend
        if backend is not None and self.shared and not self.remote:
            self._writes += 1
            self._io(backend.reset_counter)

    # A trial's success closes the breaker itself (Guard.succeeded): this stays local.
    @property
    def success_counter(self) -> int:
        return self._successes

    def increment_success_counter(self) -> None:
        self._successes += 1

    def reset_success_counter(self) -> None:
        self._successes = 0

    @property
    def opened_at(self) -> datetime | None:
        return self._opened_at

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self._opened_at = value  # the gate's TTL times the reset cluster-wide

    # -- the trial's gate ----------------------------------------------------------------------

    def claim_trial(self) -> bool:
        """Return True if this process may run the trial (always, while falling back)."""
        if not self.shared:
            return True
        if time.monotonic() < self._busy_until:
            return False
        token = os.urandom(8).hex()
        ok, won = self._io(lambda: self.client.set(self.gate, token, nx=True, px=self.trial_ms))
        if not ok:
            return True  # Redis failed just now: the local lock is the gate
        if won:
            self._token = token
            return True
        self._busy_until = time.monotonic() + self.refresh
        return False

    def release_trial(self) -> None:
        """End this process's trial: free the gate unless opening the breaker re-took it."""
        token, self._token = self._token, None
        if token is not None and self.shared:
            self._io(lambda: self._release(keys=[self.gate], args=[token]))

    # -- talking to Redis ---------------------------------------------------------------------

    def _io(self, call: Callable[[], Any]) -> tuple[bool, Any]:
        """Return ``(True, call())``, or ``(False, None)`` after falling back if Redis failed."""
        self.trip.error = None
        try:
            value = call()
        except Exception as exc:  # RedisError, or garbage under our keys: never the caller's
            self.trip.error = exc
        if self.trip.error is not None:
            self._fall_back(self.trip.error)
            return False, None
        return True, value

    def _put_state(self, state: str) -> bool:
        backend = self._backend
        if backend is None:
            return False

        def put() -> None:
            backend.state = state

        return self._io(put)[0]

    def _lease(self, seconds: float) -> None:
        """Hold the gate for ``seconds``: no trial anywhere before then, by Redis's clock."""
        if seconds > 0:
            self._io(lambda: self.client.set(self.gate, b"open", px=max(int(seconds * 1000), 1)))

    def _fall_back(self, exc: BaseException) -> None:
        with _lock:
            _errors[self.alias] = _errors.get(self.alias, 0) + 1
        with self._flip:
            self._retry_at = time.monotonic() + RECHECK
            self.shared = False
            if self._down_logged:
                return  # once per outage
            self._down_logged = True
            self.since = time.monotonic()
            again = self._ever
        text = str(exc).replace(self._password, "***") if self._password else str(exc)
        logger.warning(
            "Breaker state of database %s is %s: Redis at %s did not answer (%s: %s). This "
            "process uses its own breaker until Redis answers again (asked every %gs).",
            self.config.describe(),
            "not shared any more" if again else "not shared",
            self.where,
            type(exc).__name__,
            text,
            RECHECK,
        )

    def _recovered(self) -> None:
        with self._flip:
            again = self._ever
            self.shared = self._ever = True
            self._down_logged = False
            self.since = time.monotonic()
        log = logger.warning if again else logger.info
        log(
            "Breaker state of database %s is shared through Redis at %s%s.",
            self.config.describe(),
            self.where,
            " again" if again else "",
        )

    def follow(self, breaker: pybreaker.CircuitBreaker) -> None:
        """Read the shared state now, then keep following it from a daemon thread."""
        self._breaker = breaker
        try:
            self._sync()  # bounded by storage_timeout: a new process starts from what is known
        except Exception as exc:  # this runs in a caller's checkout: never let it fail
            self._fall_back(exc)
        with _lock:
            old = _live.get(self.alias)
            _live[self.alias] = self
        if old is not None and old is not self:
            old.stop()
        threading.Thread(
            target=_follow,
            args=(weakref.ref(self), self._wake, os.getpid()),
            name=f"asyncpool-breaker:{self.alias}",
            daemon=True,
        ).start()

    def stop(self) -> None:
        """Stop following the shared state (the guard is gone)."""
        self._stopped = True
        self._wake.set()

    def wait(self) -> float:
        """Return the seconds until the next :meth:`_sync` has something to do."""
        if self.shared:
            if self._counter and self._state == pybreaker.STATE_CLOSED:
                # Failures under way: others' may open it before this process retries.
                return min(self.refresh, EPISODE)
            return self.refresh
        return max(self._retry_at - time.monotonic(), self.refresh)

    def _sync(self) -> None:
        """Bring the local view up to date with Redis, or find Redis again."""
        breaker = self._breaker
        recovering = not self.shared
        if breaker is None or (recovering and time.monotonic() < self._retry_at):
            return
        writes = self._writes
        if self._backend is None:
            ok, self._backend = self._io(self._connect)
            if not ok:
                return
        backend = self._backend
        assert backend is not None
        ok, state = self._io(lambda: backend.state)
        ok, counter = self._io(lambda: backend.counter) if ok else (False, 0)
        if not ok:
            return
        with breaker._lock:  # the lock pybreaker's own transitions take
            if recovering and self._state == pybreaker.STATE_OPEN != state:
                # Opened here while Redis was away: newer news than what Redis holds.
                left = self.config.breaker.reset_timeout
                if self._opened_at is not None:
                    left -= (datetime.now(UTC) - self._opened_at).total_seconds()
                if not self._put_state(pybreaker.STATE_OPEN):
                    return
                self._lease(left)
                state = pybreaker.STATE_OPEN
            if writes == self._writes:  # else a local change came after the read: it wins
                self._counter = counter
                if state != self._state:
                    self._apply(breaker, state)
            if recovering and self.trip.error is None:
                self._recovered()
        self._follow_drains()

    def _follow_drains(self) -> None:
        """Drain this process's pools of the alias if another process asked since the last read."""
        ok, number = self._io(lambda: int(self.client.get(self.drain_key) or 0))
        if not ok:
            return
        with self._drain_lock:
            seen, self.drain_seen = self.drain_seen, max(number, self.drain_seen or 0)
        if seen is None or number <= seen:
            return  # the first read only notes it: this process's connections are newer
        for hook in list(on_drain):
            try:
                hook(self.alias, number)
            except Exception:  # never the follower's end: the next drain must still work
                logger.exception("Draining the pools of database %r failed", self.alias)
        acks = f"{self.drain_key}:{number}:acks"

        def ack() -> None:
            pipe = self.client.pipeline()
            pipe.sadd(acks, _me())
            pipe.expire(acks, ACKS_KEPT)
            pipe.execute()

        self._io(ack)

    def request_drain(self) -> int:
        """Raise the alias's drain number in Redis and return it; raise Redis's error.

        This process is counted as having seen it: the caller drains it itself.
        """
        with self._drain_lock:
            number = int(self.client.incr(self.drain_key))
            self.drain_seen = max(number, self.drain_seen or 0)
        return number

    def acks(self, number: int) -> set[str]:
        """Return ``host:pid`` of the processes that drained for drain ``number``."""
        members = self.client.smembers(f"{self.drain_key}:{number}:acks")
        return {m.decode() if isinstance(m, bytes) else str(m) for m in members}

    def _connect(self) -> pybreaker.CircuitRedisStorage:
        backend = pybreaker.CircuitRedisStorage(
            pybreaker.STATE_CLOSED, self.client, namespace=self.namespace
        )
        backend.logger = _Tripwire(self)  # its errors are ours to count and log once
        return backend

    def _apply(self, breaker: pybreaker.CircuitBreaker, state: str) -> None:
        """Take ``state`` from another process; pybreaker tells the guard's listener."""
        self.remote = True
        try:
            self._state = state
            if state == pybreaker.STATE_OPEN:
                self._opened_at = datetime.now(UTC)
            breaker.state  # noqa: B018 - reading it notices the change and notifies
        finally:
            self.remote = False


def _follow(ref: weakref.ref[SharedStorage], wake: threading.Event, pid: int) -> None:
    while os.getpid() == pid:
        store = ref()
        if store is None:
            return
        interval = store.wait()
        del store  # a guard that is gone must not be kept alive by this thread
        wake.wait(interval)
        wake.clear()
        store = ref()
        if store is None or store._stopped:
            return
        try:
            store._sync()
        except Exception:  # never let the thread die: the next tick tries again
            logger.debug("Reading the shared breaker state failed", exc_info=True)
        del store


def _me() -> str:
    """Return this process as drain acknowledgements name it: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


# -- per-process registry ---------------------------------------------------------------------


def live(alias: str) -> SharedStorage | None:
    """Return this process's shared storage of ``alias`` (None: its breaker is local)."""
    with _lock:
        return _live.get(alias)


def request_drain(alias: str) -> tuple[SharedStorage, int] | None:
    """Ask every process following ``alias``'s shared state to drain; return the store and
    the drain's number, or None when its breaker state is not shared. Raise Redis's error."""
    store = live(alias)
    if store is None:
        return None
    return store, store.request_drain()


def acks(store: SharedStorage, number: int) -> list[str]:
    """Return ``host:pid`` of the other processes that drained for drain ``number``, sorted."""
    return sorted(store.acks(number) - {_me()})


def snapshot() -> dict[str, dict[str, Any]]:
    """Return ``{alias: {...}}`` of this process's shared breakers, as plain data."""
    with _lock:
        live = dict(_live)
        errors = dict(_errors)
    return {
        alias: {
            "storage": "redis",
            "where": store.where,
            "shared": store.shared,  # False: Redis did not answer, local state in use
            "seconds": round(time.monotonic() - store.since, 1),  # since ``shared`` changed
            "errors": errors.get(alias, 0),  # failed Redis calls, for the life of the process
        }
        for alias, store in live.items()
    }


def close(alias: str) -> None:
    """Stop following the shared state of ``alias`` (its guard is gone)."""
    with _lock:
        store = _live.pop(alias, None)
    if store is not None:
        store.stop()


def forget() -> None:
    """Stop following every shared state (after a fork, or when tests change settings)."""
    global _lock
    _lock = threading.Lock()  # may have been held by another thread at fork time
    for store in _live.values():
        store._stopped = True  # no Event.set(): its lock too may be held since the fork
    _live.clear()
