"""The errors and their messages (``errors``) alone: no database."""

from __future__ import annotations

import pickle
import re

import psycopg_pool
import pytest
import sqlalchemy.exc
from django.db import OperationalError

from django_asyncpool import errors
from django_asyncpool.config import AliasConfig
from django_asyncpool.errors import (
    AsyncConnectionLost,
    CircuitOpenError,
    ConfigurationFault,
    DatabaseUnavailable,
    PoolError,
    PoolTimeout,
    SyncPoolClosed,
    SyncPoolTimeout,
    pool_timeout,
    redact,
    unreachable,
)

CLASSES = [
    getattr(errors, name) for name in errors.__all__ if isinstance(getattr(errors, name), type)
]


def test_every_error_is_a_django_operational_error() -> None:
    assert len(CLASSES) == 15
    for cls in CLASSES:
        assert issubclass(cls, OperationalError), cls
        assert issubclass(cls, PoolError), cls


def drawn_tree() -> dict[str, str]:
    """Return each class drawn in the module docstring's tree, with the parent drawn above it."""
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (column, name) of the branch being drawn
    for line in (errors.__doc__ or "").splitlines():
        if line.strip() == "django.db.OperationalError":
            stack = [(line.index("d"), "OperationalError")]
            continue
        found = re.match(r"^([\s│]*)[├└]── (\w+)", line)
        if not found or not stack:
            continue
        column, name = len(found.group(1)), found.group(2)
        while stack[-1][0] >= column:
            stack.pop()
        parents[name] = stack[-1][1]
        stack.append((column, name))
    return parents


def test_the_docstring_draws_every_error_under_its_parent() -> None:
    tree = drawn_tree()
    assert set(tree) == {cls.__name__ for cls in CLASSES}
    for cls in CLASSES:
        assert tree[cls.__name__] == cls.__bases__[0].__name__, cls


def test_the_sync_errors_are_also_psycopg_pools() -> None:
    assert issubclass(SyncPoolTimeout, errors.PoolTimeout)
    assert issubclass(SyncPoolTimeout, psycopg_pool.PoolTimeout)
    assert issubclass(SyncPoolClosed, errors.PoolClosed)
    assert issubclass(SyncPoolClosed, psycopg_pool.PoolClosed)


def test_async_connection_lost_is_also_sqlalchemys() -> None:
    orig = ConnectionResetError("reset by peer")
    error = AsyncConnectionLost("lost it", alias="replica", statement="select 1", orig=orig)
    assert isinstance(error, errors.ConnectionLost)
    assert isinstance(error, sqlalchemy.exc.OperationalError)
    assert error.connection_invalidated is True
    assert error.orig is orig
    assert error.statement == "select 1"
    assert error.alias == "replica"
    assert str(error) == "lost it"  # not SQLAlchemy's "(orig) ... [SQL: ...]"


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (CircuitOpenError("open", alias="r", retry_after=4.5), sqlalchemy.exc.OperationalError),
        (DatabaseUnavailable("down", alias="replica"), sqlalchemy.exc.OperationalError),
        (
            ConfigurationFault("refused", alias="replica", sqlstate="28P01", reason="bad"),
            sqlalchemy.exc.OperationalError,
        ),
        (PoolTimeout("busy", alias="replica"), sqlalchemy.exc.TimeoutError),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else "",
)
def test_the_async_side_raises_each_also_as_sqlalchemys(
    ours: PoolError, theirs: type[Exception]
) -> None:
    orig = ConnectionRefusedError("refused")
    try:
        raise ours from orig
    except PoolError as exc:
        twin = errors.for_async(exc)
    assert isinstance(twin, type(ours)) and isinstance(twin, theirs)
    assert vars(ours).items() <= vars(twin).items()  # alias, retry_after, sqlstate ...
    assert str(twin) == str(ours) and twin.args == ours.args
    assert twin.__cause__ is orig
    if isinstance(twin, sqlalchemy.exc.DBAPIError):
        assert twin.orig is orig and twin.statement is None
        assert not twin.connection_invalidated
    copy = pickle.loads(pickle.dumps(twin))
    assert type(copy) is type(twin) and str(copy) == str(twin)
    assert errors.for_async(twin) is twin  # already the async side's
    assert errors.named(twin) == errors.named(ours) == type(ours).__name__  # in output
    assert errors.for_async(AsyncConnectionLost("x", orig=orig)) is not None


