"""Where each setting comes from: DATABASES[alias] over the guide's environment variables."""

from __future__ import annotations

import pytest

from django_asyncpool.config import AliasConfig, AsyncPoolConfig, from_settings

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


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "mysql"])
def test_database_url_must_be_asyncpg(scheme: str) -> None:
    config = from_settings("default", {}, environ={"DATABASE_URL": f"{scheme}://u:secret@h/db"})
    assert [p.id for p in config.problems] == ["dbpool.E006"]
    assert "secret" not in repr(config.problems)


def test_repr_hides_the_password() -> None:
    config = from_settings("default", BASE, environ={})
    assert "pw" not in repr(config) and "pw" not in config.describe()
    assert isinstance(config, AliasConfig) and config.describe() == "'default' (app@db:5432/app)"


def test_django_pool_check_option_is_known() -> None:
    def check(conn: object) -> None:
        return None

    config = from_settings("default", {**BASE, "OPTIONS": {"pool": {"check": check}}}, environ={})
    assert config.problems == ()
    assert "check" not in (config.sync_pool or {})  # the ENGINE hands it to the pool itself
