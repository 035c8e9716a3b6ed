"""ENGINE django_asyncpool as a drop-in for Django's postgresql backend, on a real server."""

from __future__ import annotations

import threading

import pytest
from asgiref.sync import async_to_sync
from django.db import IntegrityError, connection, connections, transaction

from testproject.shop.models import Product

# The router (testproject/routers.py) sends the shop's reads to "replica".
pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "replica"])


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("select pg_backend_pid()")
        return int(cursor.fetchone()[0])


def test_engine_keeps_the_postgresql_vendor() -> None:
    assert connection.vendor == "postgresql"
    assert type(connections["default"]).__module__ == "django_asyncpool.base"


def test_orm_crud() -> None:
    p = Product.objects.create(sku="A1", name="Apple", price_cents=120)
    assert Product.objects.get(pk=p.pk).name == "Apple"
    Product.objects.filter(pk=p.pk).update(price_cents=150)
    p.refresh_from_db()
    assert p.price_cents == 150
    p.delete()
    assert not Product.objects.filter(sku="A1").exists()


def test_atomic_rolls_back_and_commits() -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        Product.objects.create(sku="R1", name="rolled back", price_cents=1)
        raise RuntimeError("boom")
    assert not Product.objects.filter(sku="R1").exists()
    with transaction.atomic():
        Product.objects.create(sku="C1", name="committed", price_cents=1)
        with pytest.raises(IntegrityError), transaction.atomic():
            Product.objects.create(sku="C1", name="duplicate", price_cents=1)
    assert Product.objects.filter(sku="C1").count() == 1


def test_async_orm_aget() -> None:
    """The async ORM, run the way Django's handlers run it (thread-sensitive hop)."""

    async def view() -> str:
        p = await Product.objects.acreate(sku="AS1", name="async", price_cents=5)
        return (await Product.objects.aget(pk=p.pk)).sku

    assert async_to_sync(view)() == "AS1"


def test_pool_reuses_connections_across_requests(make_wrapper) -> None:
    """Closing the Django connection returns it to the pool: same backend next time."""
    wrapper = make_wrapper(OPTIONS={"pool": {"min_size": 1, "max_size": 1}})
    pids = set()
    for _ in range(5):
        with wrapper.cursor() as cursor:
            cursor.execute("select pg_backend_pid()")
            pids.add(cursor.fetchone()[0])
        wrapper.close()  # what Django does at the end of each request
    assert len(pids) == 1
    assert wrapper.pool is not None
    assert wrapper.pool.get_stats()["connections_num"] == 1


def test_each_thread_gets_its_own_pooled_connection() -> None:
    pids: list[int] = []

    def work() -> None:
        pids.append(backend_pid())
        connections.close_all()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(pids) == 4
    assert connection.pool is not None
    assert connection.pool.get_stats()["pool_size"] <= 10


def test_pool_false_turns_pooling_off(make_wrapper) -> None:
    wrapper = make_wrapper(OPTIONS={"pool": False})
    assert wrapper.pool is None
    with wrapper.cursor() as cursor:
        cursor.execute("select 1")
        assert cursor.fetchone() == (1,)


def test_our_option_keys_never_reach_psycopg(make_wrapper) -> None:
    wrapper = make_wrapper(
        OPTIONS={
            "pool": {"min_size": 0, "max_size": 2},
            "circuit_breaker": {"fail_max": 2},
            "retry": {"max_tries": 1},
            "async_pool": {"pool_size": 2},
            "application_name": "asyncpool-test",
            "no_such_option": 1,
        }
    )
    params = wrapper.get_connection_params()
    assert not {"circuit_breaker", "retry", "async_pool", "pool", "no_such_option"} & set(params)
    assert params["application_name"] == "asyncpool-test"
    with wrapper.cursor() as cursor:
        cursor.execute("select current_setting('application_name')")
        assert cursor.fetchone() == ("asyncpool-test",)


def test_unknown_option_is_reported(make_wrapper, caplog) -> None:
    wrapper = make_wrapper(OPTIONS={"pool": {"min_size": 0, "max_sizee": 3}, "sslmdoe": "x"})
    with caplog.at_level("WARNING", logger="django_asyncpool"):
        wrapper.get_connection_params()
    text = caplog.text
    assert "max_sizee" in text and "sslmdoe" in text
    assert "dbpool.E004" in text


