"""The database fixture and the fault-injection helpers.

The server is the one ``testproject.settings`` found: ``DATABASE_URL`` when set,
otherwise a throwaway embedded PostgreSQL started for this test run. Tests that
stop and start the server need the embedded one and skip otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import SyncToAsync
from django.conf import settings
from django.db import connections

from django_asyncpool.base import DatabaseWrapper
from django_asyncpool.core import registry as _registry
from testproject import pgserver
from testproject.pgserver import free_port
from tests.proxy import TcpProxy

_names = itertools.count(1)

# What this run and the processes it starts put in the temporary directory goes into a
# directory of its own: what they leave behind is told apart from concurrent runs' files.
# (The embedded server of the settings, started before this file is read, is not in it.)
RUN_TMP = Path(tempfile.mkdtemp(prefix="asyncpool-tests-"))
# Servers that refuse root (pgbouncer, PostgreSQL) run as another user: it must reach
# the folders made for it in here, without listing the rest.
RUN_TMP.chmod(0o711)
os.environ["TMPDIR"] = str(RUN_TMP)
tempfile.tempdir = None  # gettempdir() reads TMPDIR again


@pytest.fixture(scope="session", autouse=True)
def leaves_no_temporary_files() -> Iterator[None]:
    """Fail the run when its tests leave a file or folder in the temporary directory."""
    yield
    # pytest's own tmp_path directories are removed with RUN_TMP at the end.
    left = sorted(p.name for p in RUN_TMP.iterdir() if not p.name.startswith("pytest-of-"))
    assert not left, f"the tests left these in the temporary directory: {left}"


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(RUN_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def pg() -> pgserver.LocalPostgres:
    """The embedded server, for tests that stop, start or inspect it."""
    server = pgserver.current()
    if server is None:
        pytest.skip("needs the embedded server (DATABASE_URL points at an external one)")
    return server


@pytest.fixture
def server_down(pg: pgserver.LocalPostgres) -> Iterator[Callable[[], None]]:
    """Return a function that stops the server; it is always started again afterwards."""
    yield lambda: pg.stop("fast")
    if not pg.is_running():
        pg.start()


@pytest.fixture
def proxy(pg: pgserver.LocalPostgres) -> Iterator[TcpProxy]:
    p = TcpProxy(pg.host, pg.port)
    yield p
    p.close()


def _client_backends(dbname: str | None, app: str | None) -> str:
    where = "backend_type = 'client backend' and pid <> pg_backend_pid()"
    if dbname:
        where += f" and datname = '{dbname}'"
    if app:
        where += f" and application_name = '{app}'"
    return f"from pg_stat_activity where {where}"


@contextlib.contextmanager
def throwaway_server(prefix: str, sql: str) -> Iterator[pgserver.LocalPostgres]:
    """A server of its own for a module's tests, ``sql`` run on it; destroyed afterwards."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    server = pgserver.LocalPostgres(home / "data")
    try:
        server.init()
        server.start()
        server.psql(sql)
        yield server
    finally:
        server.destroy()
        shutil.rmtree(home, ignore_errors=True)


def terminate_backends(
    pg: pgserver.LocalPostgres, dbname: str | None = None, *, app: str | None = None
) -> int:
    """pg_terminate_backend() every client backend but psql's own; return how many.

    ``dbname`` and ``app`` (an ``application_name``) keep it to those backends.
    """
    return int(
        pg.psql(f"select count(pg_terminate_backend(pid)) {_client_backends(dbname, app)}") or 0
    )


def backends(
    pg: pgserver.LocalPostgres,
    dbname: str | None = None,
    state: str | None = None,
    *,
    app: str | None = None,
) -> int:
    """Count the client backends of ``dbname`` and/or ``app`` (optionally in ``state``)."""
    cond = f" and state = '{state}'" if state else ""
    return int(pg.psql(f"select count(*) {_client_backends(dbname, app)}{cond}"))


def query(wrapper: Any) -> int:
    """One request through a wrapper: a query, then its connection goes back to the pool."""
    try:
        with wrapper.cursor() as cursor:
            cursor.execute("select pg_backend_pid()")
            return int(cursor.fetchone()[0])
    finally:
        wrapper.close()


@contextlib.contextmanager
def hops() -> Iterator[list[str]]:
    """Record the functions handed to a thread by ``sync_to_async`` meanwhile."""
    seen: list[str] = []
    original = SyncToAsync.__call__

    async def spy(self: SyncToAsync[Any, Any], *args: Any, **kwargs: Any) -> Any:
        # Not repr(func): a QuerySet's bound method would evaluate the QuerySet.
        seen.append(getattr(self.func, "__qualname__", None) or type(self.func).__name__)
        return await original(self, *args, **kwargs)

    SyncToAsync.__call__ = spy  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        SyncToAsync.__call__ = original  # type: ignore[method-assign]


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def closed_port() -> int:
    """Return a local TCP port nothing listens on (connections to it are refused)."""
    return free_port()


