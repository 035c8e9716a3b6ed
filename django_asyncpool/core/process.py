"""This process's lifecycle: the ENGINE's wrappers, one hook at fork and one at exit.

Each part registers under its name (:func:`at_fork`, :func:`at_exit`); the two hooks
call the parts in the order written here, whatever order their modules were
imported in. In a forked child every part drops what is the parent's and closes
nothing: closing would write on sockets the parent still uses.

``FORK_ORDER``, in the child:

1. ``registry``: every pool of every kind, the configs, the guards and the breaker
   storage (:func:`.registry.forget`). First: the parts after it may build anew.
2. ``hangups``: a hang-up watcher of its own (the parent's thread did not come along).
3. ``wrappers``: the connections of the ENGINE's wrappers (here).
4. ``failover``: its lock and the trials whose threads stayed in the parent.
5. ``metrics``: its locks, its counters rebased on what the parent counted, its flusher.

``EXIT_ORDER``, at exit:

1. ``sync pools``: closed, so the server sees clean disconnects (:func:`.registry.close_pools`).
2. ``metrics``: the last values written (multiprocess mode): after the pools closed.
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref
from collections.abc import Callable
from typing import Any

__all__ = [
    "EXIT_ORDER",
    "FORK_ORDER",
    "at_exit",
    "at_fork",
    "registered",
    "transactions",
    "wrappers",
]

logger = logging.getLogger("django_asyncpool")

FORK_ORDER = ("registry", "hangups", "wrappers", "failover", "watchdog", "metrics")
EXIT_ORDER = ("sync pools", "metrics")

_at_fork: dict[str, Callable[[], object]] = {}
_at_exit: dict[str, Callable[[], object]] = {}

#: Every DatabaseWrapper of this process (Django's are thread-local: not all reachable
#: otherwise).
wrappers: weakref.WeakSet[Any] = weakref.WeakSet()
#: The wrappers with autocommit off (in a transaction): the native async ORM looks for a
#: blocked async_to_sync caller's transaction only while this is not empty.
transactions: weakref.WeakSet[Any] = weakref.WeakSet()
#: Connections inherited from a parent process: kept referenced, never closed, so that
#: neither ``close()`` nor garbage collection touches their sockets.
_inherited: list[Any] = []


def at_fork(part: str, hook: Callable[[], object]) -> None:
    """Have ``hook`` run in a forked child, in the place of ``part`` in ``FORK_ORDER``."""
    if part not in FORK_ORDER:
        raise ValueError(f"{part!r} is not one of FORK_ORDER {FORK_ORDER}")
    _at_fork[part] = hook


def at_exit(part: str, hook: Callable[[], object]) -> None:
    """Have ``hook`` run at exit, in the place of ``part`` in ``EXIT_ORDER``."""
    if part not in EXIT_ORDER:
        raise ValueError(f"{part!r} is not one of EXIT_ORDER {EXIT_ORDER}")
    _at_exit[part] = hook


def registered(when: str) -> dict[str, Callable[[], object]]:
    """Return ``{part: hook}`` registered for ``when`` ("fork" or "exit")."""
    return dict(_at_fork if when == "fork" else _at_exit)


def _run(order: tuple[str, ...], hooks: dict[str, Callable[[], object]], when: str) -> None:
    for part in order:
        hook = hooks.get(part)
        if hook is None:
            continue
        try:
            hook()
        except Exception:  # one part failing must not leave the next ones undone
            logger.exception("django-asyncpool: the %s hook of %r failed", when, part)


def _forget_inherited() -> None:
    """In a forked child: drop the parent's connections without closing them."""
    for wrapper in list(wrappers):
        if wrapper.connection is not None:
            _inherited.append(wrapper.connection)
            wrapper.connection = None


def _after_fork_in_child() -> None:
    _run(FORK_ORDER, _at_fork, "fork")


def _at_process_exit() -> None:
    _run(EXIT_ORDER, _at_exit, "exit")


at_fork("wrappers", _forget_inherited)
os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_process_exit)
