"""Read failover: reads meant for a replica go elsewhere while its breaker is open.

``OPTIONS["failover_to"] = ["replica2", "default"]`` on a replica alias gives it a
*chain*: the alias itself, the aliases it lists in their order, then the aliases
those list (breadth first), each once, so a cycle in the settings cannot loop. A
read of the alias goes to the first alias of its chain whose circuit breaker is
closed; a read that cannot get a connection there (``DatabaseUnavailable``, or
``CircuitOpenError`` as the breaker opens) tries the next one.

The rules, which docs/deployment.md states for users:

* **Only reads fail over.** Everything the async pool hands out for a replica alias
  is taken as a read (naming the replica says so): on another alias it is opened
  read-only, so a write meant for the replica is refused there, never carried out
  on the primary. The ORM fails over through ``db_for_read`` only
  (:mod:`django_asyncpool.routers`); ``db_for_write`` and ``using=`` are untouched.
* **Reads are never a breaker's trial.** When a read finds a breaker of its chain
  open and due for a trial (``reset_timeout`` elapsed), the read goes on to the
  next alias and one background thread makes the trial connection through the
  alias's sync side. When the trial succeeds the breaker closes and the next reads
  are the alias's own again; when it fails the breaker stays open for another
  ``reset_timeout``.
* Each read that goes elsewhere is counted (``db_pool_failovers_total``); a change
  of where an alias's reads go is logged once.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import pybreaker
from django.db import connections

from ..config import ENGINE, Problem, from_settings
from ..core import process as _process
from ..core import registry as _registry
from ..errors import CircuitOpenError, DatabaseUnavailable, ReadOnlyError
from ..sqla.readonly import ReadOnlyScope, ReadOnlySession, readonly_violation
from ..sqla.scopes import ConnectionLease, SessionScope

if TYPE_CHECKING:
    import asyncpg
    from sqlalchemy.ext.asyncio import AsyncSession

    from ..pool import ConnectionPool

__all__ = ["chain", "counts", "forget", "healthy", "problems", "route"]

logger = logging.getLogger("django_asyncpool")
T = TypeVar("T")

#: Errors at checkout after which a read tries the next alias of its chain.
FAIL_OVER_ON: tuple[type[BaseException], ...] = (CircuitOpenError, DatabaseUnavailable)

_lock = threading.Lock()
#: alias -> the alias its reads go to now, while they go elsewhere.
_away: dict[str, str] = {}
#: (alias, to) -> reads of ``alias`` served by ``to``, for the metrics.
_counts: dict[tuple[str, str], int] = {}
#: Aliases whose trial connection is being made in a background thread.
_trials: set[str] = set()
#: alias -> monotonic time before which its open breaker is not due a trial.
_quiet: dict[str, float] = {}


# -- the chain ----------------------------------------------------------------------------


def _ours(alias: str) -> bool:
    # connections.settings, not settings.DATABASES: a dict, where the lazy settings
    # object costs ~1 us per attribute on every ORM read.
    return bool(connections.settings.get(alias, {}).get("ENGINE") == ENGINE)


def chain(alias: str) -> tuple[str, ...]:
    """Return ``alias`` and the aliases its reads may fail over to, in the order tried.

    Breadth first through ``failover_to``, each alias once (a cycle ends there);
    aliases that are not of the ENGINE are left out (the system checks report them).
    """
    found = [alias]
    i = 0
    while i < len(found):
        for nxt in _registry.guard(found[i]).config.failover_to:
            if nxt not in found and _ours(nxt):
                found.append(nxt)
        i += 1
    return tuple(found)


def healthy(alias: str) -> bool:
    """Return True when ``alias``'s circuit breaker is closed."""
    return bool(_registry.guard(alias).breaker.current_state == pybreaker.STATE_CLOSED)


def _plan(alias: str) -> list[str]:
    """Return the aliases of ``alias``'s chain to try, healthy ones only, in order.

    Start the trial of every breaker of the chain that is due one. With none
    healthy, ``[alias]``: its own error is the one to raise.
    """
    found = []
    for member in chain(alias):
        guard = _registry.guard(member)
        state = guard.breaker.current_state
        if state == pybreaker.STATE_CLOSED:
            found.append(member)
        elif state == pybreaker.STATE_OPEN and time.monotonic() >= _quiet.get(member, 0.0):
            try:
                guard.check_open()  # the guard's own word on when a trial is due
            except CircuitOpenError as exc:
                # Not due: ask again when it says (building the error costs microseconds).
                _quiet[member] = time.monotonic() + exc.retry_after
                continue
            _start_trial(member)
    return found or [alias]


# -- recording ----------------------------------------------------------------------------


