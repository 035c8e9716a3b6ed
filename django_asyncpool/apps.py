"""The app: system checks, metrics, the optional warm-up, and how pools are closed.

Nothing here opens a connection unless an alias asks for it with
``OPTIONS["warmup"]``. Connections go back to their pool at the end of each
request through Django's own ``request_finished`` handler (``close_old_connections``
returns a pooled connection instead of closing it); async sessions go back when
their scope ends. Sync pools are closed at process exit (``core.registry.close_pools``),
each event loop's async engines when that loop shuts down, and both on ASGI
lifespan shutdown with :func:`django_asyncpool.asgi.get_asgi_application`.
"""

from __future__ import annotations

import logging
import sys
import time

from django.apps import AppConfig

from . import config as _config
from .core import registry as _registry
from .core import sqlstate as _sqlstate
from .errors import ConfigurationFault, unreachable

logger = logging.getLogger("django_asyncpool")


class DjangoAsyncpoolConfig(AppConfig):
    """The django-asyncpool app: system checks, metrics and shutdown wiring."""

    name = "django_asyncpool"
    verbose_name = "django-asyncpool"

    def ready(self) -> None:
        from . import (
            _exporter,
            checks,  # noqa: F401  (registers the system checks)
            metrics,
        )

        metrics.setup()  # registers the pool metrics (once)
        _exporter.start_from_settings()  # METRICS_ENABLED: /metrics on METRICS_PORT
        # Not logged here: the system checks, when they run, show the problems next.
        configs = [_registry.config(alias, report=False) for alias in _registry.aliases()]
        if any(conf.async_orm for conf in configs):
            from .orm.native import install

            install()  # Django's async QuerySet methods, native for those aliases
        if _command() in NO_WARMUP_COMMANDS:
            return  # they report an unreachable database instead of dying of it
        for conf in configs:
            if conf.warmup is not None:
                warm_up(conf)


#: manage.py commands that diagnose the database: no warm-up, which would stop them.
NO_WARMUP_COMMANDS = frozenset({"check", "dbpool_check"})


def _command() -> str:
    """Return the name of the manage.py command this process runs, or ""."""
    return sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else ""


def warm_up(conf: _config.AliasConfig) -> None:
    """Open the sync pool of ``conf.alias`` now, or raise within ``conf.warmup`` seconds.

    The async side is warmed on the server's event loop, at ASGI lifespan startup
    (:mod:`django_asyncpool.asgi`): an engine made here would die with this loop.
    """
    from django.db import connections

    from .base import DatabaseWrapper

    timeout = conf.warmup or _config.WARMUP_DEFAULT
    wrapper = connections[conf.alias]
    assert isinstance(wrapper, DatabaseWrapper)
    pool = wrapper.pool
    if pool is None:  # OPTIONS["pool"] = False: one connection proves the server is there
        try:
            wrapper.ensure_connection()
        except ConfigurationFault:
            raise  # the server's own words: not "could not be reached"
        except Exception as exc:
            raise unreachable(conf, timeout, exc) from exc
        wrapper.close()
        return
    pool.open(wait=False)
    deadline = time.monotonic() + timeout
    # Polled (psycopg_pool's wait() would close the pool at its timeout): a configuration
    # fault (a wrong password, an unknown database) stops the warm-up at once, in the
    # server's words, as a retry cannot fix it.
    while pool.get_stats().get("pool_available", 0) < pool.min_size:
        failed = pool.last_connect_error
        fault = isinstance(failed, Exception) and (
            _sqlstate.classify(failed, connecting=True) == _sqlstate.CONFIG
        )
        if fault or time.monotonic() >= deadline:
            DatabaseWrapper._connection_pools.pop(conf.alias, None)
            pool.close(timeout=0)
            if isinstance(failed, Exception) and fault:
                raise _registry.guard(conf.alias).fault(failed) from failed
            error = failed or TimeoutError(f"no connection within {timeout:g}s")
            raise unreachable(conf, timeout, error) from failed
        time.sleep(0.02)
    logger.info("Database %s: pool opened at startup (warm-up).", conf.describe())
