"""The cost of the pool metrics: the async pool with metrics on and off, side by side.

    python benchmarks/bench_metrics.py [--rounds 7] [--seconds 2] [--slice 0.1]

Two aliases on the same server and the same pool sizes: ``default`` (metrics on,
the default) and ``metrics_off`` (``OPTIONS["metrics"] = False``: no timing, not
exported). bench_async.py's primary-key lookup runs through ``session_scope()`` and
through the ``pool.connection()`` fast path, at concurrency 1 and 32. Each round
gives each variant ``--seconds``, cut into ``--slice`` slices alternating on, off,
off, on ... so that load from other processes falls evenly on both. A scrape runs
between slices, as Prometheus would (far more often, in fact). Reported: median
ops/s of each and their ratio; this process's CPU time per operation, on and off;
and the same from the least disturbed slices (their 10th percentile): on a machine
shared with other work, throughput swings with its load, and other processes only
ever add to an operation's CPU time. The bar: overhead <= 3%. Then the cost of the
instrumentation alone per checkout, in nanoseconds, beside what updating
prometheus_client objects on every checkout would cost.
Uses DATABASE_URL, or starts the embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_async  # sets Django up
from django.conf import settings
from django.db import connections
from prometheus_client import REGISTRY, generate_latest

from django_asyncpool import ConnectionPool
from django_asyncpool.core import registry as _registry
from django_asyncpool.core import stats as _stats
from django_asyncpool.sqla.engines import connect_kwargs

OFF = "metrics_off"
Op = Callable[[int], Awaitable[object]]


def add_alias_without_metrics() -> None:
    """Add ``metrics_off``: the default alias's settings with ``OPTIONS["metrics"] = False``."""
    settings_dict = copy.deepcopy(connections["default"].settings_dict)
    settings_dict["OPTIONS"] = {**settings_dict.get("OPTIONS", {}), "metrics": False}
    settings.DATABASES[OFF] = settings_dict
    connections.settings[OFF] = settings_dict
    assert not _registry.config(OFF).metrics and _registry.config("default").metrics


def ops(alias: str) -> dict[str, Op]:
    pool = ConnectionPool(alias)

    async def scope(pk: int) -> object:
        async with pool.session_scope() as session:
            return (await session.execute(bench_async.TEXT, {"pk": pk})).one()

    async def fast_path(pk: int) -> object:
        async with pool.connection() as conn:
            return await conn.fetchrow(bench_async.SQL, pk)

    return {"session_scope()": scope, "pool.connection()": fast_path}


async def compare(
    on: Op, off: Op, concurrency: int, rounds: int, seconds: float, slice_s: float
) -> dict[str, list[float]]:
    """Return ops/s with metrics on and off per round, and CPU seconds per op per slice."""
    slices = max(2, round(seconds / slice_s))
    per_slice = seconds / slices
    out: dict[str, list[float]] = {"on": [], "off": [], "slice_on": [], "slice_off": []}
    out |= {"cpu_on": [], "cpu_off": []}
    for _ in range(rounds):
        done = {"on": 0.0, "off": 0.0}
        cpu = {"on": 0.0, "off": 0.0}
        for i in range(slices):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            for name in order:
                fn = on if name == "on" else off
                started = time.process_time()
                ops = await bench_async.measure(fn, concurrency, per_slice) * per_slice
                spent = time.process_time() - started
                done[name] += ops
                cpu[name] += spent
                out[f"slice_{name}"].append(spent / ops)
            generate_latest(REGISTRY)  # a scrape: the flush runs between slices
        for name in ("on", "off"):
            out[name].append(done[name] / seconds)
            out[f"cpu_{name}"].append(cpu[name] / done[name])
    return out


