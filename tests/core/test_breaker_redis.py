"""The breaker state shared through Redis: real redis-server, real PostgreSQL, real processes."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from django.core.management import call_command
from django.db import connections
from prometheus_client import REGISTRY

from django_asyncpool import CircuitOpenError, DatabaseUnavailable, metrics
from django_asyncpool.checks import problems
from django_asyncpool.core import breaker_redis as _shared
from django_asyncpool.core import registry as _registry

from ..breaker_worker import Worker
from ..conftest import closed_port, query, wait_until
from ..proxy import TcpProxy

REFRESH = 0.05  # storage_refresh in these tests: the bound on how stale a process's view is


def breaker(url: str, **extra: Any) -> dict[str, Any]:
    """OPTIONS of a small pool whose breaker opens after 2 failures and is shared at ``url``."""
    return {
        "pool": {"min_size": 0, "max_size": 2, "timeout": 2},
        "circuit_breaker": {
            "fail_max": 2,
            "reset_timeout": 1,
            "storage": url,
            "storage_refresh": REFRESH,
            **extra,
        },
        "retry": {"max_tries": 1},
    }


@pytest.fixture
def workers(db_access: None) -> Iterator[Callable[..., Worker]]:
    """Start worker processes on one alias (tests/breaker_worker.py); all stopped afterwards."""
    started: list[Worker] = []

    def start(alias: str, **overrides: Any) -> Worker:
        settings = copy.deepcopy(connections["default"].settings_dict)
        settings.update(NAME="postgres", **overrides)
        worker = Worker(alias, json.loads(json.dumps(settings, default=str)))
        started.append(worker)
        return worker

    yield start
    for worker in started:
        with contextlib.suppress(OSError):
            worker.send("quit")  # all at once: each takes a moment to exit
    for worker in started:
        worker.close()


def keys(server: Any) -> list[str]:
    client = redis.Redis.from_url(server.url)
    try:
        return sorted(k.decode() for k in client.keys("*"))
    finally:
        client.close()


# -- across processes ----------------------------------------------------------------------------


@pytest.mark.slow
def test_one_process_opens_the_breaker_for_all_and_one_trial_runs_across_them(
    redis_server, pg, workers
) -> None:
    # A reaches the server through one proxy, B and C through another that counts the
    # connections they try: the same alias, so the same breaker.
    links = [TcpProxy(pg.host, pg.port), TcpProxy(pg.host, pg.port)]
    try:
        options = breaker(redis_server.url)
        a, b, c = (
            workers("shared1", HOST=p.host, PORT=p.port, OPTIONS=options)
            for p in (links[0], links[1], links[1])
        )
        assert a.ask("call")["ok"] and b.ask("call")["ok"]
        for link in links:
            link.cut()
        while (answer := a.ask("call"))["state"] != "open":
            assert answer["error"] not in (None, CircuitOpenError.__name__)
        tried = [link.connections for link in links]

        time.sleep(3 * REFRESH)  # the documented bound: B's view is at most REFRESH old
        first = b.ask("call")
        assert first["error"] == CircuitOpenError.__name__
        # A few ms on an idle machine (the issue asks < 50 ms); the margin is for a busy CI
        # box. That no connection was tried is what the proxies' counts prove below.
        assert first["ms"] < 250
        # A process whose first checkout comes while it is open fails fast from the start.
        assert c.ask("call")["error"] == CircuitOpenError.__name__
        assert links[1].connections == tried[1]  # neither B nor C tried to connect

        # The server is back, slowly: the trial takes a while, and is the only connection.
        for link in links:
            link.restore()
            link.delay(0.15)
        time.sleep(1.1)  # reset_timeout
        for worker in (a, b, c):
            worker.send("load", seconds=2.5, pause=0.01)
        assert wait_until(lambda: sum(p.connections for p in links) > sum(tried), timeout=5)
        time.sleep(0.5)
        assert sum(p.connections for p in links) == sum(tried) + 1  # one trial for all three
        for link in links:
            link.restore()
        loads = [worker._read() for worker in (a, b, c)]
        rejected = sum(load["outcomes"].get(CircuitOpenError.__name__, 0) for load in loads)
        assert rejected > 0  # the others failed fast while the trial ran
        assert all(set(load["outcomes"]) <= {"ok", CircuitOpenError.__name__} for load in loads)
        assert all(load["outcomes"].get("ok") for load in loads)
        assert [w.ask("state")["state"] for w in (a, b, c)] == ["closed"] * 3
    finally:
        for link in links:
            link.close()


@pytest.mark.slow
def test_redis_stopped_mid_load_fails_no_request_and_is_shared_again(redis_server, workers) -> None:
    worker = workers("shared2", OPTIONS=breaker(redis_server.url))
    assert worker.ask("state")["shared"] is True
    worker.send("load", seconds=3.0, pause=0.005)
    time.sleep(0.5)
    redis_server.stop()
    time.sleep(1.0)
    redis_server.start()  # empty, as a restarted Redis without persistence
    load = worker._read()
    assert set(load["outcomes"]) == {"ok"}, load  # not one request failed because of Redis
    after = wait_until(lambda: (s := worker.ask("state"))["shared"] and s, timeout=5)
    assert after["storage_errors"] >= 1  # the fallback was counted
    assert after["state"] == "closed"
    # Shared again: the restarted Redis has the alias's state once more.
    assert "django_asyncpool:shared2:pybreaker:state" in keys(redis_server)


# -- in one process ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_slow_redis_slows_no_request_beyond_the_timeout(
    redis_server, make_wrapper, caplog
) -> None:
    link = TcpProxy(redis_server.host, redis_server.port)
    try:
        url = f"redis://{link.host}:{link.port}/0"
        wrapper = make_wrapper(OPTIONS=breaker(url, storage_timeout=0.2, fail_max=1000))
        guard = _registry.guard(wrapper.alias, wrapper)
        query(wrapper)
        store = guard.storage
        assert isinstance(store, _shared.SharedStorage) and store.shared
        link.delay(2.0)  # Redis answers after 2 s: as good as hung
        with caplog.at_level(logging.WARNING, "django_asyncpool"):
            took = []
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:  # healthy: checkouts never wait for Redis
                started = time.monotonic()
                query(wrapper)
                took.append(time.monotonic() - started)
            # A checkout that asked Redis would take its 0.2 s timeout at least.
            assert statistics.median(took) < 0.05 and max(took) < 1.0
            assert wait_until(lambda: not store.shared, timeout=2)  # the follower noticed
            # Failures must write to Redis, but it is slow: local state at once.
            bad = make_wrapper(
                HOST="127.0.0.1", PORT=closed_port(), OPTIONS=breaker(url, storage_timeout=0.2)
            )
            bad_guard = _registry.guard(bad.alias, bad)  # its first read waits the timeout
            for _ in range(2):
                started = time.monotonic()
                with pytest.raises(DatabaseUnavailable):
                    query(bad)
                assert time.monotonic() - started < 0.2 + 0.8  # far from Redis's 2 s
            assert bad_guard.state == "open"
        down = [r for r in caplog.records if "not shared" in r.getMessage()]
        assert len(down) == 2  # once per alias, for the whole outage
        link.restore()
        assert wait_until(lambda: store.shared, timeout=5)
    finally:
        link.close()


def test_redis_down_from_the_start_costs_the_first_checkout_the_timeout_only(
    make_wrapper, caplog
) -> None:
    url = f"redis://:pw-redis@127.0.0.1:{closed_port()}/0"
    wrapper = make_wrapper(OPTIONS=breaker(url, storage_timeout=0.2))
    with caplog.at_level(logging.WARNING, "django_asyncpool"):
        started = time.monotonic()
        query(wrapper)  # builds the guard: one refused connect to Redis, then local state
        assert time.monotonic() - started < 2  # the connection to PostgreSQL included
        for _ in range(20):
            query(wrapper)
    guard = _registry.guard(wrapper.alias, wrapper)
    assert not guard.storage.shared and guard.state == "closed"
    (down,) = [r.getMessage() for r in caplog.records if "Redis" in r.getMessage()]
    assert "is not shared: Redis at redis://127.0.0.1:" in down and "pw-redis" not in down


def test_keys_carry_prefix_and_alias_never_a_host_or_password(
    redis_server, make_wrapper, caplog
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.config_set("requirepass", "s3cret-redis")
    client.close()
    url = f"redis://:s3cret-redis@{redis_server.host}:{redis_server.port}/0"
    bad = make_wrapper(
        HOST="127.0.0.1",
        PORT=closed_port(),
        OPTIONS=breaker(url, storage_prefix="shop.prod"),
    )
    with caplog.at_level(logging.INFO, "django_asyncpool"):
        for _ in range(2):
            with pytest.raises(DatabaseUnavailable):
                query(bad)
        guard = _registry.guard(bad.alias, bad)
        assert guard.state == "open"
        authed = redis.Redis.from_url(url)
        found = sorted(k.decode() for k in authed.keys("*"))
        assert authed.get(f"shop.prod:{bad.alias}:pybreaker:state") == b"open"
        assert authed.pttl(f"shop.prod:{bad.alias}:trial") > 0  # no trial before reset_timeout
        authed.close()
        redis_server.stop()
        with pytest.raises(CircuitOpenError):
            query(bad)
        wait_until(lambda: not guard.storage.shared, timeout=3)
    assert found and all(k.startswith(f"shop.prod:{bad.alias}:") for k in found)
    for key in found:
        assert "127.0.0.1" not in key and str(redis_server.port) not in key
        assert "s3cret" not in key
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "not shared any more" in text and "s3cret" not in text
    assert f"redis://127.0.0.1:{redis_server.port}/0" in text  # where, without credentials


def test_storage_errors_and_fallback_are_metrics(redis_server, make_wrapper) -> None:
    wrapper = make_wrapper(OPTIONS=breaker(redis_server.url))
    guard = _registry.guard(wrapper.alias, wrapper)

    def sample(name: str) -> float:
        metrics.flush()
        return REGISTRY.get_sample_value(name, {"alias": wrapper.alias}) or 0.0

    errors = sample("db_breaker_storage_errors_total")
    assert sample("db_breaker_storage_shared") == 1
    redis_server.stop()
    assert wait_until(lambda: not guard.storage.shared, timeout=3)
    assert sample("db_breaker_storage_shared") == 0
    assert sample("db_breaker_storage_errors_total") > errors
    query(wrapper)  # a request never fails because Redis did
    redis_server.start()
    assert wait_until(lambda: guard.storage.shared, timeout=5)
    assert sample("db_breaker_storage_shared") == 1


def test_dbpool_check_shows_the_shared_state(redis_server, make_alias, db_access, capsys) -> None:
    alias = make_alias(OPTIONS=breaker(redis_server.url))
    call_command("dbpool_check", "--database", alias, "--format", "json")
    entry = json.loads(capsys.readouterr().out)["aliases"][0]
    storage = entry["breaker"]["storage"]
    assert storage["storage"] == "redis" and storage["shared"] is True
    assert storage["where"] == redis_server.url
    redis_server.stop()
    store = _registry.guard(alias).storage
    assert wait_until(lambda: not store.shared, timeout=3)
    call_command("dbpool_check", "--database", alias)
    out = capsys.readouterr().out
    assert "Redis at" in out and "NOT REACHABLE" in out
    local = make_alias()
    call_command("dbpool_check", "--database", local, "--format", "json")
    assert json.loads(capsys.readouterr().out)["aliases"][0]["breaker"]["storage"] == {
        "storage": "local"
    }


# -- configuration -------------------------------------------------------------------------------


def check(options: dict[str, Any], password: str = "") -> list[Any]:
    databases = {
        "x": {"ENGINE": "django_asyncpool", "NAME": "n", "PASSWORD": password, "OPTIONS": options}
    }
    return [p for p, _ in problems(databases, environ={}, aliases=["x"])]


def test_a_non_redis_url_is_a_problem_and_never_echoed() -> None:
    (found,) = check({"circuit_breaker": {"storage": "http://u:pw-in-url@cache:80/0"}})
    assert found.id == "dbpool.E030"
    assert "http://" in found.message and "redis://HOST:PORT/DB" in found.hint
    assert "pw-in-url" not in found.message + found.hint
    assert check({"circuit_breaker": {"storage": "rediss://cache:6380/1"}}) == []
    (port,) = check({"circuit_breaker": {"storage": "redis://:pw@cache:six/0"}})
    assert port.id == "dbpool.E030" and "port that is not a number" in port.message
    assert "pw" not in port.message


def test_a_missing_redis_package_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # as if not installed
    (found,) = check({"circuit_breaker": {"storage": "redis://cache:6379/0"}})
    assert found.id == "dbpool.E031"
    assert found.hint == "pip install django-asyncpool[redis]"


@pytest.mark.parametrize("prefix", ["", "has space", "x" * 65, "{tag}"])
def test_a_bad_prefix_is_a_problem(prefix: str) -> None:
    (found,) = check({"circuit_breaker": {"storage_prefix": prefix}})
    assert found.id == "dbpool.E032"
    assert "default: 'django_asyncpool'" in found.hint


def test_the_storage_url_stays_out_of_the_config_repr() -> None:
    from django_asyncpool.config import from_settings

    conf = from_settings(
        "x",
        {"NAME": "n", "OPTIONS": {"circuit_breaker": {"storage": "redis://:pw@cache:6379/0"}}},
        environ={},
    )
    assert conf.breaker.storage == "redis://:pw@cache:6379/0"
    assert "pw" not in repr(conf)
