"""ENGINE ``django_asyncpool``: Django's PostgreSQL backend with a resilient pool.

Only what differs from ``django.db.backends.postgresql`` is overridden:

* ``pool`` builds a :class:`~django_asyncpool._syncpool.SyncPool` from the
  alias's configuration (pooling is on by default), one per alias per process;
* ``get_new_connection`` goes through the alias's breaker and retry policy;
* ``get_connection_params`` drops django-asyncpool's OPTIONS keys;
* after a fork, the child forgets (never closes) the parent's pools and
  connections, so it never writes on the parent's sockets.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import weakref
from typing import Any

import psycopg_pool
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.postgresql import base as postgresql
from django.db.utils import DatabaseErrorWrapper
from django.utils.functional import cached_property
from psycopg import IsolationLevel

from . import _registry, _stats, metrics
from ._guard import Guard
from ._syncpool import SyncPool
from .config import (
    DJANGO_OPTIONS,
    OUR_KEYS,
    InvalidURL,
    _libpq_keys,
    connection_fields,
    pgbouncer_on,
    refuse_unusable,
)
from .creation import DatabaseCreation
from .errors import PoolError, SyncPoolClosed, SyncPoolTimeout, pool_timeout
from .features import DatabaseFeatures

logger = logging.getLogger("django_asyncpool")

#: Pools and connections inherited from a parent process: kept referenced, never
#: closed, so that neither ``close()`` nor garbage collection touches their sockets.
_inherited: list[Any] = []
#: Every wrapper of this process (Django's are thread-local: not all reachable otherwise).
_wrappers: weakref.WeakSet[DatabaseWrapper] = weakref.WeakSet()
#: The wrappers with autocommit off (in a transaction): the native async ORM looks for a
#: blocked async_to_sync caller's transaction only while this is not empty (_asyncorm).
_transactions: weakref.WeakSet[DatabaseWrapper] = weakref.WeakSet()


class DatabaseWrapper(postgresql.DatabaseWrapper):
    """Django's PostgreSQL wrapper, with the pool behind a breaker and retries."""

    creation_class = DatabaseCreation
    features_class = DatabaseFeatures

    # Our own class-level dict: the stock backend's pools are not ours to manage.
    _connection_pools = _registry.sync_pools

    def __init__(self, settings_dict: dict[str, Any], alias: str = "default") -> None:
        # DATABASE_URL fills the connection fields when the alias gives none. One that
        # cannot be used is a system check (dbpool.E006) and refused on connecting.
        with contextlib.suppress(InvalidURL):
            settings_dict.update(connection_fields(settings_dict, os.environ))
        if pgbouncer_on(settings_dict.get("OPTIONS") or {}):
            # QuerySet.iterator()'s WITH HOLD cursors outlive the transaction, and so
            # PgBouncer's transaction pooling; an explicit False is refused (E020).
            settings_dict.setdefault("DISABLE_SERVER_SIDE_CURSORS", True)
        super().__init__(settings_dict, alias)
        self._options_reported = False
        _wrappers.add(self)
        if (settings_dict.get("OPTIONS") or {}).get("async_orm") is True:
            from ._asyncorm import install

            install()  # Django's async QuerySet methods, native for this alias (once)

    @property
    def pool(self) -> SyncPool | None:
        # Read several times per request: the common case first, in few steps.
        options = self.settings_dict.get("OPTIONS") or {}
        # This wrapper's own settings first, as in Django: a copy made with the pool
        # off (Django's tests do it) must not take connections from the alias's pool.
        enabled = options.get("pool", True)
        if enabled is False or enabled is None or self.alias == NO_DB_ALIAS:
            return None
        pool = self._connection_pools.get(self.alias)
        if pool is not None:
            return pool
        if options.get("pool") and self.settings_dict.get("CONN_MAX_AGE"):
            # Refused as Django's own backend refuses it; when the pool is on only by
            # our default, the system check dbpool.E007 reports it instead.
            raise ImproperlyConfigured("Pooling doesn't support persistent connections.")
        config = _registry.config_for_wrapper(self)
        if config.sync_pool is None:
            return None
        metrics.install()  # also when the app is not in INSTALLED_APPS (the ENGINE alone)
        connect_kwargs = self.get_connection_params()
        # Ensure we run in autocommit, Django properly sets it later on.
        connect_kwargs["autocommit"] = True
        # Every checkout is checked with OPTIONS["pool"]["check"] (Django >= 6.1), or
        # pinged with CONN_HEALTH_CHECKS, as with Django's own backend.
        check = SyncPool.check_connection if self.settings_dict.get("CONN_HEALTH_CHECKS") else None
        if isinstance(options.get("pool"), dict) and "check" in options["pool"]:
            check = options["pool"]["check"]
        pool = SyncPool(
            kwargs=connect_kwargs,
            open=False,  # opened by the first getconn, never at import or startup
            configure=self._configure_connection,  # type: ignore[attr-defined]
            check=check,
            name=f"django_asyncpool:{self.alias}",
            bypass=config.liveness_bypass,
            leak_threshold=config.leak_threshold,
            **config.sync_pool,
        )
        # Several threads may build one at once; the first to store it wins.
        return self._connection_pools.setdefault(self.alias, pool)

    def get_connection_params(self) -> dict[str, Any]:
        if not self._options_reported:
            # Parsing the whole configuration costs ~30 us: not on every checkout.
            config = _registry.config_for_wrapper(self)  # reports unknown or invalid keys
            # Before any connection is made, and before Django's complaint about a
            # missing NAME, which an unusable DATABASE_URL would leave.
            refuse_unusable(config)
            self._options_reported = True
        params: dict[str, Any] = super().get_connection_params()
        passed = _passed_keys()
        if not params.keys() <= passed:
            for key in params.keys() - passed:
                params.pop(key)  # ours, and unknown keys (reported), never reach psycopg
        return params

    @cached_property
    def _sync_stats(self) -> _stats.Stats:
        return _registry.stats(self.alias, "sync")  # one per alias for the life of the process

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        guard = _registry.guard(self.alias, self)
        return _stats.acquire_sync(
            self._sync_stats, guard, self._get_new_connection, guard, conn_params
        )

    def _get_new_connection(self, guard: Guard, conn_params: dict[str, Any]) -> Any:
        """Return Django's new (pooled) connection, with the pool's errors made ours."""
        try:
            pool = self.pool
            if pool is None or "isolation_level" in self.settings_dict["OPTIONS"]:
                # Undecorated: connect() has checked for an event loop already.
                return _parent_get_new_connection(self, conn_params)
            # Django's get_new_connection() for the common case: a pool, the
            # isolation level the server's default (SyncPool.getconn opens the pool).
            self.isolation_level = IsolationLevel.READ_COMMITTED
            return pool.getconn()
        except psycopg_pool.PoolTimeout as exc:
            pool = self.pool
            raise pool_timeout(
                SyncPoolTimeout,
                guard.config.describe(),
                self.alias,
                pool.timeout if pool else 0.0,
                pool.describe_state() if pool else "no pool",
                "OPTIONS['pool']['max_size'] or ['timeout']",
            ) from exc
        except psycopg_pool.PoolClosed as exc:
            raise SyncPoolClosed(
                f"The pool of database {guard.config.describe()} is closed.", alias=self.alias
            ) from exc

    @cached_property
    def wrap_database_errors(self) -> DatabaseErrorWrapper:
        return _ErrorWrapper(self)

    def _set_autocommit(self, autocommit: bool) -> None:
        # connect() sets it on every checkout; psycopg takes a lock and runs a
        # generator even when the value does not change.
        if self.connection.autocommit != autocommit:
            super()._set_autocommit(autocommit)  # type: ignore[misc]
        if autocommit:
            _transactions.discard(self)
        else:
            _transactions.add(self)

    def _close(self) -> None:
        conn = self.connection
        if conn is None:
            return
        _stats.returned_sync(self._sync_stats, conn)
        if self.pool is None:
            super()._close()  # type: ignore[misc]  # closed for good
            return
        # Django's _close() for a pooled connection.
        with self.wrap_database_errors:
            # Its own pool, as in Django: settings changes in tests replace pools.
            conn._pool.putconn(conn)
        self.connection = None


