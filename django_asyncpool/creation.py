"""Test-database creation: close every pool on a database before it is cloned or dropped."""

from __future__ import annotations

from typing import Any

from django.db import connections
from django.db.backends.postgresql import creation as postgresql

from .core import registry as _registry


def close_pools_on(dbname: str) -> None:
    """Close every connection and pool of this process that uses database ``dbname``.

    Django closes only the pool of the alias being cloned or destroyed; a mirror
    alias (``TEST["MIRROR"]``) has a pool of its own on the same database, which
    would keep the database busy.
    """
    pools = _registry.sync_pools  # the ENGINE's DatabaseWrapper._connection_pools
    for wrapper in connections.all(initialized_only=True):
        conn = wrapper.connection
        ours = getattr(type(wrapper), "_connection_pools", None) is pools
        if ours and conn is not None and conn.info.dbname == dbname:
            wrapper.close()
    for alias, pool in list(pools.items()):
        if isinstance(pool.kwargs, dict) and pool.kwargs.get("dbname") == dbname:
            pool.close()
            pools.pop(alias, None)


class DatabaseCreation(postgresql.DatabaseCreation):
    def _clone_test_db(self, suffix: Any, verbosity: int, keepdb: bool = False) -> None:
        close_pools_on(self.connection.settings_dict["NAME"])
        super()._clone_test_db(suffix, verbosity, keepdb)  # type: ignore[misc]

    def _destroy_test_db(self, test_database_name: str, verbosity: int) -> None:
        close_pools_on(test_database_name)
        # Connections of event loops already gone cannot be closed from here; the test
        # database is about to be dropped, so their sessions go with it.
        with self._nodb_cursor() as cursor:  # type: ignore[attr-defined]
            cursor.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity "
                "where datname = %s and pid <> pg_backend_pid()",
                [test_database_name],
            )
        super()._destroy_test_db(test_database_name, verbosity)  # type: ignore[misc]
