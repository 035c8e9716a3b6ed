"""ENGINE ``django_asyncpool``: Django's PostgreSQL backend with a resilient pool.

Only what differs from ``django.db.backends.postgresql`` is overridden:

* ``__init__`` fills a copy of the settings from DATABASE_URL (not the user's dict),
  and with DEBUG on makes CONN_MAX_AGE 0 while pooling (the check warns, dbpool.W007);
* ``pool`` is the alias's :class:`~django_asyncpool.sync.pool.SyncPool`, one per
  process, built by ``SyncPool.for_wrapper`` (pooling is on by default);
* ``get_new_connection`` goes through the alias's breaker and retry policy, counted;
* ``get_connection_params`` drops django-asyncpool's OPTIONS keys;
* ``wrap_database_errors`` lets django-asyncpool's own errors through.
"""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg
import psycopg_pool
from django.db import OperationalError
from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.postgresql import base as postgresql
from django.db.utils import DatabaseErrorWrapper
from django.utils.functional import cached_property
from psycopg import IsolationLevel

from . import metrics
from .config import AliasConfig, InvalidURL, pgbouncer_on, psycopg_params, refuse_unusable
from .core import checkout as _checkout
from .core import process as _process
from .core import registry as _registry
from .core import sqlstate as _sqlstate
from .core import stats as _stats
from .core.guard import Guard
from .core.renewal import password, rejected
from .creation import DatabaseCreation
from .errors import PoolError
from .features import DatabaseFeatures
from .sync import pool as _syncpool
from .sync.pool import SyncPool


