"""The pools' Prometheus metrics: every metric object, created once, and how they are fed.

The pools count into plain data (:mod:`django_asyncpool.core.stats`, one ``Stats`` per
alias and side); Prometheus only renders it, so the hot path never touches a
metric object. What brings the metric objects up to date is :func:`flush`:

* In one process (``runserver``, one uvicorn worker, a script), one collector,
  registered once in prometheus_client's ``REGISTRY``, flushes on each scrape
  (django-prometheus's ``/metrics``, the standalone exporter) and yields the metrics.
* With several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set) a scrape reads
  only the files every process writes its values to, and no collector runs. So
  each process flushes into its files every :data:`FLUSH_INTERVAL` seconds from a
  daemon thread, and at exit. Counters and histograms add up over the processes,
  gauges of connections add up over the live ones (``livesum``), and the breaker's
  0/1 state gauges take the largest value (``livemax``: 1 when any live process is
  in that state).

Labels are the alias and the pool (``"sync"``, ``"async"``, or ``"async_orm"`` for the
native async ORM of :mod:`django_asyncpool.orm.native`): never a host, a
user, a DSN or a password. docs/metrics.md has the table of what each one means.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import values as _values
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .core import breaker_redis as _shared
from .core import process as _process
from .core import registry as _registry
from .core import stats as _stats

__all__ = ["METRICS", "exported_names", "flush", "install", "setup"]

logger = logging.getLogger("django_asyncpool")

OUTCOMES = ("success", "failure", "timeout", "rejected")
STATES = ("idle", "in_use", "waiting")
BREAKER_STATES = ("closed", "open", "half-open")
#: Seconds between two writes of a process's values with PROMETHEUS_MULTIPROC_DIR.
FLUSH_INTERVAL = 1.0

_L = ("alias", "pool")

ATTEMPTS = Counter(
    "db_connection_attempts_total",
    "Requests for a connection, by outcome: success, failure (could not connect), "
    "timeout (none became free in time), rejected (the circuit breaker is open).",
    (*_L, "outcome"),
    registry=None,
)
STATE = Gauge(
    "db_connection_state",
    "Connections by state: idle (open, in the pool), in_use (handed out); waiting is "
    "the number of callers waiting for one.",
    (*_L, "state"),
    registry=None,
    multiprocess_mode="livesum",
)
LATENCY = Histogram(
    "db_connection_latency_seconds",
    "Time to obtain a usable connection: waiting, opening, retries and the liveness "
    "check included.",
    _L,
    buckets=_stats.LATENCY_BUCKETS,
    registry=None,
)
HELD = Histogram(
    "db_connection_held_seconds",
    "Time a connection was held, from checkout until it went back to the pool.",
    _L,
    buckets=_stats.HELD_BUCKETS,
    registry=None,
)
SIZE = Gauge(
    "db_pool_size",
    "Connections open now (idle + in use).",
    _L,
    registry=None,
    multiprocess_mode="livesum",
)
MIN_SIZE = Gauge(
    "db_pool_min_size",
    "Connections the pool keeps open at least (sync: min_size; async: 0, opened on demand).",
    _L,
    registry=None,
    multiprocess_mode="livesum",
)
MAX_SIZE = Gauge(
    "db_pool_max_size",
    "Connections the pool may open at most (sync: max_size; async and async_orm: "
    "pool_size + max_overflow per event loop, one budget the two sides share).",
    _L,
    registry=None,
    multiprocess_mode="livesum",
)
BUDGET = Gauge(
    "db_pool_budget_connections",
    "Connections the alias may open in this process: the sync max_size plus, per event "
    "loop, the async pool_size + max_overflow (summed over processes in multiprocess mode).",
    ["alias"],
    registry=None,
    multiprocess_mode="livesum",
)
CREATED = Counter(
    "db_pool_connections_created_total",
    "New connections opened to the server (sync: counted when first handed out).",
    _L,
    registry=None,
)
REUSED = Counter(
    "db_pool_connections_reused_total",
    "Checkouts served by a connection that had been handed out before.",
    _L,
    registry=None,
)
INVALIDATED = Counter(
    "db_pool_connections_invalidated_total",
    "Connections found closed by the server (or returned broken) and replaced.",
    _L,
    registry=None,
)
DEMOTIONS = Counter(
    "db_pool_demotions_total",
    "Writes refused with 25006 (the server turned read-only: a demoted primary) after "
    "which the pool replaced its connections.",
    _L,
    registry=None,
)
DRAINS = Counter(
    "db_pool_drains_total",
    "Drains on request (drain() in code, or dbpool_check --drain through the shared "
    "breaker storage) after which the pool replaced its connections.",
    _L,
    registry=None,
)
TIMEOUTS = Counter(
    "db_pool_timeouts_total",
    "Requests that waited the pool timeout without getting a connection.",
    _L,
    registry=None,
)
RETRIES = Counter(
    "db_pool_retries_total",
    "Connection tries beyond the first one (backoff retries after a failure).",
    _L,
    registry=None,
)
LEAKS = Counter(
    "db_pool_leaks_total",
    "Leak warnings: connections held longer than OPTIONS['leak_threshold'].",
    _L,
    registry=None,
)
BREAKER_STATE = Gauge(
    "db_pool_breaker_state",
    "1 for the circuit breaker's current state (closed, open, half-open), 0 for the others. "
    "One breaker per alias serves both pools.",
    ("alias", "state"),
    registry=None,
    multiprocess_mode="livemax",
)
BREAKER_TRANSITIONS = Counter(
    "db_pool_breaker_transitions_total",
    "Times the circuit breaker entered a state.",
    ("alias", "state"),
    registry=None,
)
FAILOVERS = Counter(
    "db_pool_failovers_total",
    "Reads meant for an alias that went to the alias 'to' of its OPTIONS['failover_to'] "
    "because its breaker was open or it could not connect.",
    ("alias", "to"),
    registry=None,
)
STORAGE_ERRORS = Counter(
    "db_breaker_storage_errors_total",
    "Calls to the breaker's shared storage (OPTIONS['circuit_breaker']['storage'], Redis) "
    "that failed or timed out; each outage makes the process use its local breaker state.",
    ("alias",),
    registry=None,
)
STORAGE_SHARED = Gauge(
    "db_breaker_storage_shared",
    "1 while the breaker state is shared through Redis, 0 while a process falls back to "
    "its local state because Redis does not answer (with several processes: the lowest).",
    ("alias",),
    registry=None,
    multiprocess_mode="livemin",
)
FALLBACKS = Counter(
    "db_async_orm_fallbacks_total",
    "Async ORM calls on an alias with OPTIONS['async_orm'] that ran on Django's thread "
    "path instead (signal receivers, another database), by method.",
    ("alias", "method"),
    registry=None,
)
LOOP_BLOCKED = Counter(
    "db_loop_blocked_total",
    "Times sync code run in a greenlet on the event loop (native ORM, Django's middleware "
    "and request signals) held the loop longer than ASYNCPOOL_LOOP_BLOCKED_MS, by the code "
    "location that held it (django_asyncpool.orm.watchdog).",
    ("where",),
    registry=None,
)

METRICS: tuple[Counter | Gauge | Histogram, ...] = (
    ATTEMPTS,
    STATE,
    LATENCY,
    HELD,
    SIZE,
    MIN_SIZE,
    MAX_SIZE,
    BUDGET,
    CREATED,
    REUSED,
    INVALIDATED,
    DEMOTIONS,
    DRAINS,
    TIMEOUTS,
    RETRIES,
    LEAKS,
    BREAKER_STATE,
    BREAKER_TRANSITIONS,
    FAILOVERS,
    STORAGE_ERRORS,
    STORAGE_SHARED,
    FALLBACKS,
    LOOP_BLOCKED,
)


def exported_names() -> dict[str, str]:
    """Return ``{name: type}`` of every metric, named as they appear on /metrics."""
    names = {}
    for metric in METRICS:
        for family in metric.describe():
            suffix = "_total" if family.type == "counter" else ""
            names[family.name + suffix] = family.type
    return names


# -- from plain data to the metric objects -----------------------------------------------------

#: (metric, extra label, snapshot -> value) of the counters in a pool snapshot.
_COUNTERS: tuple[tuple[Counter, str, Callable[[dict[str, Any]], int]], ...] = (
    (ATTEMPTS, "success", lambda s: s["checkouts"]),
    (ATTEMPTS, "failure", lambda s: s["failures"] - s["timeouts"]),
    (ATTEMPTS, "timeout", lambda s: s["timeouts"]),
    (ATTEMPTS, "rejected", lambda s: s["rejected"]),
    (CREATED, "", lambda s: s["created"]),
    (REUSED, "", lambda s: s["reused"]),
    (INVALIDATED, "", lambda s: s["invalidated"]),
    (DEMOTIONS, "", lambda s: s["demotions"]),
    (DRAINS, "", lambda s: s["drains"]),
    (TIMEOUTS, "", lambda s: s["timeouts"]),
    (RETRIES, "", lambda s: s["retries"]),
    (LEAKS, "", lambda s: s["leaks"]),
)


class _Side:
    """One alias's side: its metrics' label children, and the values last written to them."""

    def __init__(self, alias: str, side: str) -> None:
        self.counters = [
            (metric.labels(alias, side, *([extra] if extra else [])), value)
            for metric, extra, value in _COUNTERS
        ]
        self.pushed = [0] * len(self.counters)
        self.histograms = [
            (LATENCY.labels(alias, side), _Pushed(len(_stats.LATENCY_BUCKETS) + 1)),
            (HELD.labels(alias, side), _Pushed(len(_stats.HELD_BUCKETS) + 1)),
        ]
        self.state = [STATE.labels(alias, side, state) for state in STATES]
        self.sizes = [m.labels(alias, side) for m in (SIZE, MIN_SIZE, MAX_SIZE)]
        self.alias = alias
        self.fallbacks: dict[str, int] = {}

    def push(self, snapshot: dict[str, Any], stats: _stats.Stats | None) -> None:
        """Write what is new in ``snapshot`` (and in ``stats``' histograms) since the last push."""
        for i, (child, value) in enumerate(self.counters):
            now = value(snapshot)
            if now > self.pushed[i]:  # a counter only grows, whatever the race
                child.inc(now - self.pushed[i])
                self.pushed[i] = now
        for gauge, key in zip(self.state, STATES, strict=True):
            gauge.set(snapshot[key])
        for gauge, key in zip(self.sizes, ("size", "min_size", "max_size"), strict=True):
            gauge.set(snapshot[key])
        if stats is None:
            return
        # Distributions, not figures: the histograms come from the statistics themselves.
        for method, now in list(stats.fallbacks.items()):
            if now > self.fallbacks.get(method, 0):
                FALLBACKS.labels(self.alias, method).inc(now - self.fallbacks.get(method, 0))
                self.fallbacks[method] = now
        for (hist_child, pushed), hist in zip(
            self.histograms, (stats.latency, stats.held), strict=True
        ):
            pushed.push(hist_child, hist)

    def rebase(self, snapshot: dict[str, Any], stats: _stats.Stats) -> None:
        """Take everything in ``snapshot`` and ``stats`` as written already."""
        self.pushed = [value(snapshot) for _, value in self.counters]
        self.fallbacks = dict(stats.fallbacks)
        for (_, pushed), hist in zip(self.histograms, (stats.latency, stats.held), strict=True):
            pushed.counts, pushed.sum = list(hist.counts), hist.sum


class _Pushed:
    """What of a :class:`_stats.Histogram` was written to a Prometheus histogram."""

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.sum = 0.0

    def push(self, child: Any, hist: _stats.Histogram) -> None:
        # prometheus_client has no public call to add n observations to a bucket; its
        # per-bucket values (_buckets, _sum) are what observe() itself increments, in
        # every version we support (tests/test_metrics.py checks the output is the same).
        counts, total = list(hist.counts), hist.sum
        for i, count in enumerate(counts):
            if count > self.counts[i]:
                child._buckets[i].inc(count - self.counts[i])
                self.counts[i] = count
        if total != self.sum:
            child._sum.inc(total - self.sum)
            self.sum = total


_flush_lock = threading.Lock()
_sides: dict[tuple[str, str], _Side] = {}
_breakers: set[str] = set()
#: (alias, state) -> breaker transitions already added to BREAKER_TRANSITIONS.
_transitions_pushed: dict[tuple[str, str], int] = {}
#: (alias, to) -> failovers already added to FAILOVERS.
_failovers: dict[tuple[str, str], int] = {}
#: Failed calls to the shared breaker storage already added to STORAGE_ERRORS, per alias.
_storage_pushed: dict[str, int] = {}


def flush() -> None:
    """Bring every metric object up to date with the pools of this process.

    Everything but the histograms is rendered from the pools' snapshots
    (``_registry.snapshots()``), the figures ``dbpool_check`` and ``/pool/`` show.
    """
    with _flush_lock:
        guards = _registry.guards()

        def exported(alias: str) -> bool:
            guard = guards.get(alias)
            return guard is None or guard.config.metrics

        stats = {(alias, side): s for alias, side, s in _registry.all_stats()}
        states: dict[str, str] = {}
        for snap in _registry.snapshots():
            alias, side = snap["alias"], snap["pool"]
            states[alias] = snap["breaker_state"]
            if exported(alias):
                _side(alias, side).push(snap, stats.get((alias, side)))
        _push_budgets(guards)
        _breakers.update(alias for alias, g in guards.items() if g.config.metrics)
        for alias in _breakers:
            guard = guards.get(alias)
            # A breaker is built on first use, closed; a discarded one is rebuilt closed.
            current = states.get(alias) or (guard.state if guard is not None else "closed")
            for state in BREAKER_STATES:
                BREAKER_STATE.labels(alias, state).set(1 if state == current else 0)
        for alias, counts in _registry.transitions().items():
            if exported(alias):
                for state, count in counts.items():
                    done = _transitions_pushed.get((alias, state), 0)
                    if count > done:
                        BREAKER_TRANSITIONS.labels(alias, state).inc(count - done)
                        _transitions_pushed[alias, state] = count
        for alias, storage in _shared.snapshot().items():
            if exported(alias):
                errors, pushed = storage["errors"], _storage_pushed.get(alias, 0)
                if errors > pushed:
                    STORAGE_ERRORS.labels(alias).inc(errors - pushed)
                    _storage_pushed[alias] = errors
                STORAGE_SHARED.labels(alias).set(1 if storage["shared"] else 0)
        _push_failovers(exported)
        _push_loop_blocked()


def _push_budgets(guards: dict[str, Any]) -> None:
    # Every alias of ours, used yet or not: the budget is what its settings allow.
    for alias in _registry.aliases():
        try:
            conf = guards[alias].config if alias in guards else _registry.config(alias)
        except Exception:  # broken settings: the system checks say why
            continue
        if conf.metrics:
            BUDGET.labels(alias).set(_registry.budget(alias, conf)["per_process"])


def _push_failovers(exported: Callable[[str], bool]) -> None:
    from .failover import route as _failover

    for (alias, to), count in _failover.counts().items():
        done = _failovers.get((alias, to), 0)
        if count > done and exported(alias):
            FAILOVERS.labels(alias, to).inc(count - done)
            _failovers[alias, to] = count


#: where -> loop-blocking slices already added to LOOP_BLOCKED.
_blocked_pushed: dict[str, int] = {}


def _push_loop_blocked() -> None:
    from .orm import watchdog as _watchdog

    for where, count in list(_watchdog.blocked.items()):
        done = _blocked_pushed.get(where, 0)
        if count > done:
            LOOP_BLOCKED.labels(where).inc(count - done)
            _blocked_pushed[where] = count


def _side(alias: str, side: str) -> _Side:
    try:
        return _sides[alias, side]
    except KeyError:
        made = _sides[alias, side] = _Side(alias, side)
        return made


# -- registration --------------------------------------------------------------------------


class _Collector(Collector):
    """Flush, then yield every pool metric: what a scrape of ``REGISTRY`` sees."""

    def collect(self) -> Iterable[Metric]:
        flush()
        for metric in METRICS:
            yield from metric.collect()

    def describe(self) -> Iterable[Metric]:
        for metric in METRICS:
            yield from metric.describe()


_COLLECTOR = _Collector()
#: The attribute of a registry that holds the collector registered there: it survives
#: a re-import of this module, whose new collector then replaces the old one.
_MARK = "_django_asyncpool_collector"
_install_lock = threading.RLock()
_flusher_pid = 0


def install(registry: CollectorRegistry = REGISTRY) -> None:
    """Register the pool metrics with ``registry``, once however often it is called.

    With PROMETHEUS_MULTIPROC_DIR, also start this process's flusher thread.
    """
    if getattr(registry, _MARK, None) is not _COLLECTOR:
        with _install_lock:
            old = getattr(registry, _MARK, None)
            if old is not _COLLECTOR:
                if old is not None:
                    with contextlib.suppress(KeyError):  # someone unregistered it already
                        registry.unregister(old)
                setattr(registry, _MARK, _COLLECTOR)
                try:
                    registry.register(_COLLECTOR)
                except ValueError as exc:
                    logger.error(
                        "The pool metrics of django-asyncpool are not exported: %s. Another "
                        "collector in this process already uses these metric names.",
                        exc,
                    )
    if _flusher_pid != os.getpid() and multiprocess():
        _start_flusher()


def setup() -> None:
    """Register the pool metrics and create their series at 0.

    Called by the app's ``ready()`` (which then starts the exporter if
    METRICS_ENABLED); safe to call again (tests, autoreload).
    """
    install()
    _prime()


def _prime() -> None:
    """Create the series of every alias of the ENGINE now, at 0 (the breaker closed).

    Dashboards then show zeros rather than no data before the first request. With
    PROMETHEUS_MULTIPROC_DIR it also creates this process's files before it serves:
    prometheus_client creates a file empty, then sizes it, and a scrape reading it
    in between fails with a 500.
    """
    with _flush_lock:
        for alias in _registry.aliases():
            config = _registry.config(alias)
            if not config.metrics:
                continue
            for to in config.failover_to:
                FAILOVERS.labels(alias, to)  # the series, at 0
            sides: tuple[str, ...] = _stats.SIDES
            if config.async_orm:
                sides = (*sides, "async_orm")
            for side in sides:
                _side(alias, side)
            for state in BREAKER_STATES:
                BREAKER_TRANSITIONS.labels(alias, state)  # the series, at 0
                if alias not in _breakers:
                    BREAKER_STATE.labels(alias, state).set(1 if state == "closed" else 0)
            _breakers.add(alias)


def multiprocess() -> bool:
    """Return True when metric values live in PROMETHEUS_MULTIPROC_DIR's files."""
    marked = getattr(_values.ValueClass, "_multiprocess", None)
    if marked is None:  # older prometheus_client: as it decides, from the environment
        return "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ
    return bool(marked)


def _start_flusher() -> None:
    global _flusher_pid
    with _install_lock:
        if _flusher_pid == os.getpid():
            return
        _flusher_pid = os.getpid()
        thread = threading.Thread(
            target=_flush_forever, args=(_flusher_pid,), name="asyncpool-metrics", daemon=True
        )
        thread.start()


def _flush_forever(pid: int) -> None:
    stop = threading.Event()
    while not stop.wait(FLUSH_INTERVAL) and os.getpid() == pid:
        try:
            flush()
        except Exception:
            logger.warning("Writing the pool metrics failed", exc_info=True)


def _after_fork_in_child() -> None:
    global _flush_lock, _install_lock
    # Either may have been held by another thread at fork time.
    _flush_lock = threading.Lock()
    _install_lock = threading.RLock()
    if multiprocess():
        # This process writes to files of its own, from 0: what the parent counted,
        # written or not yet, is the parent's to write.
        stats = {(alias, side): s for alias, side, s in _registry.all_stats()}
        for snap in _registry.snapshots():
            key = snap["alias"], snap["pool"]
            if key in _sides and key in stats:
                _sides[key].rebase(snap, stats[key])
        _transitions_pushed.update(
            ((alias, state), count)
            for alias, counts in _registry.transitions().items()
            for state, count in counts.items()
        )
        from .failover import route as _failover

        _failovers.update(_failover.counts())
        _storage_pushed.update((a, s["errors"]) for a, s in _shared.snapshot().items())
        if _flusher_pid:
            _start_flusher()  # the parent's thread did not come along


def _flush_at_exit() -> None:
    if _flusher_pid == os.getpid():
        try:
            flush()
        except Exception:
            logger.debug("Writing the pool metrics at exit failed", exc_info=True)


_process.at_fork("metrics", _after_fork_in_child)
_process.at_exit("metrics", _flush_at_exit)
