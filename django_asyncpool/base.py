"""ENGINE ``django_asyncpool``: Django's PostgreSQL backend with a resilient pool.

Only what differs from ``django.db.backends.postgresql`` is overridden:

* ``__init__`` fills a copy of the settings from DATABASE_URL (the user's dict is
  left alone) and records the wrapper for the sync side's fork handling;
* ``pool`` is the alias's :class:`~django_asyncpool._syncpool.SyncPool` (pooling is
  on by default), one per alias per process, built by ``SyncPool.for_wrapper``;
* ``get_new_connection`` goes through the alias's breaker and retry policy, counted;
* ``get_connection_params`` drops django-asyncpool's OPTIONS keys;
* ``wrap_database_errors`` lets django-asyncpool's own errors through.
"""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg_pool
from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.postgresql import base as postgresql
from django.db.utils import DatabaseErrorWrapper
from django.utils.functional import cached_property
from psycopg import IsolationLevel

from . import _registry, _stats, _syncpool, metrics
from ._guard import Guard
from ._syncpool import SyncPool
from .config import InvalidURL, pgbouncer_on, psycopg_keys, refuse_unusable
from .creation import DatabaseCreation
from .errors import PoolError, SyncPoolClosed, SyncPoolTimeout, pool_timeout
from .features import DatabaseFeatures


class DatabaseWrapper(postgresql.DatabaseWrapper):
    """Django's PostgreSQL wrapper, with the pool behind a breaker and retries."""

    creation_class = DatabaseCreation
    features_class = DatabaseFeatures

    isolation_level: IsolationLevel  # set by Django's get_new_connection()
    # Our own class-level dict: the stock backend's pools are not ours to manage.
    _connection_pools = _registry.sync_pools

    def __init__(self, settings_dict: dict[str, Any], alias: str = "default") -> None:
        # DATABASE_URL fills the connection fields when the alias gives none. One that
        # cannot be used is a system check (dbpool.E006) and refused on connecting.
        with contextlib.suppress(InvalidURL):
            settings_dict = _registry.with_url(alias, settings_dict)
        if pgbouncer_on(settings_dict.get("OPTIONS") or {}):
            # QuerySet.iterator()'s WITH HOLD cursors outlive the transaction, and so
            # PgBouncer's transaction pooling; an explicit False is refused (E020).
            settings_dict = {"DISABLE_SERVER_SIDE_CURSORS": True, **settings_dict}
        super().__init__(settings_dict, alias)
        self._options_reported = False
        _syncpool.wrappers.add(self)
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
            # Parsing the whole configuration costs ~30 us: not on every checkout.
            config = _registry.config_for_wrapper(self)  # reports unknown or invalid keys
            # Before any connection is made, and before Django's complaint about a
            # missing NAME, which an unusable DATABASE_URL would leave.
            refuse_unusable(config)
            self._options_reported = True
        params: dict[str, Any] = super().get_connection_params()
        passed = psycopg_keys()
        if not params.keys() <= passed:
            for key in params.keys() - passed:
                params.pop(key)  # ours, and unknown keys (reported), never reach psycopg
        return params

    @cached_property
    def _sync_stats(self) -> _stats.Stats:
        return _registry.stats(self.alias, "sync")  # one per alias for the life of the process

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        guard = _registry.guard(self.alias, self)
        return _syncpool.checkout(
            self._sync_stats, guard, self._get_new_connection, guard, conn_params
        )

    def _get_new_connection(self, guard: Guard, conn_params: dict[str, Any]) -> Any:
        """Return Django's new (pooled) connection, with the pool's errors made ours."""
        try:
            return super().get_new_connection(conn_params)
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
        super()._set_autocommit(autocommit)  # type: ignore[misc]
        if autocommit:
            _syncpool.transactions.discard(self)
        else:
            _syncpool.transactions.add(self)

    def _close(self) -> None:
        if self.connection is not None:
            _syncpool.checkin(self._sync_stats, self.connection)
        super()._close()  # type: ignore[misc]


class _ErrorWrapper(DatabaseErrorWrapper):
    """Django's error wrapper, letting django-asyncpool's own errors through.

    They are Django OperationalErrors already, with what to do; the sync pool's
    SyncPoolTimeout and SyncPoolClosed, also psycopg errors, would be replaced by a
    bare OperationalError.
    """

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if exc_type is None or issubclass(exc_type, PoolError):
            return
        super().__exit__(exc_type, exc_value, traceback)
