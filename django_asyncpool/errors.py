"""The errors django-asyncpool raises.

Every one is a ``django.db.OperationalError``, so handlers written for Django's
own database errors keep catching them::

    django.db.OperationalError
     └── PoolError
          ├── CircuitOpenError        the breaker is open: failing fast
          │    └── AsyncCircuitOpenError (async side; also SQLAlchemy's OperationalError)
          ├── ConnectionLost          the connection died during a query
          │    └── AsyncConnectionLost   (async side; also SQLAlchemy's OperationalError)
          ├── DatabaseUnavailable     could not connect (after retries)
          │    ├── ConfigurationFault    the server refused the alias's settings (not retried)
          │    │    └── AsyncConfigurationFault  (async side; also SQLAlchemy's ...)
          │    └── AsyncDatabaseUnavailable  (async side; also SQLAlchemy's OperationalError)
          ├── PoolTimeout             no connection free within the timeout
          │    ├── AsyncPoolTimeout      (async side; also SQLAlchemy's TimeoutError)
          │    └── SyncPoolTimeout       (sync side; also psycopg_pool's PoolTimeout)
          ├── PoolClosed              the pool was closed
          │    └── SyncPoolClosed        (sync side; also psycopg_pool's PoolClosed)
          └── ReadOnlyError           a read-only scope tried to write

Messages never contain a password or a full DSN: they name the alias, the
host and the database, and say what to do: :func:`redact` takes a password out
of any text shown, :func:`pool_timeout` writes the one PoolTimeout message every
pool raises, and :func:`unreachable` the DatabaseUnavailable of both warm-ups.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg_pool
import sqlalchemy.exc
from django.db import OperationalError

if TYPE_CHECKING:
    from .config import AliasConfig

__all__ = [
    "AsyncCircuitOpenError",
    "AsyncConfigurationFault",
    "AsyncConnectionLost",
    "AsyncDatabaseUnavailable",
    "AsyncPoolTimeout",
    "CircuitOpenError",
    "ConfigurationFault",
    "ConnectionLost",
    "DatabaseUnavailable",
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
    "ReadOnlyError",
    "SyncPoolClosed",
    "SyncPoolTimeout",
    "for_async",
    "named",
    "pool_timeout",
    "redact",
    "unreachable",
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


class ConnectionLost(PoolError):
    """The connection died during a query (server restart, terminated backend, network)."""


class AsyncConnectionLost(ConnectionLost, sqlalchemy.exc.OperationalError):
    """The async pool's ConnectionLost; also SQLAlchemy's ``OperationalError``.

    Its ``connection_invalidated`` is True, as SQLAlchemy sets it on a disconnect,
    so code written for SQLAlchemy's errors keeps working; ``orig`` is the
    driver's error.
    """

    def __init__(
        self,
        message: str,
        *,
        alias: str = "default",
        statement: str | None = None,
        params: Any = None,
        orig: BaseException,
    ) -> None:
        sqlalchemy.exc.OperationalError.__init__(
            self, statement, params, orig, connection_invalidated=True
        )
        # Not PoolError.__init__: its super() is SQLAlchemy's in this class's MRO.
        self.args = (message,)
        self.alias = alias

    def __str__(self) -> str:
        return str(self.args[0])  # ours, not SQLAlchemy's "(orig) ... [SQL: ...]"

    def __reduce__(self) -> Any:
        return _rebuild_lost, (str(self), self.alias, self.statement, self.params, self.orig)


def _rebuild_lost(
    message: str, alias: str, statement: str | None, params: Any, orig: BaseException
) -> AsyncConnectionLost:
    return AsyncConnectionLost(message, alias=alias, statement=statement, params=params, orig=orig)


class DatabaseUnavailable(PoolError):
    """A connection to the database could not be made (after the retries)."""


class ConfigurationFault(DatabaseUnavailable):
    """The server refused the connection's settings (authentication, database, role, SSL).

    A retry cannot fix it, so none is made. ``sqlstate`` is the server's code (28P01,
    28000, 3D000 ...; None for an SSL refusal), ``reason`` its own words.
    """

    def __init__(
        self,
        message: str,
        *,
        alias: str = "default",
        sqlstate: str | None = None,
        reason: str = "",
    ) -> None:
        super().__init__(message, alias=alias)
        self.sqlstate = sqlstate
        self.reason = reason


class PoolTimeout(PoolError):
    """No connection became free within the pool timeout."""


class PoolClosed(PoolError):
    """The pool was closed; it cannot hand out connections any more."""


class ReadOnlyError(PoolError):
    """A ``session_scope(readonly=True)`` tried to write."""


class SyncPoolTimeout(PoolTimeout, psycopg_pool.PoolTimeout):
    """The sync pool's PoolTimeout; also psycopg_pool's, as Django's own backend raises."""


class SyncPoolClosed(PoolClosed, psycopg_pool.PoolClosed):
    """The sync pool's PoolClosed; also psycopg_pool's, as Django's own backend raises."""


