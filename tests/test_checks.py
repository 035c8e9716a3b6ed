"""System checks: every bad configuration has its id, an error in production, a warning in DEBUG."""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connections
from django.test import override_settings

from django_asyncpool import config as _config
from django_asyncpool.checks import NO_DEFAULT, TAG, problems, to_message
from django_asyncpool.core import registry as _registry

PASSWORD = "s3cret-pw-never-shown"
BASE = {"ENGINE": "django_asyncpool", "NAME": "app", "USER": "app", "PASSWORD": PASSWORD}


def opts(**options: Any) -> dict[str, Any]:
    return {**BASE, "OPTIONS": options}


# (name, settings of alias 'main', environment, expected id, text the message must show)
CASES: list[tuple[str, dict[str, Any], dict[str, str], str, str]] = [
    ("async_pool not a dict", opts(async_pool=[10]), {}, "dbpool.E001", "list"),
    ("pool not a dict", opts(pool="yes"), {}, "dbpool.E001", "str"),
    ("breaker not a dict", opts(circuit_breaker=5), {}, "dbpool.E001", "int"),
    ("retry not a dict", opts(retry="3"), {}, "dbpool.E001", "str"),
    ("pool_size a word", opts(async_pool={"pool_size": "ten"}), {}, "dbpool.E002", "'ten'"),
    ("pool_size a fraction", opts(async_pool={"pool_size": 2.5}), {}, "dbpool.E002", "2.5"),
    ("pool_size zero", opts(async_pool={"pool_size": 0}), {}, "dbpool.E003", "got 0"),
    ("pool_size negative", opts(async_pool={"pool_size": -3}), {}, "dbpool.E003", "-3"),
    ("overflow negative", opts(async_pool={"max_overflow": -1}), {}, "dbpool.E003", "-1"),
    ("recycle zero", opts(async_pool={"recycle": 0}), {}, "dbpool.E003", "got 0"),
    ("async timeout negative", opts(async_pool={"timeout": -5}), {}, "dbpool.E003", "-5"),
    ("echo not a bool", opts(async_pool={"echo": "loud"}), {}, "dbpool.E002", "'loud'"),
    ("sync min_size negative", opts(pool={"min_size": -1}), {}, "dbpool.E003", "-1"),
    ("sync max_size zero", opts(pool={"max_size": 0}), {}, "dbpool.E003", "got 0"),
    ("sync timeout zero", opts(pool={"timeout": 0}), {}, "dbpool.E003", "got 0"),
    ("sync timeout a word", opts(pool={"timeout": "soon"}), {}, "dbpool.E002", "'soon'"),
    ("min_size > max_size", opts(pool={"min_size": 5, "max_size": 2}), {}, "dbpool.E005", "(5)"),
    ("pool key typo", opts(pool={"max_sise": 5}), {}, "dbpool.E004", "'max_sise'"),
    ("async key typo", opts(async_pool={"pool_sise": 5}), {}, "dbpool.E004", "'pool_sise'"),
    ("retry key typo", opts(retry={"tries": 5}), {}, "dbpool.E004", "'tries'"),
    ("section typo", opts(circuit_braker={}), {}, "dbpool.E004", "'circuit_braker'"),
    ("fail_max zero", opts(circuit_breaker={"fail_max": 0}), {}, "dbpool.E003", "got 0"),
    (
        "reset_timeout negative",
        opts(circuit_breaker={"reset_timeout": -1}),
        {},
        "dbpool.E003",
        "-1",
    ),
    (
        "count_pool_timeouts not a bool",
        opts(circuit_breaker={"count_pool_timeouts": "sometimes"}),
        {},
        "dbpool.E002",
        "'sometimes'",
    ),
    ("max_tries zero", opts(retry={"max_tries": 0}), {}, "dbpool.E003", "got 0"),
    ("max_time zero", opts(retry={"max_time": 0}), {}, "dbpool.E003", "got 0"),
    ("max_delay zero", opts(retry={"max_delay": 0}), {}, "dbpool.E003", "got 0"),
    ("base_delay > max_delay", opts(retry={"base_delay": 5}), {}, "dbpool.E008", "(5s)"),
    ("CONN_MAX_AGE with a pool", {**BASE, "CONN_MAX_AGE": 60}, {}, "dbpool.E007", "60"),
    ("CONN_MAX_AGE None", {**BASE, "CONN_MAX_AGE": None}, {}, "dbpool.E007", "None"),
    ("leak_threshold zero", opts(leak_threshold=0), {}, "dbpool.E003", "got 0"),
    ("liveness_bypass negative", opts(liveness_bypass=-1), {}, "dbpool.E003", "-1"),
    ("pgbouncer not a bool", opts(pgbouncer="maybe"), {}, "dbpool.E002", "'maybe'"),
    ("warmup negative", opts(warmup=-1), {}, "dbpool.E003", "-1"),
    ("warmup a word", opts(warmup="soon"), {}, "dbpool.E002", "'soon'"),
    (
        "DATABASE_URL not PostgreSQL",
        {"ENGINE": "django_asyncpool"},
        {"DATABASE_URL": f"mysql://app:{PASSWORD}@db/app"},
        "dbpool.E006",
        "mysql://",
    ),
    (
        "DATABASE_URL not a URL",
        {"ENGINE": "django_asyncpool"},
        {"DATABASE_URL": f"app:{PASSWORD}@db"},
        "dbpool.E006",
        "not a URL",
    ),
    (
        "DATABASE_URL ssl not a mode",
        {"ENGINE": "django_asyncpool"},
        {"DATABASE_URL": f"postgresql://app:{PASSWORD}@db/app?ssl=true"},
        "dbpool.E006",
        "ssl=true",
    ),
    ("PORT a word", {**BASE, "PORT": "pg"}, {}, "dbpool.E002", "'pg'"),
    ("DB_POOL_SIZE a word", BASE, {"DB_POOL_SIZE": "abc"}, "dbpool.E002", "'abc'"),
    ("DB_MAX_OVERFLOW negative", BASE, {"DB_MAX_OVERFLOW": "-2"}, "dbpool.E003", "'-2'"),
    ("DB_POOL_RECYCLE zero", BASE, {"DB_POOL_RECYCLE": "0"}, "dbpool.E003", "'0'"),
    ("DB_POOL_TIMEOUT a word", BASE, {"DB_POOL_TIMEOUT": "x"}, "dbpool.E002", "'x'"),
    ("SQL_ECHO not a bool", BASE, {"SQL_ECHO": "maybe"}, "dbpool.E002", "'maybe'"),
    ("METRICS_PORT too big", BASE, {"METRICS_PORT": "70000"}, "dbpool.E003", "'70000'"),
    ("METRICS_PORT zero", BASE, {"METRICS_PORT": "0"}, "dbpool.E003", "'0'"),
    ("METRICS_PORT a word", BASE, {"METRICS_PORT": "http"}, "dbpool.E002", "'http'"),
    (
        "METRICS_ENABLED not a bool",
        BASE,
        {"METRICS_ENABLED": "perhaps"},
        "dbpool.E002",
        "'perhaps'",
    ),
]


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 25
    assert len({name for name, *_ in CASES}) == len(CASES)