def _low(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[0]


def per_checkout_cost(n: int = 200_000) -> dict[str, float]:
    """Nanoseconds per checkout of what the metrics add, and of the alternative."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    stats = _stats.Stats()
    perf = time.perf_counter

    def ours() -> None:  # what connect() and the checkout/checkin events add
        started = perf()
        stats.checkouts += 1
        stats.latency.observe(perf() - started)
        taken = time.monotonic()
        stats.reused += 1
        stats.held.observe(time.monotonic() - taken)

    registry = CollectorRegistry()
    attempts = Counter("a_total", "a", ["alias", "pool", "outcome"], registry=registry)
    latency = Histogram("l_seconds", "l", ["alias", "pool"], registry=registry)
    held = Histogram("h_seconds", "h", ["alias", "pool"], registry=registry)
    reused = Counter("r_total", "r", ["alias", "pool"], registry=registry)

    ok = attempts.labels("default", "async", "success")
    lat, hold = latency.labels("default", "async"), held.labels("default", "async")
    reuse = reused.labels("default", "async")

    def prometheus_direct() -> None:  # the same, on prometheus_client objects (cached children)
        started = perf()
        ok.inc()
        lat.observe(perf() - started)
        taken = time.monotonic()
        reuse.inc()
        hold.observe(time.monotonic() - taken)

    def nothing() -> None:
        return None

    out = {}
    for name, fn in (("baseline", nothing), ("ours", ours), ("prometheus", prometheus_direct)):
        best = float("inf")
        for _ in range(5):
            started = perf()
            for _ in range(n):
                fn()
            best = min(best, (perf() - started) / n * 1e9)
        out[name] = best
    return {
        "ours": out["ours"] - out["baseline"],
        "prometheus": out["prometheus"] - out["baseline"],
    }


async def main(rounds: int, seconds: float, slice_s: float) -> None:
    add_alias_without_metrics()
    await bench_async.prepare(connect_kwargs(_registry.config("default")))
    on_ops, off_ops = ops("default"), ops(OFF)
    for fn in (*on_ops.values(), *off_ops.values()):  # warm both pools up
        await asyncio.gather(*(fn(pk) for pk in range(1, 33)))

    worst = 0.0
    for concurrency in (1, 32):
        print(
            f"\nconcurrency {concurrency}: {rounds} rounds of {seconds:g}s per variant, "
            f"alternating {slice_s:g}s slices; medians over rounds"
        )
        print(
            f"  {'path':18} {'on ops/s':>9} {'off ops/s':>10} {'on/off':>7} "
            f"{'CPU us/op on':>13} {'off':>6} {'CPU overhead':>13}"
        )
        for name in on_ops:
            r = await compare(on_ops[name], off_ops[name], concurrency, rounds, seconds, slice_s)
            ratios = [a / b for a, b in zip(r["on"], r["off"], strict=True)]
            cpu = [a / b - 1 for a, b in zip(r["cpu_on"], r["cpu_off"], strict=True)]
            ratio, extra = statistics.median(ratios), statistics.median(cpu)
            # Other processes only ever add to an operation's CPU time (cache, frequency,
            # preemption): the least disturbed slices show what the code itself costs.
            low = _low(r["slice_on"]) / _low(r["slice_off"]) - 1
            # Each slice of one is next to the same slice of the other: one pair each.
            pairs = statistics.median(
                a / b - 1 for a, b in zip(r["slice_on"], r["slice_off"], strict=True)
            )
            worst = max(worst, pairs)
            print(
                f"  {name:18} {statistics.median(r['on']):9.0f} "
                f"{statistics.median(r['off']):10.0f} {ratio:7.3f} "
                f"{statistics.median(r['cpu_on']) * 1e6:13.1f} "
                f"{statistics.median(r['cpu_off']) * 1e6:6.1f} {extra * 100:12.1f}%"
                f"   (throughput ratio per round {min(ratios):.2f}-{max(ratios):.2f})"
            )
            print(
                f"  {'':18} CPU per op, median over {len(r['slice_on'])} adjacent slice pairs: "
                f"overhead {pairs * 100:.1f}%; least disturbed slices (10th percentile): "
                f"on {_low(r['slice_on']) * 1e6:.1f} us, off {_low(r['slice_off']) * 1e6:.1f} us, "
                f"overhead {low * 100:.1f}%"
            )
    cost = per_checkout_cost()
    print(
        f"\nper checkout: the metrics add {cost['ours']:.0f} ns; the same on prometheus_client "
        f"objects would add {cost['prometheus']:.0f} ns"
    )
    print(f"bar: overhead <= 3.0% -> worst CPU overhead per op (slice pairs) {worst * 100:.1f}%")
    for alias in ("default", OFF):
        await ConnectionPool(alias).close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--slice", type=float, default=0.1)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.seconds, args.slice))
