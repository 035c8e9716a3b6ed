"""Per-process state shared by both pools: each alias's configuration and guard."""

from __future__ import annotations

import logging
import threading
from typing import Any

from . import _shared
from . import config as _config
from ._guard import Guard

logger = logging.getLogger("django_asyncpool")

_lock = threading.Lock()
_guards: dict[str, Guard] = {}
_reported: set[tuple[str, str]] = set()


def settings_dict(alias: str) -> dict[str, Any]:
    """Return the live settings of ``alias`` (the test runner rewrites NAME there)."""
    from django.db import connections

    _config.load(alias)  # raises a clear error for an alias that is not ours
    return connections[alias].settings_dict


def config_for_wrapper(wrapper: Any) -> _config.AliasConfig:
    """Return the configuration of a DatabaseWrapper, reporting its problems once."""
    config = _config.from_settings(wrapper.alias, wrapper.settings_dict)
    for problem in config.problems:
        if (config.alias, problem.message) not in _reported:
            _reported.add((config.alias, problem.message))
            logger.warning(
                "%s: database %r: %s %s", problem.id, config.alias, problem.message, problem.hint
            )
    return config


def config(alias: str) -> _config.AliasConfig:
    """Return the configuration of ``alias`` as its connection sees it now."""
    from django.db import connections

    settings_dict(alias)
    return config_for_wrapper(connections[alias])


def guard(alias: str, wrapper: Any = None) -> Guard:
    """Return the breaker and retry policy of ``alias`` (one per process)."""
    try:
        return _guards[alias]
    except KeyError:
        pass
    with _lock:
        if alias not in _guards:
            conf = config_for_wrapper(wrapper) if wrapper is not None else config(alias)
            _guards[alias] = Guard(conf)
            from .metrics import watch

            watch(_guards[alias])  # counts its breaker's transitions
        return _guards[alias]


def discard(alias: str) -> None:
    """Forget the guard of ``alias`` (its settings changed, or it is gone)."""
    _guards.pop(alias, None)
    _shared.close(alias)


def forget() -> None:
    """Drop all per-process state (after a fork, or when tests change settings)."""
    global _lock
    _lock = threading.Lock()  # may have been held by another thread at fork time
    _guards.clear()
    _shared.forget()
