"""The async pool's driver errors, typed as SQLAlchemy's and as Django's at once.

A statement that fails on a ``session_scope()`` raises SQLAlchemy's error
(``IntegrityError``, or a bare ``DBAPIError`` for what its asyncpg adapter does not
map, such as 25006 or 22012). :func:`dual` returns the same error as a class that
is also Django's of the same name, so one ``except django.db.IntegrityError`` (or
``django.db.DatabaseError``) serves both pools, and code written for SQLAlchemy's
classes keeps working. The class comes from :func:`..core.sqlstate.classify`:
an outage (the connection gone, 25006 on a demoted primary) is an
``OperationalError``; an application error follows its SQLSTATE class (22 data,
23 integrity, 42 programming) when SQLAlchemy's adapter left it bare.
"""

from __future__ import annotations

from typing import Any

import django.db
import sqlalchemy.exc

from ..core import sqlstate as _sqlstate

__all__ = [
    "AsyncDBAPIError",
    "AsyncDataError",
    "AsyncDatabaseError",
    "AsyncIntegrityError",
    "AsyncInterfaceError",
    "AsyncInternalError",
    "AsyncNotSupportedError",
    "AsyncOperationalError",
    "AsyncProgrammingError",
    "dual",
]


class AsyncDBAPIError(sqlalchemy.exc.DBAPIError, django.db.DatabaseError):
    """SQLAlchemy's bare ``DBAPIError``; also Django's ``DatabaseError``."""


class AsyncDatabaseError(sqlalchemy.exc.DatabaseError, django.db.DatabaseError):
    """SQLAlchemy's ``DatabaseError``; also Django's."""


class AsyncInterfaceError(sqlalchemy.exc.InterfaceError, django.db.InterfaceError):
    """SQLAlchemy's ``InterfaceError``; also Django's."""


class AsyncDataError(sqlalchemy.exc.DataError, django.db.DataError):
    """SQLAlchemy's ``DataError``; also Django's."""


class AsyncOperationalError(sqlalchemy.exc.OperationalError, django.db.OperationalError):
    """SQLAlchemy's ``OperationalError``; also Django's."""


class AsyncIntegrityError(sqlalchemy.exc.IntegrityError, django.db.IntegrityError):
    """SQLAlchemy's ``IntegrityError``; also Django's."""


class AsyncInternalError(sqlalchemy.exc.InternalError, django.db.InternalError):
    """SQLAlchemy's ``InternalError``; also Django's."""


class AsyncProgrammingError(sqlalchemy.exc.ProgrammingError, django.db.ProgrammingError):
    """SQLAlchemy's ``ProgrammingError``; also Django's."""


class AsyncNotSupportedError(sqlalchemy.exc.NotSupportedError, django.db.NotSupportedError):
    """SQLAlchemy's ``NotSupportedError``; also Django's."""


#: SQLAlchemy's class -> ours, most specific first.
_BY_CLASS: tuple[tuple[type[sqlalchemy.exc.DBAPIError], type[sqlalchemy.exc.DBAPIError]], ...] = (
    (sqlalchemy.exc.IntegrityError, AsyncIntegrityError),
    (sqlalchemy.exc.DataError, AsyncDataError),
    (sqlalchemy.exc.ProgrammingError, AsyncProgrammingError),
    (sqlalchemy.exc.InternalError, AsyncInternalError),
    (sqlalchemy.exc.NotSupportedError, AsyncNotSupportedError),
    (sqlalchemy.exc.OperationalError, AsyncOperationalError),
    (sqlalchemy.exc.InterfaceError, AsyncInterfaceError),
    (sqlalchemy.exc.DatabaseError, AsyncDatabaseError),
)
#: SQLSTATE class -> ours, for a bare DBAPIError.
_BY_SQLSTATE = {
    "22": AsyncDataError,
    "23": AsyncIntegrityError,
    "42": AsyncProgrammingError,
    "0A": AsyncNotSupportedError,
    "XX": AsyncInternalError,
}
_OURS = frozenset(ours for _, ours in _BY_CLASS) | {AsyncDBAPIError}


def dual(exc: sqlalchemy.exc.DBAPIError) -> sqlalchemy.exc.DBAPIError:
    """Return ``exc`` as one of this module's classes (``exc`` itself if it is one)."""
    if type(exc) in _OURS or not isinstance(exc, sqlalchemy.exc.DBAPIError):
        return exc
    kind = _sqlstate.classify(exc)
    cls: type[sqlalchemy.exc.DBAPIError] | None = None
    if kind in (_sqlstate.GONE, _sqlstate.READ_ONLY):
        cls = AsyncOperationalError
    else:
        cls = next((ours for theirs, ours in _BY_CLASS if isinstance(exc, theirs)), None)
        if cls is None:
            code = _sqlstate.sqlstate(exc) or ""
            cls = _BY_SQLSTATE.get(code[:2], AsyncDBAPIError if not code else AsyncDatabaseError)
    new: Any = cls(
        exc.statement,
        exc.params,
        exc.orig,  # type: ignore[arg-type]
        hide_parameters=exc.hide_parameters,
        connection_invalidated=exc.connection_invalidated,
        code=exc.code,
        ismulti=exc.ismulti,
    )
    new.detail = exc.detail
    return new  # type: ignore[no-any-return]
