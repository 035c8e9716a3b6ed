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
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pybreaker
from django.db import connections

from ..config import ENGINE
from ..core import process as _process
from ..core import registry as _registry
from ..errors import CircuitOpenError, DatabaseUnavailable, named

__all__ = ["chain", "counts", "forget", "healthy", "route", "through_chain"]

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
        logger.debug("The trial connection of %r failed: %s", alias, named(exc))
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


async def through_chain(alias: str, attempt: Callable[[str], Awaitable[T]]) -> T:
    """Return ``await attempt(a)`` for the first alias ``a`` of the chain that gives one."""
    errors: dict[str, BaseException] = {}
    why = "its circuit breaker is open"
    if healthy(alias):
        try:
            result = await attempt(alias)
        except FAIL_OVER_ON as exc:
            errors[alias] = exc
            why = f"it could not be reached ({named(exc)})"
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
