"""Each alias's live state in this process, in one place, and the one way to its config.

Per alias: its configuration, its guard (the breaker and retries both pools share),
its statistics (kept for the life of the process: counters only go up), its sync
pool and its async pool::

    aliases()            the aliases of settings.DATABASES whose ENGINE is ours
    config(alias)        its AliasConfig, read again only when its settings change; its
                         problems logged once unless the system checks showed them
    guard(alias)         its Guard
    stats(alias, side)   its Stats: "sync", "async" or "async_orm"
    snapshots(alias)     every pool's snapshot, one shape (what everything renders)
    budget(alias)        the connections it may open in this process: sync + loops x async
    sync_pools           {alias: SyncPool}; DatabaseWrapper._connection_pools is this dict
    async_pools          {alias: ConnectionPool}; ConnectionPool(alias) is found here
    register_kind(...)   a kind of pool says how to snapshot, reset, forget and drain its pools
    drain(alias)         replace every connection of the alias in this process, every kind
    reset(alias=None)    settings changed: pools closed, guard and config dropped
    close_pools()        at exit: every alias with a sync pool reset (its pool closed)
    forget()             in a forked child: drop everything, close nothing
    with_url(alias, d)   the settings a wrapper uses: d, or a copy filled from DATABASE_URL
    on_wrapper           hooks called with each DatabaseWrapper built (the native async ORM)

``setting_changed`` for ``DATABASES`` resets every alias, so ``override_settings``
reaches the guard and the pools. A forked child forgets everything: the parent's
pools are kept referenced, never closed, since closing would write on sockets the
parent still uses.

This module imports no pool: each kind of pool (``sync``, ``async``, ``async_orm``)
registers itself with :func:`register_kind` when its module is imported, so that
:func:`snapshots`, :func:`reset` and :func:`forget` reach every pool of every kind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from django.core.signals import setting_changed

from .. import config as _config
from ..errors import redact
from . import breaker_redis as _shared
from . import process as _process
from . import waiters as _waiters
from .guard import Guard
from .stats import Stats, snapshot

__all__ = [
    "aliases",
    "all_stats",
    "async_pools",
    "budget",
    "close_pools",
    "config",
    "config_for_wrapper",
    "drain",
    "forget",
    "guard",
    "guards",
    "kinds",
    "mark_reported",
    "on_reset",
    "on_wrapper",
    "register_kind",
    "reset",
    "snapshots",
    "stats",
    "sync_pools",
    "transitions",
    "with_url",
]

logger = logging.getLogger("django_asyncpool")

_lock = threading.Lock()
#: alias -> (what its config was read from, the config)
_configs: dict[str, tuple[str, _config.AliasConfig]] = {}
_guards: dict[str, Guard] = {}
#: alias -> how many times its breaker entered each state, across its guards
_entered: dict[str, Counter[str]] = {}
_counters: dict[tuple[str, str], Stats] = {}
#: {alias: SyncPool}: DatabaseWrapper._connection_pools is this dict.
sync_pools: dict[str, Any] = {}
#: {alias: ConnectionPool}: ConnectionPool(alias) is found here.
async_pools: dict[str, Any] = {}
_reported: set[tuple[str, str]] = set()
#: Called with an alias when it is reset: the modules keeping state of their own per
#: alias (``failover.route``) register here rather than be imported by this one.
on_reset: list[Callable[[str], None]] = []
#: Called with each DatabaseWrapper as it is built: the native async ORM registers
#: here (``__init__``), so that the ENGINE never imports it (it imports the ENGINE).
on_wrapper: list[Callable[[Any], None]] = []
#: alias -> (the settings dict, DATABASE_URL, that dict as it was, the fields the URL gave)
_urls: dict[str, tuple[Any, str, dict[str, Any], dict[str, Any]]] = {}
#: Pools inherited from a parent process: kept referenced, never closed.
_inherited: list[Any] = []


class Kind(NamedTuple):
    """What the registry asks of one kind of pool (registered by its module)."""

    #: Return the snapshot (``stats.SNAPSHOT_KEYS``) of each alias's pool of this kind.
    snapshots: Callable[[], list[dict[str, Any]]]
    #: Close or drop the pools of an alias whose settings changed.
    reset: Callable[[str], None]
    #: In a forked child: drop every pool, close nothing; what it returns is kept referenced.
    forget: Callable[[], object]
    #: Replace every connection of an alias's pools of this kind (the idle ones now, the
    #: others when they come back); return how many pools (one per event loop) it reached.
    drain: Callable[[str], int]


#: side ("sync", "async", "async_orm") -> its Kind, as each pool module registered it.
_kinds: dict[str, Kind] = {}

#: The environment variables a configuration is read from, besides DATABASES.
_ENV = ("DATABASE_URL", *_config.ENV_ASYNC)


def aliases() -> list[str]:
    """Return the aliases of ``settings.DATABASES`` whose ENGINE is django-asyncpool's."""
    from django.conf import settings

    return [a for a, d in settings.DATABASES.items() if d.get("ENGINE") == _config.ENGINE]