class DatabaseWrapper(postgresql.DatabaseWrapper):
    """Django's PostgreSQL wrapper, with the pool behind a breaker and retries."""

    creation_class = DatabaseCreation
    features_class = DatabaseFeatures

    isolation_level: IsolationLevel  # set by Django's get_new_connection()
    # Our own class-level dict: the stock backend's pools are not ours to manage.
    _connection_pools: dict[str, SyncPool] = _registry.sync_pools

    def __init__(self, settings_dict: dict[str, Any], alias: str = "default") -> None:
        # DATABASE_URL fills the connection fields when the alias gives none. One that
        # cannot be used is a system check (dbpool.E006) and refused on connecting.
        with contextlib.suppress(InvalidURL):
            settings_dict = _registry.with_url(alias, settings_dict)
        if pgbouncer_on(settings_dict.get("OPTIONS") or {}):
            # QuerySet.iterator()'s WITH HOLD cursors outlive the transaction, and so
            # PgBouncer's transaction pooling; an explicit False is refused (E020).
            settings_dict = {"DISABLE_SERVER_SIDE_CURSORS": True, **settings_dict}
        settings_dict = _syncpool.without_conn_max_age(settings_dict)
        super().__init__(settings_dict, alias)
        self._options_reported = False
        _process.wrappers.add(self)
        for hook in _registry.on_wrapper:
            hook(self)  # the native async ORM installs itself (OPTIONS["async_orm"])

    @property
    def pool(self) -> SyncPool | None:
        # Read several times per request: the common case first, in few steps.
        # This wrapper's own settings first, as in Django: a copy made with the pool
        # off (Django's tests do it) must not take connections from the alias's pool.
        enabled = (self.settings_dict.get("OPTIONS") or {}).get("pool", True)
        if enabled is False or enabled is None or self.alias == NO_DB_ALIAS:
            return None
        pool = self._connection_pools.get(self.alias)
        if pool is not None:
            return pool
        pool = SyncPool.for_wrapper(self, _registry.config_for_wrapper(self))
        if pool is None:
            return None
        metrics.install()  # also when the app is not in INSTALLED_APPS (the ENGINE alone)
        # Several threads may build one at once; the first to store it wins.
        return self._connection_pools.setdefault(self.alias, pool)

    def get_connection_params(self) -> dict[str, Any]:
        if not self._options_reported:
            # Parsing the whole configuration is not for every checkout.
            config = _registry.config_for_wrapper(self)  # reports unknown or invalid keys
            # Before any connection is made, and before Django's complaint about a
            # missing NAME, which an unusable DATABASE_URL would leave.
            refuse_unusable(config)
            self._options_reported = True
        params = psycopg_params(super().get_connection_params())
        if "password" in self.settings_dict["OPTIONS"]:
            # A password source (dbpool.E009 refused anything else): asked at each
            # connect by whoever opens one (the pools, _get_new_connection), never here.
            params.pop("password", None)
        return params

    @cached_property
    def _sync_stats(self) -> _stats.Stats:
        return _registry.stats(self.alias, "sync")  # one per alias for the life of the process

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        guard = _registry.guard(self.alias, self)
        return _checkout.checkout(
            self._sync_stats, guard, self._get_new_connection, guard, conn_params
        )

    def _get_new_connection(self, guard: Guard, conn_params: dict[str, Any]) -> Any:
        """Return Django's new (pooled) connection, the pool's errors made ours."""
        try:
            pool = self.pool
            if pool is None or "isolation_level" in self.settings_dict["OPTIONS"]:
                return self._connect_unpooled(guard.config, conn_params)
            # HOT PATH, Django 5.2's get_new_connection() for a pool and the server's
            # isolation level, without its second event-loop check and its pool.open()
            # (a lock; SyncPool.getconn opens the pool). With the skip in _set_autocommit
            # it keeps the ENGINE close to Django's pooled backend (benchmarks/bench_sync.py
            # --only orm; docs/performance.md has the figures).
            self.isolation_level = IsolationLevel.READ_COMMITTED
            return pool.getconn()
        except (
            psycopg_pool.PoolTimeout,
            psycopg_pool.PoolClosed,
            psycopg_pool.TooManyRequests,
        ) as exc:
            raise _syncpool.error(exc, self.pool, guard.config) from exc

    def _connect_unpooled(self, config: AliasConfig, conn_params: dict[str, Any]) -> Any:
        """Return Django's own new connection, with a password from OPTIONS["password"]."""
        if config.password_source is None:
            return super().get_new_connection(conn_params)
        try:
            return super().get_new_connection({**conn_params, "password": password(config)})
        except psycopg.OperationalError as exc:
            if not rejected(exc):
                raise
        # The password expired between asking and connecting: asked once more.
        return super().get_new_connection({**conn_params, "password": password(config)})

    @cached_property
    def wrap_database_errors(self) -> DatabaseErrorWrapper:
        return _ErrorWrapper(self)

    def _set_autocommit(self, autocommit: bool) -> None:
        # HOT PATH: connect() sets it on every checkout; psycopg takes a lock and runs a
        # generator even when the value does not change (see _get_new_connection).
        if self.connection.autocommit != autocommit:
            super()._set_autocommit(autocommit)  # type: ignore[misc]
        if autocommit:
            _process.transactions.discard(self)
        else:
            _process.transactions.add(self)

    def demoted(self) -> None:
        """The server refused a write as read-only (25006): replace the pool's connections.

        psycopg_pool's ``drain()`` closes the idle ones now and the others, this one
        included, when they come back; new ones are opened in their place.
        """
        pool = self._connection_pools.get(self.alias) if self.pool is not None else None
        if pool is not None and _registry.guard(self.alias, self).demoted("sync", self._sync_stats):
            pool.drain()

    def _close(self) -> None:
        if self.connection is not None:
            _checkout.checkin(self._sync_stats, self.connection)
        super()._close()  # type: ignore[misc]


class _ErrorWrapper(DatabaseErrorWrapper):
    """Django's error wrapper, letting django-asyncpool's own errors through.

    They are Django OperationalErrors already, with what to do; the sync pool's
    SyncPoolTimeout and SyncPoolClosed, also psycopg errors, would be replaced by a
    bare OperationalError. A write refused as read-only (25006) replaces the pool's
    connections first (:meth:`DatabaseWrapper.demoted`) and is an OperationalError,
    as on the async side: a demoted primary is an outage, not the caller's error.
    """

    wrapper: DatabaseWrapper  # set by Django's __init__

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if exc_type is None or issubclass(exc_type, PoolError):
            return
        if exc_value is not None and _sqlstate.classify(exc_value) == _sqlstate.READ_ONLY:
            self.wrapper.demoted()
            # An outage, as on the async side: OperationalError (psycopg says InternalError).
            self.wrapper.errors_occurred = True
            raise OperationalError(*exc_value.args).with_traceback(traceback) from exc_value
        super().__exit__(exc_type, exc_value, traceback)