def _note(alias: str, target: str, why: str, *, open_breaker: bool = False) -> None:
    """Record that a read of ``alias`` went to ``target``: count it, log a change once.

    ``open_breaker``: it went because ``alias``'s breaker was not closed. If it has
    closed since (a trial succeeded meanwhile), the read is counted but the reads
    are not marked as away: they are back already.
    """
    if target == alias:
        if alias in _away:
            with _lock:
                was = _away.pop(alias, None)
            if was is not None:
                logger.warning("Reads of database %r are back on it (they went to %r).", alias, was)
        return
    with _lock:
        _counts[alias, target] = _counts.get((alias, target), 0) + 1
        was = _away.get(alias)
        if open_breaker and healthy(alias):
            return
        _away[alias] = target
    if was != target:
        logger.warning(
            "Reads of database %r fail over to %r: %s. Writes do not fail over.",
            alias,
            target,
            why,
        )


def counts() -> dict[tuple[str, str], int]:
    """Return ``{(alias, to): reads}``: the reads of each alias served by another one."""
    with _lock:
        return dict(_counts)


def _start_trial(alias: str) -> None:
    """Make the trial connection of ``alias``'s open breaker in a thread, one at a time."""
    with _lock:
        if alias in _trials:
            return
        _trials.add(alias)
    threading.Thread(
        target=_trial, args=(alias,), name=f"asyncpool-trial:{alias}", daemon=True
    ).start()


def _trial(alias: str) -> None:
    try:
        # This thread's own wrapper: the connection goes through the alias's guard,
        # which admits it as the trial, and then back to the sync pool.
        connection = connections[alias]
        try:
            connection.ensure_connection()
        finally:
            connection.close()
    except Exception as exc:  # the breaker has logged the failure and stays open
        logger.debug("The trial connection of %r failed: %s", alias, type(exc).__name__)
    finally:
        with _lock:
            _trials.discard(alias)


# -- the routes ---------------------------------------------------------------------------


def route(alias: str) -> str:
    """Return the alias a read meant for ``alias`` should use now (the ORM's route).

    ``alias`` itself while its breaker is closed, otherwise the first healthy alias of
    its chain; ``alias`` when none is (its own error is the right one to see).
    """
    if not _ours(alias):
        return alias
    guard = _registry.guard(alias)
    if not guard.config.failover_to:
        return alias
    if guard.breaker.current_state == pybreaker.STATE_CLOSED:
        if alias in _away:
            _note(alias, alias, "")
        return alias
    target = _plan(alias)[0]
    if target != alias:  # alias itself: every alias of the chain is down
        _note(alias, target, "its circuit breaker is open", open_breaker=True)
    return target


async def _through_chain(alias: str, attempt: Callable[[str], Awaitable[T]]) -> T:
    """Return ``await attempt(a)`` for the first alias ``a`` of the chain that gives one."""
    errors: dict[str, BaseException] = {}
    why = "its circuit breaker is open"
    if healthy(alias):
        try:
            result = await attempt(alias)
        except FAIL_OVER_ON as exc:
            errors[alias] = exc
            why = f"it could not be reached ({type(exc).__name__})"
        else:
            if alias in _away:
                _note(alias, alias, "")
            return result
    for target in _plan(alias):
        if target in errors:
            continue
        try:
            result = await attempt(target)
        except FAIL_OVER_ON as exc:
            errors[target] = exc
            continue
        _note(alias, target, why, open_breaker=alias not in errors)
        return result
    if alias not in errors:
        try:  # fails fast: the breaker is open
            return await attempt(alias)
        except FAIL_OVER_ON as exc:
            errors[alias] = exc
    error = errors[alias]
    others = [a for a in chain(alias) if a != alias]
    if not others:  # failover_to names no alias of the ENGINE
        raise error
    raise _all_down(error, others) from error


def _all_down(error: BaseException, others: list[str]) -> BaseException:
    """Return a copy of the first alias's ``error``, saying its failover aliases are down too."""
    named = ", ".join(repr(a) for a in others)
    copied = copy.copy(error)
    copied.args = (
        f"{error} Its failover aliases ({named}) could not serve the read either: every "
        "database of OPTIONS['failover_to'] is down or failing fast.",
    )
    return copied


# -- the async pool's scopes for an alias with failover_to -----------------------------------


class FailoverScope:
    """``session_scope()`` of an alias with ``failover_to``: checked out at entry.

    The connection is taken on entering, not at the first statement, so that an
    alias that cannot give one is passed over before the caller's code runs. On
    another alias the scope is read-only: a transaction scope keeps its transaction,
    begun READ ONLY.
    """

    __slots__ = ("_pool", "_readonly", "_scope", "_target")

    def __init__(self, pool: ConnectionPool, readonly: bool) -> None:
        self._pool = pool
        self._readonly = readonly
        self._target = pool.alias

    async def __aenter__(self) -> AsyncSession:
        async def enter(target: str) -> AsyncSession:
            pool = type(self._pool)(target)
            scope = ReadOnlyScope(pool) if self._readonly else SessionScope(pool)
            session = await scope.__aenter__()
            try:
                if isinstance(session, ReadOnlySession):
                    await session.checkout()
                else:
                    await session.connection(execution_options=_elsewhere(target, self._pool))
            except BaseException as exc:
                await scope.__aexit__(type(exc), exc, exc.__traceback__)
                raise
            self._scope, self._target = scope, target
            return session

        return await _through_chain(self._pool.alias, enter)

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        alias, target = self._pool.alias, self._target
        try:
            await self._scope.__aexit__(exc_type, exc, tb)
        except ReadOnlyError as err:
            if target == alias:
                raise
            raise _write_refused(alias, target) from err
        if target != alias and exc is not None and readonly_violation(exc):
            raise _write_refused(alias, target) from exc


