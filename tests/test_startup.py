"""Startup and shutdown: nothing connects unless asked, the warm-up, ASGI lifespan."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import uvicorn
from django.apps import apps
from django.core.asgi import get_asgi_application
from django.test import override_settings

from django_asyncpool import ConfigurationFault, DatabaseUnavailable
from django_asyncpool.asgi import PoolLifespan, warm_up_async
from django_asyncpool.base import DatabaseWrapper
from testproject.pgserver import PASSWORD, LocalPostgres

from .conftest import closed_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


def by_name(pg: LocalPostgres, application_name: str) -> int:
    return int(
        pg.psql(
            "select count(*) from pg_stat_activity "
            f"where application_name = '{application_name}' and pid <> pg_backend_pid()"
        )
    )


pytestmark = pytest.mark.usefixtures("db_access")


def test_startup_opens_no_connection() -> None:
    """``django.setup()`` and ``manage.py check`` with the server unreachable: no error."""
    url = f"postgresql+asyncpg://u:pw@127.0.0.1:{closed_port()}/nowhere"
    code = (
        "import django, time; t = time.monotonic(); django.setup()\n"
        "from django.core.management import call_command; call_command('check')\n"
        "from django_asyncpool.base import DatabaseWrapper\n"
        "assert not DatabaseWrapper._connection_pools, DatabaseWrapper._connection_pools\n"
    )
    env = {**os.environ, "DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": "testproject.settings"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "no issues" in done.stdout


def test_warmup_opens_the_sync_pool_at_startup(
    make_alias: Callable[..., str], pg: LocalPostgres
) -> None:
    name = make_alias(
        OPTIONS={"pool": {"min_size": 2, "max_size": 4}, "warmup": 5, "application_name": "warm1"}
    )
    apps.get_app_config("django_asyncpool").ready()
    pool = DatabaseWrapper._connection_pools[name]
    assert pool.get_stats()["pool_size"] == 2
    assert by_name(pg, "warm1") == 2


def test_warmup_fails_fast_when_unreachable(make_alias: Callable[..., str]) -> None:
    name = make_alias(HOST="127.0.0.1", PORT=closed_port(), OPTIONS={"warmup": 1})
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as info:
        apps.get_app_config("django_asyncpool").ready()
    assert time.monotonic() - started < 3
    message = str(info.value)
    assert f"'{name}'" in message and "OPTIONS['warmup'] = 1s" in message
    assert "Connection refused" in message or "connection failed" in message
    assert PASSWORD not in message
    assert name not in DatabaseWrapper._connection_pools  # nothing half-open left behind


def test_async_warmup_fails_as_the_sync_one(make_alias: Callable[..., str]) -> None:
    name = make_alias(
        HOST="127.0.0.1", PORT=closed_port(), OPTIONS={"warmup": 1, "retry": {"max_tries": 1}}
    )
    with pytest.raises(DatabaseUnavailable) as info:
        asyncio.run(warm_up_async())
    message = str(info.value)
    assert f"'{name}'" in message and "OPTIONS['warmup'] = 1s" in message
    assert PASSWORD not in message


@pytest.mark.parametrize("side", ["sync", "async"])
def test_a_warmup_refused_by_the_server_stops_at_once_in_its_words(
    make_alias: Callable[..., str], side: str
) -> None:
    # An unknown database: a retry cannot fix it, so the warm-up does not wait its 10 s.
    name = make_alias(NAME="no_such_db", OPTIONS={"warmup": 10})
    started = time.monotonic()
    with pytest.raises(ConfigurationFault) as info:
        if side == "sync":
            apps.get_app_config("django_asyncpool").ready()
        else:
            asyncio.run(warm_up_async())
    assert time.monotonic() - started < 3
    assert 'database "no_such_db" does not exist' in str(info.value)
    assert info.value.sqlstate == "3D000" and info.value.alias == name
    assert PASSWORD not in str(info.value)
    assert name not in DatabaseWrapper._connection_pools  # nothing half-open left behind


class Server:
    """uvicorn serving Django (wrapped in PoolLifespan) in a thread, lifespan on."""

    def __init__(self) -> None:
        app = PoolLifespan(get_asgi_application())
        config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="error")
        self.server = uvicorn.Server(config)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException as exc:  # uvicorn exits on a failed startup: keep it
            self.error = exc

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        gc.unfreeze()  # the startup froze the test process's objects: collectable again


def test_lifespan_warms_up_and_closes_the_pools(
    make_alias: Callable[..., str], pg: LocalPostgres
) -> None:
    name = make_alias(OPTIONS={"pool": {"min_size": 1}, "warmup": 5, "application_name": "life1"})
    server = Server()
    try:
        assert wait_until(lambda: server.server.started, 10)
        # The warm-up opened an async connection on the server's event loop.
        assert by_name(pg, "life1") == 1
        apps.get_app_config("django_asyncpool").ready()  # the sync pool's warm-up
        assert by_name(pg, "life1") == 2
    finally:
        server.stop()
    assert not server.thread.is_alive()
    # Lifespan shutdown closed both: the server sees no connection of that alias.
    assert wait_until(lambda: by_name(pg, "life1") == 0, 5)
    assert name not in DatabaseWrapper._connection_pools


@pytest.mark.parametrize("freeze", [True, False])
def test_lifespan_startup_freezes_what_the_process_holds(freeze: bool) -> None:
    gc.unfreeze()
    with override_settings(ASYNCPOOL_GC_FREEZE=freeze):
        server = Server()
        try:
            assert wait_until(lambda: server.server.started, 10)
            frozen = gc.get_freeze_count()
        finally:
            server.stop()
    # Django and the drivers left out of the full collections, or not at all.
    assert frozen > 10_000 if freeze else frozen == 0
    assert gc.get_freeze_count() == 0


def test_lifespan_startup_fails_when_warmup_cannot_connect(make_alias: Callable[..., str]) -> None:
    make_alias(
        HOST="127.0.0.1", PORT=closed_port(), OPTIONS={"warmup": 2, "retry": {"max_tries": 1}}
    )
    started = time.monotonic()
    server = Server()
    server.thread.join(10)
    assert not server.thread.is_alive()
    assert not server.server.started  # uvicorn refused to serve
    assert isinstance(server.error, SystemExit), server.error
    assert time.monotonic() - started < 5


def test_a_failed_warmup_stops_startup_but_not_the_diagnostics(tmp_path: Path) -> None:
    port = closed_port()
    (tmp_path / "warm_settings.py").write_text(
        "from testproject.settings import *  # noqa: F403\n"
        "DATABASES = {'default': {**DATABASES['default'], 'HOST': '127.0.0.1', "
        f"'PORT': {port}, 'OPTIONS': {{'warmup': 1}}}}}}\n"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "warm_settings",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )

    started = time.monotonic()
    serving = run("-c", "import django; django.setup()")
    assert serving.returncode == 1
    assert "DatabaseUnavailable" in serving.stderr and "OPTIONS['warmup'] = 1s" in serving.stderr
    assert time.monotonic() - started < 15
    diagnosing = run("manage.py", "dbpool_check", "--timeout", "5")
    assert diagnosing.returncode == 1, diagnosing.stderr  # a report, not a crash at startup
    assert "default  sync   FAILED" in diagnosing.stdout