def _read(alias: str, settings_dict: Any, *, report: bool = True) -> _config.AliasConfig:
    # Read again only when the settings or the environment changed: the test runner
    # renames NAME in place, tests monkeypatch the environment.
    source = repr((settings_dict, [os.environ.get(var) for var in _ENV]))
    cached = _configs.get(alias)
    if cached is not None and cached[0] == source:
        conf = cached[1]
    else:
        conf = _config.from_settings(alias, settings_dict)
        _configs[alias] = (source, conf)
    if report and conf.problems:
        _log_problems(conf)
    return conf


def _log_problems(conf: _config.AliasConfig) -> None:
    """Log the problems of ``conf`` that neither a log line nor a system check reported."""
    from django.conf import settings

    debug = bool(settings.DEBUG)
    for problem in conf.problems:
        if (problem.alias, problem.message) not in _reported:
            _reported.add((problem.alias, problem.message))
            logger.warning(
                "%s: database %r: %s %s%s",
                problem.id.replace(".E", ".W") if debug else problem.id,  # as the check
                problem.alias,
                redact(problem.message, conf.password),
                redact(problem.hint, conf.password),
                " (DEBUG is on; this is an error in production)" if debug else "",
            )


def mark_reported(problems: Iterable[_config.Problem]) -> None:
    """Record ``problems`` as reported (by the system checks): no log line repeats them."""
    _reported.update((problem.alias, problem.message) for problem in problems)


def config_for_wrapper(wrapper: Any) -> _config.AliasConfig:
    """Return the configuration of a DatabaseWrapper, as its own settings say."""
    return _read(wrapper.alias, wrapper.settings_dict)


def config(alias: str, *, report: bool = True) -> _config.AliasConfig:
    """Return the configuration of ``alias`` as ``settings.DATABASES`` says now.

    Raises ImproperlyConfigured, saying which aliases are ours, for any other. Read
    from the setting rather than the connection, which ``override_settings`` does not
    change: the guard and pools made inside an override follow it. ``report``: log
    the problems found, once (at startup the system checks come next and show them).
    """
    from django.conf import settings

    settings_dict = settings.DATABASES.get(alias)
    if settings_dict is None or settings_dict.get("ENGINE") != _config.ENGINE:
        return _config.load(alias)  # raises: a clear error for an alias that is not ours
    with contextlib.suppress(_config.InvalidURL):  # reported by the config (E006)
        # As the wrapper sees it: DATABASE_URL still applies once the test runner has
        # set NAME on the user's dict.
        settings_dict = with_url(alias, settings_dict)
    return _read(alias, settings_dict, report=report)


def guard(alias: str, wrapper: Any = None) -> Guard:
    """Return the breaker and retry policy of ``alias`` (one per process)."""
    try:
        return _guards[alias]
    except KeyError:
        pass
    conf = config_for_wrapper(wrapper) if wrapper is not None else config(alias)
    with _lock:
        if alias not in _guards:
            _guards[alias] = Guard(conf, _entered.setdefault(alias, Counter()))
        return _guards[alias]


def guards() -> dict[str, Guard]:
    """Return ``{alias: guard}`` of the guards made in this process."""
    return dict(_guards)


def transitions() -> dict[str, dict[str, int]]:
    """Return ``{alias: {state: times entered}}`` for the life of the process."""
    return {alias: dict(counts) for alias, counts in list(_entered.items())}


def stats(alias: str, side: str) -> Stats:
    """Return the statistics of ``alias``'s ``side`` ("sync", "async" or "async_orm")."""
    try:
        return _counters[alias, side]
    except KeyError:
        pass
    with _lock:
        return _counters.setdefault((alias, side), Stats())


def all_stats() -> list[tuple[str, str, Stats]]:
    """Return ``(alias, side, stats)`` for every alias and side used in this process."""
    return [(alias, side, s) for (alias, side), s in list(_counters.items())]


def snapshots(alias: str | None = None) -> list[dict[str, Any]]:
    """Return the snapshot (``_stats.SNAPSHOT_KEYS``) of every pool of this process.

    One per alias and side that has statistics: a side whose pool is gone (closed,
    reset) still has its counters, with nothing open. ``alias`` keeps only its own.
    """
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for kind in list(_kinds.values()):
        for snap in kind.snapshots():
            found[snap["alias"], snap["pool"]] = snap
    for name, side, counters in all_stats():
        if (name, side) not in found:
            found[name, side] = snapshot(
                name, side, counters, _guards.get(name),
                idle=0, in_use=0, waiting=0, min_size=0, max_size=0,
            )  # fmt: skip
    return [snap for (name, _), snap in sorted(found.items()) if alias in (None, name)]


