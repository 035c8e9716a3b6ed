"""The pool metrics: real traffic moves them; /metrics shows them in every deployment shape.

Counters are asserted as changes across the traffic a test makes, on an alias of
its own, never as absolute values of the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Histogram, generate_latest
from sqlalchemy import text

from django_asyncpool import (
    CircuitOpenError,
    ConnectionPool,
    DatabaseUnavailable,
    PoolTimeout,
    _exporter,
    metrics,
)
from django_asyncpool.base import DatabaseWrapper
from django_asyncpool.core import registry as _registry
from django_asyncpool.core import stats as _stats

from .conftest import free_port, metric_value, query, wait_until

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.django_db(transaction=True)


def value(name: str, **labels: str) -> float:
    """The current value of one sample in this process's REGISTRY (0 when absent)."""
    found = REGISTRY.get_sample_value(name, labels)
    return 0.0 if found is None else found


class Delta:
    """Samples taken now, to compare with later: ``delta(name, **labels)``."""

    def __init__(self, alias: str, pool: str) -> None:
        self.alias, self.pool = alias, pool
        self.before = self._all()

    def _all(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        out = {}
        for family in REGISTRY.collect():
            for s in family.samples:
                if s.labels.get("alias") == self.alias:
                    out[s.name, frozenset(s.labels.items())] = s.value
        return out

    def __call__(self, name: str, **labels: str) -> float:
        labels = {"alias": self.alias, **labels}
        if name.startswith(("db_connection", "db_pool")) and "breaker" not in name:
            labels.setdefault("pool", self.pool)
        key = (name, frozenset(labels.items()))
        return value(name, **labels) - self.before.get(key, 0.0)


async def async_query(alias: str) -> None:
    async with ConnectionPool(alias).session_scope() as session:
        await session.execute(text("select 1"))


# -- real traffic moves the metrics ------------------------------------------------------------


def test_async_traffic_moves_attempts_latency_created_reused_and_held(make_alias) -> None:
    alias = make_alias(OPTIONS={"async_pool": {"pool_size": 3, "max_overflow": 2}})
    delta = Delta(alias, "async")

    async def traffic() -> None:
        for _ in range(20):
            await async_query(alias)
        async with ConnectionPool(alias).connection() as conn:
            await conn.fetchval("select 1")
            assert value("db_connection_state", alias=alias, pool="async", state="in_use") == 1
        await asyncio.gather(*(async_query(alias) for _ in range(4)))  # 4 at once: 4 opened

    asyncio.run(traffic())
    assert delta("db_connection_attempts_total", outcome="success") == 25
    for outcome in ("failure", "timeout", "rejected"):
        assert delta("db_connection_attempts_total", outcome=outcome) == 0
    assert delta("db_connection_latency_seconds_count") == 25
    assert delta("db_connection_latency_seconds_sum") > 0
    assert delta("db_connection_held_seconds_count") == 25
    created = delta("db_pool_connections_created_total")
    assert 1 <= created <= 4
    assert created + delta("db_pool_connections_reused_total") == 25
    # the loop is gone (asyncio.run closed it, its engine with it): nothing open
    assert value("db_connection_state", alias=alias, pool="async", state="in_use") == 0
    assert value("db_pool_max_size", alias=alias, pool="async") == 5
    assert ConnectionPool(alias).metrics["attempts"] == 25  # the same data, as a dict


def test_async_gauges_while_the_loop_lives(make_alias) -> None:
    alias = make_alias(OPTIONS={"async_pool": {"pool_size": 2, "max_overflow": 1}})

    async def traffic() -> dict[str, float]:
        await asyncio.gather(*(async_query(alias) for _ in range(2)))
        return {
            name: value(metric, alias=alias, pool="async", **labels)
            for name, metric, labels in (
                ("idle", "db_connection_state", {"state": "idle"}),
                ("in_use", "db_connection_state", {"state": "in_use"}),
                ("waiting", "db_connection_state", {"state": "waiting"}),
                ("size", "db_pool_size", {}),
                ("min", "db_pool_min_size", {}),
                ("max", "db_pool_max_size", {}),
            )
        }

    seen = asyncio.run(traffic())
    assert seen == {"idle": 2, "in_use": 0, "waiting": 0, "size": 2, "min": 0, "max": 3}


def test_the_budget_counts_the_sync_pool_and_each_loops_async_cap(make_alias) -> None:
    alias = make_alias(
        OPTIONS={"pool": {"max_size": 4}, "async_pool": {"pool_size": 2, "max_overflow": 1}}
    )

    async def on_a_loop(started: threading.Event, stop: threading.Event) -> None:
        await async_query(alias)
        started.set()
        while not stop.is_set():
            await asyncio.sleep(0.01)

    # Before any use, from the settings alone: no event loop yet, counted as one.
    assert value("db_pool_budget_connections", alias=alias) == 4 + 3
    started, stop = threading.Event(), threading.Event()
    other = threading.Thread(target=lambda: asyncio.run(on_a_loop(started, stop)))
    other.start()
    try:
        assert started.wait(10)

        async def here() -> float:
            await async_query(alias)  # a second loop, alive beside the other thread's
            return value("db_pool_budget_connections", alias=alias)

        assert asyncio.run(here()) == 4 + 2 * 3
    finally:
        stop.set()
        other.join(10)


def test_sync_traffic_moves_attempts_latency_created_reused_and_held(make_wrapper) -> None:
    wrapper = make_wrapper(OPTIONS={"pool": {"min_size": 1, "max_size": 4}})
    delta = Delta(wrapper.alias, "sync")
    for _ in range(10):
        query(wrapper)
    assert delta("db_connection_attempts_total", outcome="success") == 10
    assert delta("db_connection_latency_seconds_count") == 10
    assert delta("db_connection_held_seconds_count") == 10
    created = delta("db_pool_connections_created_total")
    assert created >= 1
    assert created + delta("db_pool_connections_reused_total") == 10
    pool = dict(alias=wrapper.alias, pool="sync")
    assert value("db_connection_state", **pool, state="in_use") == 0
    assert value("db_connection_state", **pool, state="idle") >= 1
    assert value("db_pool_size", **pool) == value("db_connection_state", **pool, state="idle")
    assert (value("db_pool_min_size", **pool), value("db_pool_max_size", **pool)) == (1, 4)

    wrapper.ensure_connection()  # held by this thread until close()
    assert value("db_connection_state", **pool, state="in_use") == 1
    wrapper.close()
    assert value("db_connection_state", **pool, state="in_use") == 0


def test_sync_timeouts_and_waiting(make_wrapper) -> None:
    wrapper = make_wrapper(
        OPTIONS={"pool": {"min_size": 1, "max_size": 1, "timeout": 0.5}, "retry": {"max_tries": 1}}
    )
    delta = Delta(wrapper.alias, "sync")
    holder = DatabaseWrapper(copy.deepcopy(wrapper.settings_dict), alias=wrapper.alias)
    holder.ensure_connection()  # takes the only connection
    waiting: list[float] = []
    sampler = threading.Timer(
        0.2,
        lambda: waiting.append(
            value("db_connection_state", alias=wrapper.alias, pool="sync", state="waiting")
        ),
    )
    sampler.start()
    with pytest.raises(PoolTimeout):
        query(wrapper)
    sampler.join()
    holder.close()
    assert waiting == [1]
    assert delta("db_connection_attempts_total", outcome="timeout") == 1
    assert delta("db_pool_timeouts_total") == 1
    assert delta("db_connection_attempts_total", outcome="failure") == 0


async def test_async_timeouts_and_waiting(make_alias) -> None:
    alias = make_alias(OPTIONS={"async_pool": {"pool_size": 1, "max_overflow": 0, "timeout": 0.3}})
    delta = Delta(alias, "async")
    pool = ConnectionPool(alias)
    async with pool.connection():
        waiter = asyncio.ensure_future(async_query(alias))
        await asyncio.sleep(0.1)
        assert value("db_connection_state", alias=alias, pool="async", state="waiting") == 1
        with pytest.raises(PoolTimeout):
            await waiter
    assert delta("db_connection_attempts_total", outcome="timeout") == 1
    assert delta("db_pool_timeouts_total") == 1
    assert value("db_connection_state", alias=alias, pool="async", state="waiting") == 0
    await pool.close()


@pytest.mark.slow
def test_breaker_state_flips_when_the_server_stops_and_comes_back(
    make_alias, pg, server_down, django_db_blocker
) -> None:
    alias = make_alias(
        OPTIONS={
            "pool": {"min_size": 0, "max_size": 2, "timeout": 2},
            "circuit_breaker": {"fail_max": 2, "reset_timeout": 1},
            "retry": {"max_tries": 2, "base_delay": 0.01, "max_time": 2},
        }
    )
    sync, both = Delta(alias, "sync"), Delta(alias, "async")

    def state() -> dict[str, float]:
        return {
            s: value("db_pool_breaker_state", alias=alias, state=s) for s in metrics.BREAKER_STATES
        }

    asyncio.run(async_query(alias))
    assert state() == {"closed": 1, "open": 0, "half-open": 0}
    server_down()
    with pytest.raises(DatabaseUnavailable):
        asyncio.run(async_query(alias))  # two tries, two failures: the breaker opens
    assert state() == {"closed": 0, "open": 1, "half-open": 0}
    with pytest.raises(CircuitOpenError):
        asyncio.run(async_query(alias))
    from django.db import connections

    with django_db_blocker.unblock(), pytest.raises(CircuitOpenError):
        query(connections[alias])
    assert both("db_connection_attempts_total", outcome="failure") == 1
    assert both("db_pool_retries_total") == 1
    assert both("db_connection_attempts_total", outcome="rejected") == 1
    assert sync("db_connection_attempts_total", outcome="rejected") == 1
    assert both("db_pool_breaker_transitions_total", state="open") == 1

    pg.start()
    time.sleep(1.05)  # reset_timeout: the next call is the trial
    asyncio.run(async_query(alias))
    assert state() == {"closed": 1, "open": 0, "half-open": 0}
    assert both("db_pool_breaker_transitions_total", state="half-open") == 1
    assert both("db_pool_breaker_transitions_total", state="closed") == 1
    with django_db_blocker.unblock():
        query(connections[alias])
        connections[alias].close()
    assert sync("db_connection_attempts_total", outcome="success") == 1


def test_dead_connections_replaced_and_leaks_are_counted(make_alias, make_wrapper, pg) -> None:
    alias = make_alias(OPTIONS={"leak_threshold": 0.05, "liveness_bypass": 30})
    delta = Delta(alias, "async")

    async def traffic() -> None:
        async with ConnectionPool(alias).connection() as conn:
            pid = conn.get_server_pid()
        pg.psql(f"select pg_terminate_backend({pid})")  # only this pool's connection
        await asyncio.sleep(0.1)
        await async_query(alias)  # the dead one is found and replaced before use
        async with ConnectionPool(alias).connection():
            await asyncio.sleep(0.15)  # past leak_threshold: one warning

    asyncio.run(traffic())
    assert delta("db_pool_connections_invalidated_total") >= 1
    assert delta("db_pool_leaks_total") == 1
    assert delta("db_connection_attempts_total", outcome="success") == 3

    wrapper = make_wrapper(OPTIONS={"pool": {"min_size": 0, "max_size": 2}, "leak_threshold": 0.1})
    sync = Delta(wrapper.alias, "sync")
    wrapper.ensure_connection()
    assert wait_until(lambda: sync("db_pool_leaks_total") == 1, timeout=5)
    wrapper.close()


def test_metrics_off_for_an_alias_skips_it(make_alias) -> None:
    alias = make_alias(OPTIONS={"metrics": False})
    asyncio.run(async_query(alias))
    output = generate_latest(REGISTRY).decode()
    assert f'alias="{alias}"' not in output
    assert ConnectionPool(alias).metrics["attempts"] == 1  # the data is still there
    assert _registry.stats(alias, "async").latency.count == 0  # but nothing was timed


def test_no_password_or_dsn_in_any_label_or_value(make_wrapper, proxy) -> None:
    secret = "Sup3r-secret-pw"
    wrapper = make_wrapper(
        HOST=proxy.host,
        PORT=proxy.port,
        PASSWORD=secret,
        OPTIONS={"pool": {"min_size": 0, "max_size": 1, "timeout": 1}, "retry": {"max_tries": 1}},
    )
    proxy.cut()
    with pytest.raises(DatabaseUnavailable):
        query(wrapper)
    output = generate_latest(REGISTRY).decode()
    assert f'alias="{wrapper.alias}"' in output
    assert secret not in output
    assert f"{proxy.host}:{proxy.port}" not in output
    assert "postgresql" not in output


# -- registration ----------------------------------------------------------------------------


def test_nothing_is_registered_twice() -> None:
    from django.apps import apps

    app = apps.get_app_config("django_asyncpool")
    for _ in range(3):
        metrics.install()
        metrics.setup()
        app.ready()
    output = generate_latest(REGISTRY).decode()
    for name, kind in metrics.exported_names().items():
        assert output.count(f"# TYPE {name} {kind}\n") == 1

    # A collector from an earlier import of the module (a reload) is replaced, not doubled.
    registry = CollectorRegistry()
    stale = metrics._Collector()
    registry.register(stale)
    setattr(registry, metrics._MARK, stale)
    metrics.install(registry)
    metrics.install(registry)
    assert generate_latest(registry).decode().count("# TYPE db_connection_state gauge") == 1


def test_a_reloaded_module_registers_without_duplicated_timeseries() -> None:
    code = (
        "import importlib, django; django.setup()\n"
        "from prometheus_client import REGISTRY, generate_latest\n"
        "import django_asyncpool.metrics as m\n"
        "m.install(); importlib.reload(m); m.install(); m.setup()\n"
        "out = generate_latest(REGISTRY).decode()\n"
        "assert out.count('# TYPE db_connection_state gauge') == 1, out\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Duplicated timeseries" not in done.stderr


def test_pushing_a_histogram_equals_observing_it() -> None:
    """The flush writes bucket counts straight into prometheus_client's histogram."""
    buckets = (0.001, 0.01, 0.1, 1.0)
    direct_reg, pushed_reg = CollectorRegistry(), CollectorRegistry()
    direct = Histogram("h_seconds", "h", ["a"], buckets=buckets, registry=direct_reg)
    pushed = Histogram("h_seconds", "h", ["a"], buckets=buckets, registry=pushed_reg)
    ours, state = _stats.Histogram(buckets), metrics._Pushed(len(buckets) + 1)
    for chunk in ([0.0005, 0.001, 0.002], [0.5, 1.0, 7.0], [], [0.01]):
        for v in chunk:
            direct.labels("x").observe(v)
            ours.observe(v)
        state.push(pushed.labels("x"), ours)

    def samples(reg: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
        return [
            (s.name, s.labels, round(s.value, 9))
            for f in reg.collect()
            for s in f.samples
            if not s.name.endswith("_created")
        ]

    assert samples(direct_reg) == samples(pushed_reg)


# -- the standalone exporter -----------------------------------------------------------------


@contextlib.contextmanager
def _taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROMETHEUS_", "METRICS_"))}
    env.update(DJANGO_SETTINGS_MODULE="testproject.settings", PYTHONPATH=str(ROOT), **extra)
    return env


def _python(*args: str, port: int) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` in the project with metrics enabled on ``port``."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=_env(METRICS_ENABLED="true", METRICS_PORT=str(port)),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_exporter_serves_metrics_on_afree_port() -> None:
    port = _exporter.start(free_port(), addr="127.0.0.1")
    try:
        assert port is not None
        assert _exporter.start(port + 1, addr="127.0.0.1") == port  # one per process
        page = _get(f"http://127.0.0.1:{port}/metrics")
        assert "# TYPE db_connection_attempts_total counter" in page
    finally:
        _exporter.stop()


def test_a_taken_port_is_logged_once_and_never_raises(caplog) -> None:
    with _taken_port() as port, caplog.at_level(logging.WARNING, "django_asyncpool"):
        assert _exporter.start(port) is None
        assert _exporter.start(port) is None
    warnings = [r for r in caplog.records if "METRICS_PORT" in r.getMessage()]
    assert len(warnings) == 1
    assert f"METRICS_PORT {port} could not be opened" in warnings[0].getMessage()


def test_runserver_serves_from_its_server_process_not_the_autoreloader(monkeypatch) -> None:
    monkeypatch.setenv("METRICS_ENABLED", "true")
    monkeypatch.setenv("METRICS_PORT", str(free_port()))
    monkeypatch.delenv("RUN_MAIN", raising=False)
    monkeypatch.setattr(sys, "argv", ["manage.py", "runserver"])
    assert _exporter.start_from_settings() is None  # the autoreloader: it serves nothing
    monkeypatch.setattr(sys, "argv", ["manage.py", "runserver", "--noreload"])
    try:
        assert _exporter.start_from_settings() is not None
    finally:
        _exporter.stop()
    monkeypatch.setenv("RUN_MAIN", "true")  # the server process the autoreloader started
    monkeypatch.setattr(sys, "argv", ["manage.py", "runserver"])
    try:
        assert _exporter.start_from_settings() is not None
    finally:
        _exporter.stop()


def test_a_management_command_runs_with_the_port_taken() -> None:
    with _taken_port() as port:
        done = _python("manage.py", "check", port=port)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(f"METRICS_PORT {port} could not be opened") == 1


def test_a_script_with_metrics_enabled_serves_its_own_pool() -> None:
    port = free_port()
    code = (
        "import asyncio, urllib.request, django; django.setup()\n"
        "from sqlalchemy import text\n"
        "from django_asyncpool import session_scope\n"
        "async def main():\n"
        "    async with session_scope() as s:\n"
        "        await s.execute(text('select 1'))\n"
        "asyncio.run(main())\n"
        f"print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read().decode())\n"
    )
    done = _python("-c", code, port=port)
    assert done.returncode == 0, done.stderr
    attempts = metric_value(
        done.stdout, "db_connection_attempts_total", pool="async", outcome="success"
    )
    assert attempts == 1


# -- several worker processes ----------------------------------------------------------------


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """uvicorn with 2 worker processes and PROMETHEUS_MULTIPROC_DIR; yields (url, dir)."""
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    port = free_port()
    env = _env(PROMETHEUS_MULTIPROC_DIR=str(multiproc))
    env["DJANGO_SETTINGS_MODULE"] = "tests.metrics_site.settings"
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "django.core.asgi:get_asgi_application",
    ]
    command += f"--workers 2 --host 127.0.0.1 --port {port} --log-level warning".split()
    server = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    output: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _get(url + "/metrics")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"uvicorn did not start: {server.communicate()[0]}")
                time.sleep(0.2)
        yield url, multiproc
    finally:
        server.send_signal(signal.SIGINT)
        try:
            output.append(server.communicate(timeout=20)[0])
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            output.append(server.communicate()[0])
    assert "Duplicated timeseries" not in output[0]
    assert "Traceback" not in output[0], output[0]


@pytest.mark.slow
def test_two_worker_processes_show_their_pools_at_metrics(workers) -> None:
    url, multiproc = workers
    served: dict[str, dict[int, int]] = {"async": {}, "sync": {}}
    lock = threading.Lock()

    def hit(side: str) -> None:
        with urllib.request.urlopen(f"{url}/ping/{side}", timeout=10) as response:
            pid = json.loads(response.read())["pid"]
        with lock:
            served[side][pid] = served[side].get(pid, 0) + 1

    def traffic() -> None:
        """Requests on fresh connections, 8 at a time, until both workers served both views."""
        served["async"].clear()
        served["sync"].clear()
        for _ in range(40):
            threads = [threading.Thread(target=hit, args=(s,)) for s in ("async", "sync") * 4]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if all(len(pids) == 2 for pids in served.values()):
                return
        pytest.fail(f"the two workers did not both answer: {served}")

    traffic()  # both workers are up
    time.sleep(metrics.FLUSH_INTERVAL * 1.5)
    before = _get(url + "/metrics")
    traffic()
    pids = set(served["async"]) | set(served["sync"])

    def moved(side: str) -> float:
        page = _get(url + "/metrics")
        return metric_value(
            page, "db_connection_attempts_total", pool=side, outcome="success"
        ) - metric_value(before, "db_connection_attempts_total", pool=side, outcome="success")

    # Each worker writes its values every FLUSH_INTERVAL: wait for both to have done so.
    for side in ("async", "sync"):
        expected = sum(served[side].values())
        assert wait_until(lambda side=side, n=expected: moved(side) >= n, timeout=10), (
            side,
            moved(side),
            expected,
        )
    page = _get(url + "/metrics")
    # Gauges add up over the live workers: each holds at least one idle connection per pool.
    for side in ("async", "sync"):
        assert metric_value(page, "db_connection_state", pool=side, state="idle") >= 2
        assert metric_value(page, "db_connection_latency_seconds_count", pool=side) >= sum(
            served[side].values()
        )
    for alias in ("default", "replica"):  # replica: never used, there from the start
        assert (
            metric_value(page, "db_pool_breaker_state", alias=alias, state="closed") == 1
        )  # livemax
    # ... and every worker wrote its own files.
    for pid in pids:
        assert (multiproc / f"counter_{pid}.db").exists()
        assert (multiproc / f"gauge_livesum_{pid}.db").exists()


def test_a_forked_worker_writes_its_metrics(tmp_path: Path) -> None:
    """gunicorn --preload: the app is loaded in the master, the workers are forked."""
    code = (
        "import asyncio, os, time, django; django.setup()\n"
        "from prometheus_client import CollectorRegistry, generate_latest\n"
        "from prometheus_client.multiprocess import MultiProcessCollector\n"
        "from sqlalchemy import text\n"
        "from django_asyncpool import session_scope\n"
        "async def one():\n"
        "    async with session_scope() as s:\n"
        "        await s.execute(text('select 1'))\n"
        "asyncio.run(one())  # the master used the pool, and forks before writing it\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    asyncio.run(one())\n"
        "    time.sleep(2.5)  # the child's own flusher writes within a second\n"
        "    os._exit(0)  # no atexit: only the flusher thread can have written\n"
        "os.waitpid(pid, 0)\n"
        "registry = CollectorRegistry()\n"
        "MultiProcessCollector(registry)\n"
        "print(generate_latest(registry).decode())\n"
    )
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_env(PROMETHEUS_MULTIPROC_DIR=str(multiproc)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    # One each, none counted twice (the master's unwritten one by the child too).
    success = metric_value(
        done.stdout, "db_connection_attempts_total", pool="async", outcome="success"
    )
    assert success == 2
    assert len(list(multiproc.glob("counter_*.db"))) == 2


# -- the dashboard and the docs name what is exported ------------------------------------------

#: PromQL words that are not metric names.
_PROMQL = {
    "sum", "rate", "irate", "increase", "histogram_quantile", "max", "min", "avg", "count",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "clamp_min", "clamp_max", "topk", "bottomk", "abs", "vector", "scalar",
    "label_replace", "delta", "deriv", "changes", "resets", "time", "le", "inf", "nan",
    "max_over_time", "min_over_time", "avg_over_time", "sum_over_time", "absent",
}  # fmt: skip


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\$\w+", "", expr)  # dashboard variables
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {w for w in words if w.lower() not in _PROMQL}


def _exported_series() -> set[str]:
    names = set()
    for name, kind in metrics.exported_names().items():
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def test_every_dashboard_expression_names_an_exported_metric() -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            if isinstance(node.get("query"), str) and "label_values" in node["query"]:
                exprs.append(re.sub(r"label_values\(([^,]+),.*", r"\1", node["query"]))
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(dashboard)
    assert len(exprs) >= 8
    exported = _exported_series()
    used: set[str] = set()
    for expr in exprs:
        names = _metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, f"{expr!r} names {names - exported}, not exported"
        used |= names
    for wanted in ("db_connection_state", "db_connection_attempts_total", "db_pool_breaker_state"):
        assert wanted in used
    assert "db_connection_latency_seconds_bucket" in used


def test_the_docs_table_lists_every_metric() -> None:
    page = (ROOT / "docs" / "metrics.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| (\w+) \|", page, re.M)}
    assert rows == metrics.exported_names()
