"""The OPTIONS keys: ours, Django's own, libpq's, psycopg_pool's, and what goes to psycopg."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from .model import AsyncPoolConfig, BreakerConfig, RetryConfig

__all__ = [
    "DJANGO_OPTIONS",
    "ENV_ASYNC",
    "FLAGS",
    "OUR_KEYS",
    "SECTIONS",
    "libpq_keys",
    "psycopg_keys",
    "psycopg_params",
    "psycopg_pool_defaults",
    "sync_pool_keys",
]

#: Django's own OPTIONS keys for the postgresql backend (not libpq parameters).
DJANGO_OPTIONS = frozenset(
    {
        "pool",
        "isolation_level",
        "assume_role",
        "server_side_binding",
        "prepare_threshold",
        "cursor_factory",
        "context",
        "service",
        "passfile",
    }
)

#: Our OPTIONS sections (and flags), removed before the rest goes to psycopg.
SECTIONS: dict[str, type] = {
    "async_pool": AsyncPoolConfig,
    "circuit_breaker": BreakerConfig,
    "retry": RetryConfig,
}
FLAGS = frozenset(
    {
        "async_orm",
        "failover_to",
        "leak_threshold",
        "liveness_bypass",
        "metrics",
        "pgbouncer",
        "warmup",
    }
)
OUR_KEYS = frozenset(SECTIONS) | FLAGS

#: Environment variables of the usage guide that fill ``async_pool``.
ENV_ASYNC = {
    "DB_POOL_SIZE": "pool_size",
    "DB_MAX_OVERFLOW": "max_overflow",
    "DB_POOL_RECYCLE": "recycle",
    "DB_POOL_TIMEOUT": "timeout",
    "SQL_ECHO": "echo",
}


@functools.cache
def sync_pool_keys() -> frozenset[str]:
    from psycopg_pool import ConnectionPool

    params = inspect.signature(ConnectionPool.__init__).parameters
    # These are set by the ENGINE itself.
    return frozenset(params) - {"self", "conninfo", "kwargs", "open", "configure", "check"}


@functools.cache
def psycopg_pool_defaults() -> dict[str, Any]:
    from psycopg_pool import ConnectionPool

    params = inspect.signature(ConnectionPool.__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


@functools.cache
def libpq_keys() -> frozenset[str]:
    from psycopg import pq

    return frozenset(d.keyword.decode() for d in pq.Conninfo.get_defaults())


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
def psycopg_keys() -> frozenset[str]:
    """Return the connection parameters that go to psycopg: libpq's and Django's own."""
    return (libpq_keys() - OUR_KEYS - DJANGO_OPTIONS) | _DRIVER_KEYS


def psycopg_params(params: dict[str, Any]) -> dict[str, Any]:
    """Drop from Django's connection parameters (in place) what psycopg must not get:
    django-asyncpool's OPTIONS, and unknown keys (reported by :func:`from_settings`)."""
    passed = psycopg_keys()
    # One pass, on every connect: about half the time of a subset test and then a set
    # difference (docs/performance.md, "Measured choices in the code").
    for key in [key for key in params if key not in passed]:
        del params[key]
    return params
