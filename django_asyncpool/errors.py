"""The errors django-asyncpool raises.

Every one is a ``django.db.OperationalError``, so handlers written for Django's
own database errors keep catching them::

    django.db.OperationalError
     └── PoolError
          ├── CircuitOpenError        the breaker is open: failing fast
          ├── DatabaseUnavailable     could not connect (after retries)
          ├── PoolTimeout             no connection free within the timeout
          ├── PoolClosed              the pool was closed
          └── ReadOnlyError           a read-only scope tried to write

Messages never contain a password or a full DSN: they name the alias, the
host and the database, and say what to do.
"""

from __future__ import annotations

from django.db import OperationalError

__all__ = [
    "CircuitOpenError",
    "DatabaseUnavailable",
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
    "ReadOnlyError",
]


class PoolError(OperationalError):
    """Base class of the errors raised by django-asyncpool."""

    def __init__(self, message: str, *, alias: str = "default") -> None:
        super().__init__(message)
        self.alias = alias


class CircuitOpenError(PoolError):
    """The circuit breaker is open: the database failed recently, calls fail fast."""

    def __init__(self, message: str, *, alias: str = "default", retry_after: float = 0.0) -> None:
        super().__init__(message, alias=alias)
        self.retry_after = retry_after


class DatabaseUnavailable(PoolError):
    """A connection to the database could not be made (after the retries)."""


class PoolTimeout(PoolError):
    """No connection became free within the pool timeout."""


class PoolClosed(PoolError):
    """The pool was closed; it cannot hand out connections any more."""


class ReadOnlyError(PoolError):
    """A ``session_scope(readonly=True)`` tried to write."""