def found(settings_dict: dict[str, Any], environ: dict[str, str]) -> list[Any]:
    return problems({"main": settings_dict}, environ)


@pytest.mark.parametrize("debug", [False, True], ids=["production", "debug"])
@pytest.mark.parametrize(
    ("settings_dict", "environ", "expected", "shows"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_configuration(
    settings_dict: dict[str, Any], environ: dict[str, str], expected: str, shows: str, debug: bool
) -> None:
    messages = [to_message(p, pw, debug=debug) for p, pw in found(settings_dict, environ)]
    want = expected.replace(".E", ".W") if debug else expected
    assert [m.id for m in messages] == [want]
    message = messages[0]
    if debug:
        assert isinstance(message, checks.Warning) and not message.is_serious()
        assert "an error in production" in message.msg
        assert ("default is used" in message.msg) is (expected not in NO_DEFAULT)
    else:
        assert isinstance(message, checks.Error) and message.is_serious()
    text = f"{message.msg} {message.hint}"
    assert shows in message.msg  # the bad value
    assert message.hint  # the fix
    if not message.msg.startswith("METRICS_"):
        assert "Database 'main'" in message.msg  # the alias
    assert PASSWORD not in text


def test_a_good_configuration_has_no_problem() -> None:
    good = opts(
        pool={"min_size": 1, "max_size": 4, "timeout": 3},
        async_pool={"pool_size": 5, "max_overflow": 0, "recycle": 60, "timeout": 2},
        circuit_breaker={"fail_max": 3, "reset_timeout": 10},
        retry={"max_tries": 1, "max_time": 1, "base_delay": 0.05, "max_delay": 0.5},
        warmup=True,
        sslmode="prefer",
    )
    assert found(good, {"METRICS_PORT": "9100", "METRICS_ENABLED": "true"}) == []


def test_debug_uses_the_defaults() -> None:
    conf = _config.from_settings("main", opts(async_pool={"pool_size": 0, "recycle": -1}), {})
    assert conf.async_pool.pool_size == _config.AsyncPoolConfig().pool_size
    assert conf.async_pool.recycle == _config.AsyncPoolConfig().recycle
    assert {p.id for p in conf.problems} == {"dbpool.E003"}


def test_a_password_in_a_bad_value_is_redacted() -> None:
    settings_dict = {**BASE, "OPTIONS": {"async_pool": {"pool_size": PASSWORD}}}
    (message,) = [to_message(p, pw, debug=False) for p, pw in problems({"m": settings_dict}, {})]
    assert PASSWORD not in message.msg and "***" in message.msg


@pytest.fixture
def bad_alias(make_alias: Any) -> str:
    return make_alias(OPTIONS={"async_pool": {"pool_size": 0}, "retri": {}})


def test_manage_py_check_fails_in_production(bad_alias: str) -> None:
    with override_settings(DEBUG=False), pytest.raises(SystemCheckError) as info:
        call_command("check", stdout=io.StringIO(), stderr=io.StringIO())
    text = str(info.value)
    assert "dbpool.E003" in text and "dbpool.E004" in text
    assert f"Database {bad_alias!r}, OPTIONS['async_pool']['pool_size']" in text
    assert "OPTIONS['retri']" in text


def test_manage_py_check_warns_in_debug(bad_alias: str) -> None:
    err = io.StringIO()
    with override_settings(DEBUG=True):
        call_command("check", stdout=io.StringIO(), stderr=err)
    assert "dbpool.W003" in err.getvalue() and "dbpool.W004" in err.getvalue()


def test_registered_under_its_tag(bad_alias: str) -> None:
    with override_settings(DEBUG=False):
        ids = {m.id for m in checks.run_checks(tags=[TAG])}
    assert {"dbpool.E003", "dbpool.E004"} <= ids


def test_the_project_settings_are_clean() -> None:
    assert problems(environ={}) == []


def test_each_problem_is_shown_once_with_the_id_debug_gives_it(
    make_alias: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Where no system check runs (uvicorn), a log line; where one does, only the check."""
    unchecked = make_alias(OPTIONS={"async_pool": {"pool_size": 0}})
    checked = make_alias(OPTIONS={"async_pool": {"pool_size": -1}})
    with override_settings(DEBUG=True), caplog.at_level("WARNING", logger="django_asyncpool"):
        _registry.config(unchecked)
        _registry.config(unchecked)
        err = io.StringIO()
        call_command("check", stdout=io.StringIO(), stderr=err)
        _registry.config(checked)
    (line,) = [r.getMessage() for r in caplog.records if "pool_size" in r.getMessage()]
    assert line.startswith(f"dbpool.W003: database {unchecked!r}: ") and "dbpool.E003" not in line
    assert line.endswith("(DEBUG is on; this is an error in production)")
    assert f"Database {checked!r}" in err.getvalue()


@pytest.mark.usefixtures("db_access")
def test_conn_max_age_in_debug_is_0_and_the_check_says_so(make_alias: Any) -> None:
    alias = make_alias(CONN_MAX_AGE=60, OPTIONS={"pool": {"min_size": 0, "max_size": 2}})
    err = io.StringIO()
    with override_settings(DEBUG=True):
        call_command("check", stdout=io.StringIO(), stderr=err)
        wrapper = connections[alias]
        with wrapper.cursor() as cursor:  # not "Pooling doesn't support persistent ..."
            cursor.execute("select 1")
        wrapper.close_if_unusable_or_obsolete()  # at the end of a request
    assert wrapper.connection is None, "kept for CONN_MAX_AGE instead of given back"
    assert "dbpool.W007" in err.getvalue() and "The default is used" in err.getvalue()


def test_conn_max_age_in_production_is_refused_saying_what_to_do(make_alias: Any) -> None:
    alias = make_alias(CONN_MAX_AGE=60, OPTIONS={"pool": {"min_size": 0, "max_size": 2}})
    with override_settings(DEBUG=False), pytest.raises(ImproperlyConfigured) as info:
        connections[alias].pool  # noqa: B018
    # Django's own words first (its test suite asserts them), then the fix.
    assert str(info.value).startswith("Pooling doesn't support persistent connections. ")
    assert f"Database {alias!r} has CONN_MAX_AGE = 60: set CONN_MAX_AGE to 0" in str(info.value)
    assert "OPTIONS['pool'] to False (dbpool.E007)" in str(info.value)