def _elsewhere(target: str, pool: ConnectionPool) -> dict[str, Any] | None:
    """Return the execution options of a session of ``pool`` that landed on ``target``."""
    return None if target == pool.alias else {"postgresql_readonly": True}  # BEGIN READ ONLY


def _write_refused(alias: str, target: str) -> ReadOnlyError:
    return ReadOnlyError(
        f"session_scope(using={alias!r}) tried to write, but it had failed over to "
        f"{target!r}, where it is read-only: writes never fail over. Send writes to "
        "the primary's alias.",
        alias=alias,
    )


class FailoverLease:
    """``connection()`` of an alias with ``failover_to``: read-only on another alias."""

    __slots__ = ("_lease", "_pool")

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    async def __aenter__(self) -> asyncpg.Connection:
        async def enter(target: str) -> asyncpg.Connection:
            pool = type(self._pool)(target)
            # Another alias's read-only engine: its server refuses writes.
            engine = None if target == self._pool.alias else pool.for_loop().readonly
            lease = ConnectionLease(pool, engine)
            conn = await lease.__aenter__()
            self._lease = lease
            return conn

        return await _through_chain(self._pool.alias, enter)

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        await self._lease.__aexit__(exc_type, exc, tb)


async def get_connection(pool: ConnectionPool) -> AsyncSession:
    """Return ``pool.get_connection()``'s session, on the next alias while ``pool``'s is down."""

    async def enter(target: str) -> AsyncSession:
        other = type(pool)(target)
        return await other.open_session(other.for_loop().engine, _elsewhere(target, pool))

    return await _through_chain(pool.alias, enter)


# -- system checks ------------------------------------------------------------------------


def problems(
    databases: Mapping[str, Mapping[str, Any]],
    environ: Mapping[str, str],
    aliases: Iterable[str] | None = None,
) -> list[Problem]:
    """Return the problems of ``failover_to`` across aliases: unknown, foreign, a cycle."""
    ours = {a: d for a, d in databases.items() if d.get("ENGINE") == ENGINE}
    targets = {a: from_settings(a, d, environ).failover_to for a, d in ours.items()}
    wanted = set(ours) if aliases is None else set(aliases) & set(ours)
    found = []
    key = "OPTIONS['failover_to']"
    for alias in sorted(wanted):
        for target in targets[alias]:
            if target not in databases:
                found.append(
                    Problem(
                        id="dbpool.E041",
                        alias=alias,
                        key=key,
                        message=f"{key} names {target!r}, which is not in settings.DATABASES: "
                        "reads never fail over to it.",
                        hint=f"Use aliases of settings.DATABASES: {', '.join(sorted(ours))}.",
                    )
                )
            elif target not in ours:
                found.append(
                    Problem(
                        id="dbpool.E042",
                        alias=alias,
                        key=key,
                        message=f"{key} names {target!r}, whose ENGINE is "
                        f"{databases[target].get('ENGINE')!r}: reads fail over only to aliases "
                        f"of ENGINE {ENGINE!r} (their breaker says when they are healthy).",
                        hint=f"Remove {target!r} from {key}, or give it ENGINE {ENGINE!r}.",
                    )
                )
        loop = _cycle(alias, targets)
        if loop:
            found.append(
                Problem(
                    id="dbpool.E043",
                    alias=alias,
                    key=key,
                    message=f"{key} leads back to {alias!r}: {' -> '.join(loop)}. A read "
                    "would be sent round the loop while the aliases are down.",
                    hint="Let the chain end at the primary, which fails over to nothing.",
                )
            )
    return found


def _cycle(alias: str, targets: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Return a path from ``alias`` back to itself through ``failover_to``, or []."""
    path = [alias]
    seen: set[str] = set()

    def walk(node: str) -> bool:
        for nxt in targets.get(node, ()):
            if nxt == alias:
                path.append(nxt)
                return True
            if nxt in seen or nxt not in targets:
                continue
            seen.add(nxt)
            path.append(nxt)
            if walk(nxt):
                return True
            path.pop()
        return False

    return path if walk(alias) else []


def forget(alias: str) -> None:
    """Forget where ``alias`` was sent and its trial (its settings changed)."""
    with _lock:
        _away.pop(alias, None)
        _quiet.pop(alias, None)
        _trials.discard(alias)


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # may have been held by another thread at fork time
    _trials.clear()  # their threads stayed in the parent


_process.at_fork("failover", _after_fork_in_child)
_registry.on_reset.append(forget)