def test_pools_are_closed_at_process_exit(tmp_path) -> None:
    """A process that used the pool closes it on the way out (the server sees clean goodbyes)."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "child.py"
    script.write_text(
        "import atexit, json, os, sys\n"
        "seen = {}\n"
        # registered first, so it runs last: after django_asyncpool's own exit handler
        "atexit.register(lambda: print(json.dumps({a: p.closed for a, p in seen.items()})))\n"
        "import django; django.setup()\n"
        "from django.db import connection\n"
        "from django_asyncpool.base import DatabaseWrapper\n"
        "connection.ensure_connection(); connection.close()\n"
        "seen.update(DatabaseWrapper._connection_pools)\n"
    )
    # DATABASE_URL (set by the settings) points the child at this run's server.
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "PYTHONPATH": os.getcwd(),
    }
    out = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.getcwd(),
        check=True,
    ).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {"default": True}


def test_database_url_fills_a_copy_not_the_users_settings(monkeypatch, pg) -> None:
    """The wrapper's settings come from DATABASE_URL; settings.DATABASES[alias] is unchanged."""
    import copy

    from django.db.utils import ConnectionHandler

    from django_asyncpool.base import DatabaseWrapper
    from django_asyncpool.core import registry as _registry

    monkeypatch.setenv("DATABASE_URL", "postgresql://u:pw@db.example:6543/from_url")
    given = {"ENGINE": "django_asyncpool", "OPTIONS": {"application_name": "web"}}
    user = ConnectionHandler().configure_settings({"default": copy.deepcopy(given)})["default"]
    before = copy.deepcopy(user)
    try:
        wrapper = DatabaseWrapper(user, alias="u1")
        assert user == before  # the user's dict (settings.DATABASES[alias]) is not touched
        assert wrapper.settings_dict is not user
        assert wrapper.settings_dict["HOST"] == "db.example"
        assert wrapper.settings_dict["NAME"] == "from_url"
        assert wrapper.settings_dict["OPTIONS"]["application_name"] == "web"
        # The test runner then names the test database on the user's dict (and on the
        # wrapper's): a wrapper another thread builds from it still takes the URL's host.
        user["NAME"] = wrapper.settings_dict["NAME"] = "test_from_url"
        other = DatabaseWrapper(user, alias="u1")
        assert other.settings_dict["NAME"] == "test_from_url"
        assert (other.settings_dict["HOST"], other.settings_dict["PORT"]) == ("db.example", 6543)
        assert other.settings_dict["USER"] == "u" and other.settings_dict["PASSWORD"] == "pw"
    finally:
        _registry.reset("u1")


def test_test_databases_are_created_from_database_url_alone(tmp_path, pg) -> None:
    """Django's test runner with only DATABASE_URL: the test database is made, used by
    another thread, and dropped."""
    import os
    import subprocess
    import sys

    from testproject.settings import DATABASES

    d = DATABASES["default"]
    url = f"postgresql://{d['USER']}:{d['PASSWORD']}@{d['HOST']}:{d['PORT']}/{d['NAME']}"
    (tmp_path / "urlonly_settings.py").write_text(
        "from testproject.settings import *\n"
        # A name of its own: never the test database of the session running this test.
        "DATABASES = {'default': {'ENGINE': 'django_asyncpool', "
        f"'TEST': {{'NAME': 'test_urlonly_{os.getpid()}'}}}}}}\n"
    )
    code = (
        "import threading, django; django.setup()\n"
        "from django.conf import settings\n"
        "from django.db import connection, connections\n"
        "from django.test.utils import setup_databases, teardown_databases\n"
        "user = settings.DATABASES['default']\n"
        "assert 'HOST' not in user or not user['HOST'], user\n"
        "old = setup_databases(verbosity=0, interactive=False)\n"
        "seen = []\n"
        "def other():\n"
        "    with connections['default'].cursor() as c:\n"
        "        c.execute('select current_database()'); seen.append(c.fetchone()[0])\n"
        "    connections.close_all()\n"
        "t = threading.Thread(target=other); t.start(); t.join()\n"
        "with connection.cursor() as c:\n"
        "    c.execute('select current_database()'); mine = c.fetchone()[0]\n"
        "assert seen == [mine] and mine.startswith('test_'), (seen, mine)\n"
        "import asyncio\n"
        "from django_asyncpool import ConnectionPool\n"
        "async def on_async_pool():\n"
        "    async with ConnectionPool().connection() as conn:\n"
        "        return await conn.fetchval('select current_database()')\n"
        "assert asyncio.run(on_async_pool()) == mine\n"  # the URL's server, its test database
        "teardown_databases(old, verbosity=0)\n"
        "print('ok', mine)\n"
    )
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "DJANGO_SETTINGS_MODULE": "urlonly_settings",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()]),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok test_")


def test_async_orm_is_installed_by_the_engine_alone(tmp_path) -> None:
    """OPTIONS["async_orm"] works without the app in INSTALLED_APPS: building the
    alias's wrapper installs the native async ORM (the ENGINE never imports it)."""
    import os
    import subprocess
    import sys

    (tmp_path / "engine_only_settings.py").write_text(
        "from testproject.settings import *\n"
        "INSTALLED_APPS = [a for a in INSTALLED_APPS if a != 'django_asyncpool']\n"
        "DATABASES['default']['OPTIONS'] = {**DATABASES['default'].get('OPTIONS', {}), "
        "'async_orm': True}\n"
    )
    code = (
        "import sys, django; django.setup()\n"
        "from django.db import connection\n"
        "from django.db.models import query\n"
        "from django.apps import apps\n"
        "assert not apps.is_installed('django_asyncpool')\n"
        "connection.settings_dict  # builds the wrapper\n"
        "from django_asyncpool.orm import native as _asyncorm\n"
        "assert query.QuerySet.aget is not _asyncorm._ORIGINALS['aget']\n"
        "print('ok')\n"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "engine_only_settings",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()]),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
