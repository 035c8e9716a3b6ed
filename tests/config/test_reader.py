"""Where each setting comes from: DATABASES[alias] over the guide's environment variables."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.db.utils import ConnectionHandler
from sqlalchemy import text

from django_asyncpool import session_scope
from django_asyncpool.base import DatabaseWrapper
from django_asyncpool.config import (
    ENGINE,
    AliasConfig,
    AsyncPoolConfig,
    InvalidURL,
    from_settings,
    parse_url,
    refuse_unusable,
)
from django_asyncpool.sqla.engines import connect_kwargs
from testproject import pgserver

from ..conftest import closed_port

BASE = {"NAME": "app", "USER": "app", "PASSWORD": "pw", "HOST": "db", "PORT": 5432}
ENV = {
    "DB_POOL_SIZE": "20",
    "DB_MAX_OVERFLOW": "7",
    "DB_POOL_RECYCLE": "600",
    "DB_POOL_TIMEOUT": "3.5",
    "SQL_ECHO": "true",
}


def test_defaults_are_written_in_their_units() -> None:
    config = from_settings("default", BASE, environ={})
    assert config.async_pool == AsyncPoolConfig()
    assert (config.async_pool.pool_size, config.async_pool.recycle) == (10, 1800.0)
    assert config.sync_pool == {"min_size": 2, "max_size": 10, "timeout": 10.0}
    assert config.problems == ()


def test_environment_fills_what_settings_leave_out() -> None:
    config = from_settings("default", BASE, environ=ENV)
    assert config.async_pool == AsyncPoolConfig(
        pool_size=20, max_overflow=7, recycle=600.0, timeout=3.5, echo=True
    )


def test_settings_win_over_the_environment() -> None:
    given = {**BASE, "OPTIONS": {"async_pool": {"pool_size": 4, "echo": False}}}
    config = from_settings("default", given, environ=ENV)
    assert (config.async_pool.pool_size, config.async_pool.echo) == (4, False)
    assert config.async_pool.max_overflow == 7  # not given in settings: from the environment


def test_database_url_fills_connection_fields_only_when_the_alias_names_none() -> None:
    url = "postgresql+asyncpg://u:p%40ss@pg.example:6543/shop?sslmode=require"
    config = from_settings(
        "default", {"OPTIONS": {"application_name": "web"}}, environ={"DATABASE_URL": url}
    )
    assert (config.user, config.password, config.host, config.port, config.dbname) == (
        "u",
        "p@ss",
        "pg.example",
        6543,
        "shop",
    )
    assert config.params == {"sslmode": "require", "application_name": "web"}
    assert config.problems == ()
    named = from_settings("default", BASE, environ={"DATABASE_URL": url})
    assert named.host == "db"  # the alias's own fields win


# -- DATABASE_URL: every form, read alike by the ENGINE and by from_settings ------------------

PW = "s3cr%t/pw@x"  # as percent-encoded in the URLs below
# (id, URL, Django's fields parse_url returns, asyncpg's connect() keywords they become)
URLS: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    (
        "unix socket (SQLAlchemy's, Cloud SQL's)",
        "postgresql+asyncpg://app@/shop?host=/cloudsql/project:region:db",
        {"NAME": "shop", "USER": "app", "HOST": "/cloudsql/project:region:db", "PORT": None},
        {"host": "/cloudsql/project:region:db", "database": "shop", "user": "app"},
    ),
    (
        "unix socket, port in the query",
        "postgresql://app@/shop?host=/run/pg&port=5433",
        {"HOST": "/run/pg", "PORT": 5433},
        {"host": "/run/pg", "port": 5433},
    ),
    (
        "unix socket, port in the authority",
        "postgresql://app@:5433/shop?host=/run/pg",
        {"HOST": "/run/pg", "PORT": 5433},
        {"host": "/run/pg", "port": 5433},
    ),
    (
        "postgres://",
        "postgres://app:pw@db.example:6543/shop",
        {"NAME": "shop", "USER": "app", "PASSWORD": "pw", "HOST": "db.example", "PORT": 6543},
        {"host": "db.example", "port": 6543, "user": "app", "password": "pw"},
    ),
    (
        "postgresql://",
        "postgresql://app:pw@db.example/shop",
        {"HOST": "db.example", "PORT": None, "OPTIONS": {}},
        {"host": "db.example", "database": "shop"},
    ),
    (
        "postgresql+psycopg://",
        "postgresql+psycopg://app:pw@db.example/shop",
        {"HOST": "db.example", "NAME": "shop"},
        {"host": "db.example", "database": "shop"},
    ),
    (
        "postgresql+asyncpg://",
        "postgresql+asyncpg://app:pw@db.example/shop",
        {"HOST": "db.example", "NAME": "shop"},
        {"host": "db.example", "database": "shop"},
    ),
    (
        "sslmode",
        "postgresql://app@db.example/shop?sslmode=verify-full&sslrootcert=/etc/ca%2B1.pem",
        {"OPTIONS": {"sslmode": "verify-full", "sslrootcert": "/etc/ca+1.pem"}},
        {"dsn": "postgresql://?sslmode=verify-full&sslrootcert=/etc/ca%2B1.pem"},
    ),
    (
        "ssl (asyncpg's spelling)",
        "postgresql+asyncpg://app@db.example/shop?ssl=require",
        {"OPTIONS": {"sslmode": "require"}},
        {"dsn": "postgresql://?sslmode=require"},
    ),
    (
        "percent-encoded user, password, database",
        "postgresql://us%40er:s3cr%25t%2Fpw%40x@db.example/my%20shop",
        {"USER": "us@er", "PASSWORD": "s3cr%t/pw@x", "NAME": "my shop"},
        {"user": "us@er", "password": "s3cr%t/pw@x", "database": "my shop"},
    ),
    (
        "IPv6 with a port",
        "postgresql://app@[::1]:5433/shop",
        {"HOST": "::1", "PORT": 5433},
        {"host": "::1", "port": 5433},
    ),
    (
        "IPv6",
        "postgresql://app@[2001:db8::7]/shop",
        {"HOST": "2001:db8::7", "PORT": None},
        {"host": "2001:db8::7"},
    ),
    (
        "several hosts, host:port each",
        "postgresql://app@/shop?host=pg1:5432&host=pg2:5433",
        {"HOST": "pg1,pg2", "PORT": "5432,5433"},
        {"host": ["pg1", "pg2"], "port": [5432, 5433]},
    ),
    (
        "several hosts, comma-separated",
        "postgresql://app@/shop?host=pg1,pg2&port=5432,5433&target_session_attrs=read-write",
        {"HOST": "pg1,pg2", "PORT": "5432,5433"},
        {"host": ["pg1", "pg2"], "dsn": "postgresql://?target_session_attrs=read-write"},
    ),
    (
        "libpq options",
        "postgresql://app@db/shop?application_name=from-url&connect_timeout=3",
        {"OPTIONS": {"application_name": "from-url", "connect_timeout": "3"}},
        {"timeout": 3.0},
    ),
]
URL_IDS = [case[0] for case in URLS]


@pytest.mark.parametrize(("url", "fields", "asyncpg"), [c[1:] for c in URLS], ids=URL_IDS)
def test_parse_url_reads_each_form(url: str, fields: dict[str, Any], asyncpg: Any) -> None:
    parsed = parse_url(url)
    assert set(parsed) == {"NAME", "USER", "PASSWORD", "HOST", "PORT", "OPTIONS"}
    assert {key: parsed[key] for key in fields} == fields


@pytest.mark.parametrize(("url", "fields", "asyncpg"), [c[1:] for c in URLS], ids=URL_IDS)
def test_the_engine_and_from_settings_read_database_url_alike(
    url: str, fields: dict[str, Any], asyncpg: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    given = {"ENGINE": "django_asyncpool", "OPTIONS": {"application_name": "web"}}
    expected = from_settings("u", given, environ={"DATABASE_URL": url})
    assert expected.problems == ()
    # The ENGINE applies DATABASE_URL to the alias's settings when it is made.
    monkeypatch.setenv("DATABASE_URL", url)
    settings_dict = ConnectionHandler().configure_settings({"default": copy.deepcopy(given)})
    wrapper = DatabaseWrapper(settings_dict["default"], alias="u")
    assert from_settings("u", wrapper.settings_dict, environ={}) == expected
    # The sync side: what psycopg is given.
    params = wrapper.get_connection_params()
    libpq = {"NAME": "dbname", "USER": "user", "PASSWORD": "password", "HOST": "host"}
    want = {libpq.get(key, key.lower()): value for key, value in fields.items() if value}
    # The URL's query options are connection parameters; the alias's own OPTIONS win.
    want.update({**want.pop("options", {}), "application_name": "web"})
    assert {key: params.get(key) for key in want} == want
    # The async side: what asyncpg.connect() is given.
    kwargs = connect_kwargs(expected)
    assert {key: kwargs.get(key) for key in asyncpg} == asyncpg
    assert kwargs["server_settings"]["application_name"] == "web"


# (id, URL with the password PW, what the message must say)
BAD_URLS = [
    ("not PostgreSQL", "mysql://app:s3cr%25t%2Fpw%40x@db/shop", "got mysql://"),
    ("no scheme", "app:s3cr%25t%2Fpw%40x@db/shop", "is not a URL"),
    ("port not a number", "postgresql://app:s3cr%25t%2Fpw%40x@db:pg/shop", "port"),
    ("@ not encoded", "postgresql://app:s3cr%t/pw@x@db/shop", "%40"),
    ("ssl=true", "postgresql://app:s3cr%25t%2Fpw%40x@db/shop?ssl=true", "sslmode=require"),
    (
        "ssl and sslmode differ",
        "postgresql://app:s3cr%25t%2Fpw%40x@db/shop?ssl=require&sslmode=disable",
        "Keep only sslmode",
    ),
    (
        "hosts and ports differ",
        "postgresql://app:s3cr%25t%2Fpw%40x@/shop?host=a,b&port=1,2,3",
        "number of hosts and ports",
    ),
    (
        "a parameter twice",
        "postgresql://app:s3cr%25t%2Fpw%40x@db/shop?options=-c%20a%3D1&options=-c%20b%3D2",
        "'options' 2 times",
    ),
]


@pytest.mark.parametrize(("url", "says"), [c[1:] for c in BAD_URLS], ids=[c[0] for c in BAD_URLS])
def test_an_unusable_database_url_says_what_to_do(
    url: str, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InvalidURL) as raised:
        parse_url(url)
    assert says in str(raised.value)
    assert raised.value.hint and str(raised.value).endswith(raised.value.hint)  # what to do
    for secret in (PW, "s3cr%25t%2Fpw%40x", "s3cr%t/pw@x"):
        assert secret not in str(raised.value)
    # A system check problem (dbpool.E006), and nothing of the URL is used...
    config = from_settings("u", {}, environ={"DATABASE_URL": url})
    assert [p.id for p in config.problems] == ["dbpool.E006"]
    assert (config.host, config.user, config.password) == ("", "", "")
    assert PW not in repr(config.problems)
    # dbpool_check's target names the URL, not a server it would make up.
    assert config.describe() == "'u' (DATABASE_URL cannot be used, dbpool.E006)"
    # ...and the ENGINE refuses to connect with it, with the same words.
    monkeypatch.setenv("DATABASE_URL", url)
    settings_dict = ConnectionHandler().configure_settings({"default": {"ENGINE": ENGINE}})
    wrapper = DatabaseWrapper(settings_dict["default"], alias="u")
    with pytest.raises(ImproperlyConfigured, match="DATABASE_URL") as refused:
        wrapper.get_connection_params()
    assert says in str(refused.value) and PW not in str(refused.value)


def test_repr_hides_the_password() -> None:
    config = from_settings("default", BASE, environ={})
    assert "pw" not in repr(config) and "pw" not in config.describe()
    assert isinstance(config, AliasConfig) and config.describe() == "'default' (app@db:5432/app)"


@pytest.mark.parametrize(
    ("host", "port", "shown"),
    [
        ("pg1,pg2", "5432,5433", "pg1:5432,pg2:5433"),
        ("pg1,pg2", 5432, "pg1:5432,pg2:5432"),
        ("pg1, pg2", None, "pg1,pg2"),
        ("pg1,pg2", "1,2,3", "pg1,pg2:1,2,3"),  # libpq refuses it: shown as given
    ],
)
def test_describe_gives_each_host_its_port(host: str, port: Any, shown: str) -> None:
    config = from_settings("default", {**BASE, "HOST": host, "PORT": port}, environ={})
    assert config.describe() == f"'default' (app@{shown}/app)"


def test_django_pool_check_option_is_known() -> None:
    def check(conn: object) -> None:
        return None

    config = from_settings("default", {**BASE, "OPTIONS": {"pool": {"check": check}}}, environ={})
    assert config.problems == ()
    assert "check" not in (config.sync_pool or {})  # the ENGINE hands it to the pool itself


# -- against the server: the URL's hosts reach both pools --------------------------------------


def _url(form: str, pg: pgserver.LocalPostgres) -> str:
    if form == "unix socket":  # trust authentication there: no password, as on Cloud SQL
        return f"postgresql+asyncpg://{pg.user}@/postgres?host={pg.socket_dir}&port={pg.port}"
    # Two hosts, the first refusing connections: libpq and asyncpg both go on to the next.
    password = quote(pg.password, safe="")
    hosts = f"host=127.0.0.1:{closed_port()}&host={pg.host}:{pg.port}"
    return f"postgres://{pg.user}:{password}@/postgres?{hosts}&application_name=from-url"


@pytest.mark.parametrize("form", ["unix socket", "several hosts"])
def test_database_url_hosts_reach_both_pools(
    form: str,
    pg: pgserver.LocalPostgres,
    make_alias: Callable[..., str],
    db_access: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", _url(form, pg))
    # No connection fields of its own: DATABASE_URL gives them all.
    alias = make_alias(
        **dict.fromkeys(("NAME", "USER", "PASSWORD", "HOST", "PORT"), ""),
        OPTIONS={"pool": {"min_size": 0, "max_size": 1}, "async_pool": {"pool_size": 1}},
    )
    sql = (
        "select inet_server_addr() is null, current_database(), current_setting('application_name')"
    )

    def sync_side() -> tuple[Any, ...]:
        with connections[alias].cursor() as cursor:
            cursor.execute(sql)
            return tuple(cursor.fetchone())

    async def async_side() -> tuple[Any, ...]:
        async with session_scope(using=alias) as session:
            return tuple((await session.execute(text(sql))).one())

    over_socket = form == "unix socket"
    name = "" if over_socket else "from-url"
    assert sync_side() == (over_socket, "postgres", name)
    assert asyncio.run(async_side()) == (over_socket, "postgres", name)


def test_an_unusable_database_url_is_refused_by_both_pools(
    make_alias: Callable[..., str], monkeypatch: pytest.MonkeyPatch, django_db_blocker: Any
) -> None:
    monkeypatch.setenv("DATABASE_URL", "mysql://app:s3cr%25t%2Fpw%40x@db/shop")
    alias = make_alias(**dict.fromkeys(("NAME", "USER", "PASSWORD", "HOST", "PORT"), ""))

    async def async_side() -> None:
        async with session_scope(using=alias) as session:
            await session.execute(text("select 1"))

    def sync_side() -> None:
        connections[alias].ensure_connection()

    for side in (sync_side, lambda: asyncio.run(async_side())):
        with (
            django_db_blocker.unblock(),
            pytest.raises(ImproperlyConfigured, match="DATABASE_URL must start with") as refused,
        ):
            side()
        assert PW not in str(refused.value) and "s3cr" not in str(refused.value)


@pytest.mark.parametrize(
    ("given", "problem", "passed"),
    [
        ({"max_idle": 0}, "dbpool.E003", 600.0),  # psycopg_pool's own default
        ({"max_waiting": -1}, "dbpool.E003", 0),
        ({"num_workers": "a"}, "dbpool.E002", 3),
        ({"max_lifetime": "60"}, None, 60.0),  # coerced, as from the environment
    ],
)
def test_psycopg_pool_keys_are_checked_and_never_passed_on_invalid(
    given: dict[str, Any], problem: str | None, passed: Any
) -> None:
    config = from_settings(
        "x", {"ENGINE": "django_asyncpool", "NAME": "n", "OPTIONS": {"pool": given}}
    )
    (key,) = given
    assert config.sync_pool is not None and config.sync_pool[key] == passed
    assert [p.id for p in config.problems] == ([problem] if problem else [])


def test_every_problem_id_is_in_the_one_table() -> None:
    from django_asyncpool.config import rules

    ids = [v for k, v in vars(rules).items() if k.isupper() and isinstance(v, str)]
    ids = [i for i in ids if i.startswith("dbpool.")]
    assert sorted(ids) == sorted(rules.PROBLEMS)
    assert {
        "dbpool.E004", "dbpool.E006", "dbpool.E009", "dbpool.E010", "dbpool.E020",
        "dbpool.E041", "dbpool.E042", "dbpool.E043",
    } == rules.NO_DEFAULT  # fmt: skip


@pytest.mark.parametrize(
    ("host", "port", "attrs", "where"),
    [
        ("pg1,pg2,pg3", "5432,5433", None, "PORT lists 2 ports for 3 hosts"),
        ("pg1,pg2", "5432", "master", "'master', which no driver knows"),
    ],
)
def test_hosts_and_session_attrs_no_driver_can_use_are_refused(
    host: str, port: str, attrs: str | None, where: str
) -> None:
    options = {} if attrs is None else {"target_session_attrs": attrs}
    config = from_settings(
        "x", {"ENGINE": "django_asyncpool", "HOST": host, "PORT": port, "OPTIONS": options}
    )
    assert [p.id for p in config.problems] == ["dbpool.E010"]
    with pytest.raises(ImproperlyConfigured, match=where):
        refuse_unusable(config)


@pytest.mark.parametrize("attrs", ["any", "read-write", "read-only", "primary", "standby"])
def test_several_hosts_with_one_port_or_one_each_are_fine(attrs: str) -> None:
    for port in ("5432", "5432,5433"):
        config = from_settings(
            "x",
            {
                "ENGINE": "django_asyncpool",
                "HOST": "pg1,pg2",
                "PORT": port,
                "OPTIONS": {"target_session_attrs": attrs},
            },
        )
        assert config.problems == ()
        assert config.params["target_session_attrs"] == attrs