class _Twin(Exception):
    """An error of the async side, also SQLAlchemy's class of the same kind.

    Made by :func:`for_async` from the one the pools' shared guard raised, so code
    written for SQLAlchemy's errors (``except sqlalchemy.exc.OperationalError``, or
    ``TimeoutError`` for a pool timeout) catches them too. As SQLAlchemy's own
    connect errors, they carry no statement; ``orig`` is the driver's error, if any.
    """

    args: tuple[Any, ...]
    # SQLAlchemy's StatementError has statement, params and orig (None) as class attributes.
    connection_invalidated = False
    hide_parameters = False
    ismulti: bool | None = None

    def __init__(self, message: str) -> None:
        # Reached from PoolError's __init__ through the MRO: not SQLAlchemy's, which
        # wants a statement.
        Exception.__init__(self, message)
        self.detail: list[str] = []

    def __str__(self) -> str:
        return str(self.args[0])  # ours, not SQLAlchemy's "(orig) ... [SQL: ...]"

    def __reduce__(self) -> Any:
        return _rebuild_twin, (type(self), self.args, dict(vars(self)))


def _rebuild_twin(cls: type[_Twin], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    twin = Exception.__new__(cls)
    twin.args = args
    vars(twin).update(state)
    return twin


class AsyncCircuitOpenError(CircuitOpenError, _Twin, sqlalchemy.exc.OperationalError):
    """The async side's CircuitOpenError; also SQLAlchemy's ``OperationalError``."""


class AsyncDatabaseUnavailable(DatabaseUnavailable, _Twin, sqlalchemy.exc.OperationalError):
    """The async side's DatabaseUnavailable; also SQLAlchemy's ``OperationalError``."""


class AsyncConfigurationFault(ConfigurationFault, _Twin, sqlalchemy.exc.OperationalError):
    """The async side's ConfigurationFault; also SQLAlchemy's ``OperationalError``."""


class AsyncPoolTimeout(PoolTimeout, _Twin, sqlalchemy.exc.TimeoutError):
    """The async side's PoolTimeout; also SQLAlchemy's ``TimeoutError``, as its pools raise."""


_TWINS: dict[type[PoolError], type[PoolError]] = {
    CircuitOpenError: AsyncCircuitOpenError,
    DatabaseUnavailable: AsyncDatabaseUnavailable,
    ConfigurationFault: AsyncConfigurationFault,
    PoolTimeout: AsyncPoolTimeout,
}


def for_async(exc: PoolError) -> PoolError:
    """Return ``exc`` as the async side raises it: also SQLAlchemy's class (``exc`` if none)."""
    cls = _TWINS.get(type(exc))
    if cls is None:
        return exc
    twin = Exception.__new__(cls)
    twin.args = exc.args
    vars(twin).update(vars(exc))
    cause = exc.__cause__
    if isinstance(cause, Exception) and not isinstance(cause, PoolError):
        twin.orig = cause  # type: ignore[attr-defined]
    twin.detail = []  # type: ignore[attr-defined]
    twin.__cause__ = cause
    twin.__traceback__ = exc.__traceback__
    return twin


def named(exc: BaseException) -> str:
    """Return the name of ``exc``'s class as the docs name it, for output and logs.

    The async side's copies are named by the class they extend (DatabaseUnavailable,
    not AsyncDatabaseUnavailable): the one a handler catches.
    """
    cls = type(exc)
    return cls.__bases__[0].__name__ if issubclass(cls, _Twin) else cls.__name__


def redact(text: str, password: str) -> str:
    """Return ``text`` with ``password`` (if any) replaced by ``***``."""
    return text.replace(password, "***") if password else text


#: The settings that give each kind of pool more room, by its side (the metrics label).
_KNOBS = {
    "sync": "OPTIONS['pool']['max_size'] or ['timeout']",
    "async": "OPTIONS['async_pool']['pool_size'], ['max_overflow'] or ['timeout']",
    "async_orm": "OPTIONS['async_pool']['pool_size'], ['max_overflow'] or ['timeout']",
}
#: Whose connections a side's pool holds, where the message should say it.
_FOR = {"async_orm": " for the async ORM"}


def pool_timeout(
    cls: type[PoolTimeout], config: AliasConfig, side: str, timeout: float, state: str
) -> PoolTimeout:
    """Return the PoolTimeout of every pool: what was waited for, the pool's state, what to do.

    ``side`` is the pool's kind ("sync", "async", "async_orm": it names the settings
    that give it more room), ``state`` its figures ("size 8/10, in use 8, idle 0,
    waiting 3", :func:`~.core.stats.describe`).
    """
    return cls(
        f"No connection to database {config.describe()}{_FOR.get(side, '')} became free "
        f"within {timeout:.1f}s ({state}). Raise {_KNOBS[side]}, or find the code holding "
        "connections (OPTIONS['leak_threshold'] logs where they were taken).",
        alias=config.alias,
    )


def unreachable(config: AliasConfig, timeout: float, exc: BaseException) -> DatabaseUnavailable:
    """Return the DatabaseUnavailable of a warm-up (either pool's) that failed with ``exc``."""
    reason = redact(str(exc).strip(), config.password) or type(exc).__name__
    return DatabaseUnavailable(
        f"Database {config.describe()} could not be reached at startup within "
        f"OPTIONS['warmup'] = {timeout:g}s: {reason}. Check that the server is up and "
        "reachable, or remove OPTIONS['warmup'] to open the pool on first use.",
        alias=config.alias,
    )