def metric_value(page: str, name: str, **labels: str) -> float:
    """Sum the samples of ``name`` in a Prometheus text page whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


@pytest.fixture
def make_wrapper(django_db_blocker: Any) -> Iterator[Callable[..., DatabaseWrapper]]:
    """Build a DatabaseWrapper of ENGINE django_asyncpool with its own alias and settings.

    ``make_wrapper(HOST=..., PORT=..., OPTIONS={...})`` starts from the default
    alias's settings; the wrapper talks to the ``postgres`` database, so it needs
    no test database. Pools and guards are closed and forgotten afterwards.
    """
    made: list[DatabaseWrapper] = []

    def make(**overrides: Any) -> DatabaseWrapper:
        settings_dict = copy.deepcopy(connections["default"].settings_dict)
        settings_dict["NAME"] = "postgres"
        options = overrides.pop("OPTIONS", None)
        settings_dict.update(overrides)
        if options is not None:
            settings_dict["OPTIONS"] = options
        wrapper = DatabaseWrapper(settings_dict, alias=f"t{next(_names)}")
        made.append(wrapper)
        return wrapper

    with django_db_blocker.unblock():
        yield make
        for wrapper in made:
            with contextlib.suppress(Exception):
                wrapper.close()
            with contextlib.suppress(Exception):
                wrapper.close_pool()
            _registry.reset(wrapper.alias)


def add_alias(**overrides: Any) -> str:
    """Add a database alias of ENGINE django_asyncpool to the settings; return its name.

    ``add_alias(HOST=..., PORT=..., OPTIONS={...})`` starts from the default alias's
    live settings (the test database). :func:`remove_alias` takes it away again.
    """
    alias = f"a{next(_names)}"
    settings_dict = copy.deepcopy(connections["default"].settings_dict)
    options = overrides.pop("OPTIONS", None)
    settings_dict.update(overrides)
    if options is not None:
        settings_dict["OPTIONS"] = options
    # Django warns when DATABASES is overridden as a setting; an added alias is safe.
    settings.DATABASES[alias] = settings_dict
    connections.settings[alias] = settings_dict
    return alias


def remove_alias(alias: str) -> None:
    """Close and forget the pools of an alias made by :func:`add_alias`, and remove it."""
    _registry.reset(alias)
    connections.settings.pop(alias, None)
    settings.DATABASES.pop(alias, None)
    with contextlib.suppress(Exception):
        connections[alias].close()
    with contextlib.suppress(AttributeError):
        delattr(connections._connections, alias)


@pytest.fixture
def make_alias() -> Iterator[Callable[..., str]]:
    """:func:`add_alias` for one test: the aliases it made are removed afterwards."""
    made: list[str] = []

    def make(**overrides: Any) -> str:
        made.append(add_alias(**overrides))
        return made[-1]

    yield make
    for alias in made:
        remove_alias(alias)


@pytest.fixture
def db_access(django_db_setup: Any, django_db_blocker: Any) -> Iterator[None]:
    """Let threads and probes connect (the test database exists, no transaction around it)."""
    with django_db_blocker.unblock():
        yield


@pytest.fixture
def alias(make_alias: Callable[..., str], request: pytest.FixtureRequest) -> Callable[..., str]:
    """make_alias() with the test module's ``QUICK`` options by default (small pools)."""

    def make(**overrides: Any) -> str:
        overrides.setdefault("OPTIONS", request.module.QUICK)
        return make_alias(**overrides)

    return make


@pytest.fixture
def redis_server() -> Iterator[Any]:
    """A throwaway redis-server on a free port (skips where the binary is missing)."""
    from tests.redisserver import RedisServer, binary

    if binary() is None:
        pytest.skip("needs redis-server (apt-get install redis-server)")
    server = RedisServer()
    yield server
    server.close()


def in_forked_child(body: Callable[[], object]) -> Callable[[], tuple[int, str]]:
    """Fork; the child writes ``repr(body())`` to a pipe and exits. Return a function the
    parent calls when it is done meanwhile: it waits for the child and returns
    ``(exit status, what the child wrote)``."""
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.write(write, repr(body()).encode())
        finally:
            os._exit(0)
    os.close(write)

    def result() -> tuple[int, str]:
        _, status = os.waitpid(child, 0)
        try:
            return status, os.read(read, 1 << 16).decode()
        finally:
            os.close(read)

    return result


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected socket pair: the first plays a connection's socket, the second the server."""
    ours, peer = socket.socketpair()
    yield ours, peer
    ours.close()
    peer.close()
