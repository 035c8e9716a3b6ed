"""Benchmark the breaker state shared through Redis against each process keeping its own.

Two figures, each comparing the two variants side by side:

1. ``checkout``: what shared state costs a healthy checkout, in one process, two
   aliases on the same server (one local breaker, one with
   ``OPTIONS["circuit_breaker"]["storage"]``), interleaved round after round (the
   order flips each round): the guard alone around a no-op acquire, and a whole
   async checkout (``ConnectionPool(alias).connection()`` + ``select 1``). Medians
   of microseconds per call, and the ratio shared / local.
2. ``spread``: 8 worker processes (tests/breaker_worker.py) on one alias, each
   checking out one connection after another, 20 ms apart, through a TCP proxy;
   then the link breaks (``refused``: the server is stopped, connections are
   refused; ``blackhole``: the open connections die and every new connect waits
   out its 1 s ``connect_timeout``, a dead host). The figure is the time from the
   link breaking (the first failure: the queries on the connections it kills fail
   at once) to the moment ALL processes fail fast (each one's first
   ``CircuitOpenError``), with and without shared state; local and shared runs
   alternate, and medians are printed.

Both use ``fail_max`` 5, ``max_tries`` 3 (the defaults) and ``storage_refresh`` 0.1 s.
A ``redis-server`` is started on a free port (Debian package ``redis-server``). Usage::

    .venv/bin/python benchmarks/shared_breaker.py [--only checkout|spread]
        [--rounds 7] [--calls 2000] [--runs 3] [--processes 8] [--link refused|blackhole]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.db import connections  # noqa: E402

from django_asyncpool import CircuitOpenError, ConnectionPool  # noqa: E402
from django_asyncpool.core import registry as _registry  # noqa: E402
from tests.breaker_worker import Worker  # noqa: E402
from tests.proxy import TcpProxy  # noqa: E402
from tests.redisserver import RedisServer  # noqa: E402

REFRESH = 0.1


def alias_settings(**options: Any) -> dict[str, Any]:
    settings_dict = copy.deepcopy(connections["default"].settings_dict)
    settings_dict["NAME"] = "postgres"
    settings_dict["OPTIONS"] = options
    return settings_dict


def add_alias(alias: str, settings_dict: dict[str, Any]) -> None:
    settings.DATABASES[alias] = connections.settings[alias] = settings_dict


# -- 1. the cost on a healthy checkout ---------------------------------------------------------


def checkout(redis_url: str, rounds: int, calls: int) -> None:
    shared = {"storage": redis_url, "storage_refresh": REFRESH}
    add_alias("bench_local", alias_settings())
    add_alias("bench_shared", alias_settings(circuit_breaker=shared))
    guards = {name: _registry.guard(f"bench_{name}") for name in ("local", "shared")}

    def guard_only(name: str) -> float:
        run, acquire, n = guards[name].run, object, calls * 50  # ~0.5 us each: more of them
        started = time.perf_counter()
        for _ in range(n):
            run(acquire)
        return (time.perf_counter() - started) / n * 1e6

    async def checkouts(name: str) -> float:
        pool = ConnectionPool(f"bench_{name}")
        started = time.perf_counter()
        for _ in range(calls):
            async with pool.connection() as conn:
                await conn.fetchval("select 1")
        return (time.perf_counter() - started) / calls * 1e6

    loop = asyncio.new_event_loop()
    loop.run_until_complete(checkouts("local"))  # warm both pools up
    loop.run_until_complete(checkouts("shared"))
    results: dict[tuple[str, str], list[float]] = {}
    for round_ in range(rounds):
        order = ("local", "shared") if round_ % 2 == 0 else ("shared", "local")
        for name in order:
            results.setdefault(("guard", name), []).append(guard_only(name))
            results.setdefault(("checkout", name), []).append(
                loop.run_until_complete(checkouts(name))
            )
    loop.close()
    print(f"healthy checkout, {rounds} rounds x {calls} calls, medians (us per call):")
    for what in ("guard", "checkout"):
        local = statistics.median(results[what, "local"])
        shared_us = statistics.median(results[what, "shared"])
        ratios = [
            s / lo for s, lo in zip(results[what, "shared"], results[what, "local"], strict=True)
        ]
        print(
            f"  {what:9} local {local:8.2f}  shared {shared_us:8.2f}  "
            f"ratio {shared_us / local:.3f} (per round {min(ratios):.2f}-{max(ratios):.2f})"
        )
    assert guards["shared"].state == "closed"
    for name in guards:
        _registry.reset(f"bench_{name}")  # stop following Redis before it goes away


# -- 2. from the first failure to every process failing fast -----------------------------------


def spread_once(redis: RedisServer, link: str, processes: int, shared: bool) -> float:
    proxy = TcpProxy(*_server())
    breaker: dict[str, Any] = {"fail_max": 5, "reset_timeout": 60}
    if shared:
        breaker.update(storage=redis.url, storage_refresh=REFRESH)
    settings_dict = alias_settings(
        connect_timeout=1, circuit_breaker=breaker, retry={"max_tries": 3}
    )
    settings_dict.update(HOST=proxy.host, PORT=proxy.port)
    alias = f"spread{time.monotonic_ns()}"  # fresh keys in Redis each run
    spec = json.loads(json.dumps(settings_dict, default=str))
    workers = [Worker(alias, spec) for _ in range(processes)]
    try:
        for worker in workers:
            assert worker.ask("call")["ok"]
        seconds = 12.0 if link == "blackhole" else 4.0
        for worker in workers:
            worker.send("load", seconds=seconds, pause=0.02)
        time.sleep(0.3)
        broken = time.time()
        proxy.cut()  # the connections open now die (else their queries would hang)
        if link == "blackhole":
            proxy.blackhole()  # and a new one hangs until its connect_timeout
        loads = [worker._read() for worker in workers]
    finally:
        for worker in workers:
            with contextlib.suppress(OSError):
                worker.send("quit")  # all at once: each takes a moment to exit
        for worker in workers:
            worker.close()
        proxy.close()
    fast = [load["first_fast"] for load in loads]
    if None in fast:
        raise RuntimeError(f"a process never failed fast: {[load['outcomes'] for load in loads]}")
    # The link breaking is the first failure: the queries on the connections it kills fail
    # at once (a worker notes the end of a failed call, later than its first failed try).
    return max(fast) - broken


def _server() -> tuple[str, int]:
    default = connections["default"].settings_dict
    return default["HOST"], int(default["PORT"])


def spread(redis: RedisServer, link: str, runs: int, processes: int) -> None:
    times: dict[bool, list[float]] = {False: [], True: []}
    for run in range(runs):
        for shared in (False, True) if run % 2 == 0 else (True, False):
            times[shared].append(spread_once(redis, link, processes, shared))
    local, shared = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"{processes} processes, link {link}: link broken -> all fail fast "
        f"({CircuitOpenError.__name__}), median of {runs} runs:"
    )
    print(f"  local state  {local * 1000:8.0f} ms  (runs: {_ms(times[False])})")
    print(f"  shared state {shared * 1000:8.0f} ms  (runs: {_ms(times[True])})")
    print(f"  ratio shared / local {shared / local:.3f}")


def _ms(values: list[float]) -> str:
    return ", ".join(f"{v * 1000:.0f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("checkout", "spread"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--link", choices=("refused", "blackhole"))
    args = parser.parse_args()
    redis = RedisServer()
    try:
        if args.only in (None, "checkout"):
            checkout(redis.url, args.rounds, args.calls)
        if args.only in (None, "spread"):
            for link in [args.link] if args.link else ["refused", "blackhole"]:
                spread(redis, link, args.runs, args.processes)
    finally:
        redis.close()


if __name__ == "__main__":
    main()
