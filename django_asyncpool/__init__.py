"""django-asyncpool: a resilient, observable PostgreSQL pool for Django.

Use it as a database ENGINE::

    DATABASES = {"default": {"ENGINE": "django_asyncpool", ...}}

and, in async views, ``async with session_scope() as session: ...``.
"""

from __future__ import annotations

from .config import AliasConfig
from .errors import (
    AsyncConnectionLost,
    CircuitOpenError,
    ConnectionLost,
    DatabaseUnavailable,
    PoolClosed,
    PoolError,
    PoolTimeout,
    ReadOnlyError,
)
from .pool import ConnectionPool, session_scope

__all__ = [
    "AliasConfig",
    "AsyncConnectionLost",
    "CircuitOpenError",
    "ConnectionLost",
    "ConnectionPool",
    "DatabaseUnavailable",
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
    "ReadOnlyError",
    "session_scope",
]
__version__ = "0.1.0.dev0"