class _ErrorWrapper(DatabaseErrorWrapper):
    """Django's error wrapper, letting django-asyncpool's own errors through.

    They are Django OperationalErrors already, with what to do; the sync pool's
    SyncPoolTimeout and SyncPoolClosed, also psycopg errors, would be replaced by a
    bare OperationalError.
    """

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        # Around every cursor call: the no-error case returns at once.
        if exc_type is None or issubclass(exc_type, PoolError):
            return
        super().__exit__(exc_type, exc_value, traceback)


#: Django's get_new_connection() without its event-loop check (connect() makes it).
_parent_get_new_connection = getattr(
    postgresql.DatabaseWrapper.get_new_connection,
    "__wrapped__",
    postgresql.DatabaseWrapper.get_new_connection,
)

#: Keys Django's get_connection_params() adds itself (not user OPTIONS).
_DRIVER_KEYS = frozenset(
    {
        "dbname",
        "user",
        "password",
        "host",
        "port",
        "client_encoding",
        "cursor_factory",
        "context",
        "prepare_threshold",
        "service",
        "passfile",
    }
)


@functools.cache
def _passed_keys() -> frozenset[str]:
    """Return the connection parameters that go to psycopg: libpq's and Django's own."""
    return (_libpq_keys() - OUR_KEYS - DJANGO_OPTIONS) | _DRIVER_KEYS


def close_pools() -> None:
    """Close this process's sync pools (at exit: the server sees clean disconnects)."""
    for alias in list(_registry.sync_pools):
        _registry.reset(alias)


def _forget_inherited() -> None:
    """In a forked child: drop the parent's connections without closing them.

    The registry forgets the parent's pools (it runs first: it was imported first).
    """
    for wrapper in list(_wrappers):
        if wrapper.connection is not None:
            _inherited.append(wrapper.connection)
            wrapper.connection = None


os.register_at_fork(after_in_child=_forget_inherited)
atexit.register(close_pools)