def test_redact_replaces_the_password_everywhere() -> None:
    text = "postgresql://app:s3cret@db/app failed; password 's3cret' rejected"
    assert redact(text, "s3cret") == "postgresql://app:***@db/app failed; password '***' rejected"
    assert redact(text, "other") == text


def test_redact_with_no_password_leaves_the_text_alone() -> None:
    assert redact("connection refused", "") == "connection refused"


@pytest.mark.parametrize(
    ("cls", "side", "knobs", "whose"),
    [
        (SyncPoolTimeout, "sync", "OPTIONS['pool']['max_size'] or ['timeout']", ""),
        (PoolTimeout, "async", "OPTIONS['async_pool']['pool_size'], ['max_overflow']", ""),
        (
            PoolTimeout,
            "async_orm",
            "OPTIONS['async_pool']['pool_size'], ['max_overflow']",
            " for the async ORM",
        ),
    ],
)
def test_pool_timeout_says_the_timeout_the_state_and_the_knobs(
    cls: type[PoolTimeout], side: str, knobs: str, whose: str
) -> None:
    error = pool_timeout(cls, config(), side, 2.5, "size 8/8, in use 8, idle 0, waiting 3")
    assert type(error) is cls
    assert error.alias == "replica"
    message = str(error)
    assert f"database 'replica' (app@db/app){whose} became free within 2.5s" in message
    assert "(size 8/8, in use 8, idle 0, waiting 3)" in message
    assert f"Raise {knobs}" in message
    assert "OPTIONS['leak_threshold']" in message
    assert "s3cret" not in message


def config() -> AliasConfig:
    return AliasConfig(alias="replica", dbname="app", user="app", password="s3cret", host="db")


def test_unreachable_redacts_the_password_and_names_the_warmup() -> None:
    error = unreachable(config(), 3.0, OSError("password s3cret for app@db rejected "))
    assert isinstance(error, DatabaseUnavailable)
    assert error.alias == "replica"
    message = str(error)
    assert "s3cret" not in message
    assert "password *** for app@db rejected." in message
    assert config().describe() in message
    assert "OPTIONS['warmup'] = 3s" in message
    assert "remove OPTIONS['warmup']" in message


def test_unreachable_names_an_error_without_a_message() -> None:
    assert ": TimeoutError." in str(unreachable(config(), 0.5, TimeoutError()))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_survives_pickling(cls: type[PoolError]) -> None:
    # Django's parallel test runner and multiprocessing pickle errors.
    if cls is AsyncConnectionLost:
        error: PoolError = cls(
            "lost", alias="replica", statement="select %s", params=(1,), orig=ValueError("x")
        )
    elif issubclass(cls, CircuitOpenError):
        error = cls("open", alias="replica", retry_after=4.5)
    elif issubclass(cls, ConfigurationFault):
        error = cls("refused", alias="replica", sqlstate="28P01", reason="password failed")
    else:
        error = cls("failed", alias="replica")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls
    assert str(copy) == str(error)
    assert copy.args == error.args
    assert copy.alias == "replica"
    if isinstance(copy, CircuitOpenError):
        assert copy.retry_after == 4.5
    if isinstance(copy, ConfigurationFault):
        assert (copy.sqlstate, copy.reason) == ("28P01", "password failed")
    if isinstance(copy, AsyncConnectionLost):
        assert (copy.statement, copy.params) == ("select %s", (1,))
        assert type(copy.orig) is ValueError and str(copy.orig) == "x"
        assert copy.connection_invalidated is True