def register_kind(
    side: str,
    *,
    snapshots: Callable[[], list[dict[str, Any]]],
    reset: Callable[[str], None],
    forget: Callable[[], object],
    drain: Callable[[str], int],
) -> None:
    """Have :func:`snapshots`, :func:`reset`, :func:`forget` and :func:`drain` reach the
    pools of ``side``."""
    _kinds[side] = Kind(snapshots, reset, forget, drain)


def drain(alias: str, why: str = "drain() was called") -> dict[str, int]:
    """Replace every connection of ``alias`` in this process; return ``{side: pools reached}``.

    Every kind of pool: the sync pool, each event loop's SQLAlchemy engines and native
    ORM pool. Gracefully: the idle connections are closed now (a loop that is not
    running closes its own when it runs again), those in use when they come back, so
    no query is cut; new ones are opened in their place as needed. Counted in each
    side's ``drains``, and logged once.
    """
    conf = config(alias)
    reached = {side: kind.drain(alias) for side, kind in list(_kinds.items())}
    for side, pools in reached.items():
        if pools:
            stats(alias, side).drains += 1
    where = ", ".join(f"{side} {n}" for side, n in reached.items() if n) or "none open yet"
    logger.warning(
        "Database %s: replacing every connection (%s): idle ones now, those in use when "
        "they come back. Pools reached: %s.",
        conf.describe(),
        why,
        where,
    )
    return reached


def kinds() -> list[str]:
    """Return the kinds of pool registered in this process ("sync", "async", "async_orm")."""
    return list(_kinds)


def budget(alias: str, conf: _config.AliasConfig | None = None) -> dict[str, Any]:
    """Return how many connections ``alias`` may open in this process, and how many are open.

    ``per_process`` is the sync pool's ``max_size`` plus, for each event loop, the
    async cap (``pool_size + max_overflow``: every async kind together). A process
    with no event loop yet is counted as one: what a server worker runs.
    """
    conf = conf or config(alias)
    # No sync pool: Django's own connection per thread, which no budget bounds.
    sync = None if conf.sync_pool is None else int(conf.sync_pool["max_size"])
    options = conf.async_pool
    cap = options.pool_size + options.max_overflow
    loops = _waiters.budgets(alias)
    return {
        "alias": alias,
        "sync_max_size": sync,
        "async_cap": cap,
        "loops": len(loops),
        "per_process": (sync or 0) + max(len(loops), 1) * cap,
        "async_open": sum(b.opened for b in loops),
    }


def reset(alias: str | None = None) -> None:
    """Forget ``alias`` (every alias if None): its settings changed, or it is gone.

    Its sync pool is closed, its async pools dropped (each event loop's engines and
    native ORM pool close with their loop), its guard and config read again when next
    used. Its statistics stay: they are counters for the life of the process.
    """
    names = set(_configs) | set(_guards) | set(sync_pools) | set(async_pools)
    for name in [alias] if alias is not None else sorted(names):
        _configs.pop(name, None)
        if _guards.pop(name, None) is not None:
            _shared.close(name)
        for hook in on_reset:
            hook(name)
        for kind in list(_kinds.values()):
            kind.reset(name)


def close_pools() -> None:
    """Close this process's sync pools (at exit: the server sees clean disconnects)."""
    for alias in list(sync_pools):
        reset(alias)


def forget() -> None:
    """Drop all per-process state without closing anything (in a forked child)."""
    global _lock
    _lock = threading.Lock()  # may have been held by another thread at fork time
    _inherited.extend(kind.forget() for kind in list(_kinds.values()))
    _configs.clear()
    _guards.clear()
    _shared.forget()
    _waiters.forget()


def with_url(alias: str, settings_dict: dict[str, Any]) -> dict[str, Any]:
    """Return ``settings_dict``, or a copy filled from DATABASE_URL: the user's is not changed.

    Whether the URL applies is decided once per settings dict (and URL): the test
    runner later sets NAME on the user's dict, which must not turn the URL off for
    the wrappers other threads build from it. Keys changed since then win.
    Raise :class:`~django_asyncpool.config.InvalidURL` as ``connection_fields`` does.
    """
    url = os.environ.get("DATABASE_URL", "")
    seen = _urls.get(alias)
    if seen is None or seen[0] is not settings_dict or seen[1] != url:
        fields = _config.connection_fields(settings_dict, os.environ)
        seen = _urls[alias] = (settings_dict, url, dict(settings_dict), fields)
    _, _, before, fields = seen
    if not fields:
        return settings_dict
    changed = {k: v for k, v in settings_dict.items() if k not in before or before[k] != v}
    return {**settings_dict, **fields, **changed}


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == "DATABASES":
        reset()


def _drain_requested(alias: str, number: int) -> None:
    """Another process asked for drain ``number`` through the shared breaker storage."""
    drain(alias, f"drain #{number} asked through the shared breaker storage")


setting_changed.connect(_on_setting_changed, dispatch_uid="django_asyncpool.reset")
_shared.on_drain.append(_drain_requested)
_process.at_fork("registry", forget)
_process.at_exit("sync pools", close_pools)
