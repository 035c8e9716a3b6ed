"""Django's async ORM natively (``OPTIONS["async_orm"]``) against its thread hop and the sync ORM.

    python benchmarks/bench_async_orm.py [--seconds 1.5] [--rounds 5] [--tasks 32]
                                         [--only hop|sync|layers]

Three operations on ``shop.Product`` (1,000 rows), each by ``--tasks`` concurrent
tasks on one alias with ``async_orm`` on:

- ``aget``: ``Product.objects.aget(pk=...)``, a random primary key;
- ``async for``: 100 rows, ``[p async for p in Product.objects.filter(pk__gt=...)[:100]]``;
- ``acount``: ``Product.objects.filter(pk__gt=...).acount()``.

Each natively, and through the thread hop that Django's own async methods take,
``await sync_to_async(qs.get)(pk=...)`` (what ``QuerySet.aget`` does when the option
is off), on the same alias and model. In each round the two run in alternating
quarter-second pieces (A B B A ...) until each has had ``--seconds``. Printed are the
medians of ops/s and of the per-round ratios native / thread hop, with the bar of
issue 15: ``aget`` >= 2x.

Then the native path's own cost (issue 22, part 3): each operation run one query
after another by one task, natively, against the same query in the sync ORM
(``Product.objects.using(alias).get(pk=...)``, ``list(...)``, ``.count()``: plain
sync code in the main thread, no event loop running, the alias's sync pool), in
alternating quarter-second pieces likewise. Printed are the medians of the CPU µs
per query (the process's CPU time, every thread) and of the per-round ratios
native / sync, with the bar: at most 1.1x. ``--only`` runs one of the two parts;
``--only layers`` shows what each layer of the native path adds, one on another
(a profiling aid that calls the package's private functions).

Uses DATABASE_URL, or starts the embedded PostgreSQL; migrates and loads the
products when they are missing.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
# As in production: DEBUG on would log every query, on both paths.
os.environ.setdefault("DJANGO_DEBUG", "0")

import django

django.setup()

from asgiref.sync import sync_to_async  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connections  # noqa: E402

from testproject.shop.models import Product  # noqa: E402

ROWS = 1_000
ALIAS = "bench_native"
#: Variant -> bar on native / thread hop (None: reported only).
BARS = {"aget": 2.0, "async for 100 rows": None, "acount": None}
#: The bar on the CPU per query of one task's native queries / the sync ORM's (issue 22).
SYNC_BAR = 1.1
#: Seconds of one piece of a variant's run; the two variants alternate piece by piece.
PIECE = 0.25


def prepare() -> list[int]:
    """Migrate, load the products when fewer than ROWS, add the alias; return the ids."""
    call_command("migrate", verbosity=0)
    missing = ROWS - Product.objects.using("default").count()
    if missing > 0:
        Product.objects.using("default").bulk_create(
            Product(sku=f"BENCH-{time.time_ns()}-{n}", name=f"bench {n}", price_cents=n)
            for n in range(missing)
        )
    settings_dict = copy.deepcopy(connections["default"].settings_dict)
    settings_dict["OPTIONS"]["async_orm"] = True
    settings.DATABASES[ALIAS] = connections.settings[ALIAS] = settings_dict
    ids = list(Product.objects.using("default").order_by("pk").values_list("pk", flat=True))
    connections.close_all()
    return ids


async def measure(
    fn: Callable[[], Awaitable[object]], tasks: int, seconds: float, in_portal: bool = False
) -> tuple[int, float, float]:
    """Return (operations, seconds, CPU seconds) of ``tasks`` tasks calling ``fn`` for ``seconds``
    (each task in a portal of its own: ``in_portal``, as requests of the package's ASGI
    application).

    The CPU time is this process's, all threads (the thread hop's thread too).
    """
    from django_asyncpool.orm.watchdog import portal

    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await fn()
            done += 1

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(portal(worker()) if in_portal else worker() for _ in range(tasks)))
    return done, time.perf_counter() - started, time.process_time() - cpu


async def interleaved(
    a: Callable[[], Awaitable[object]],
    b: Callable[[], Awaitable[object]],
    tasks: int,
    seconds: float,
    piece: float,
) -> list[tuple[float, float]]:
    """Return the ops/s and CPU µs per operation of ``a``, of ``a`` with each task in a
    portal, and of ``b``.

    They run in alternating pieces (A P B B P A ...).

    Load from other processes comes and goes within a second: short pieces share
    it out evenly between them.
    """
    runs = ((a, False), (a, True), (b, False))
    totals = [[0.0, 0.0, 0.0] for _ in runs]  # operations, seconds, CPU seconds
    order = (0, 1, 2, 2, 1, 0)
    n = 0
    while min(t[1] for t in totals) < seconds:
        which = order[n % 6]
        for i, value in enumerate(await measure(runs[which][0], tasks, piece, runs[which][1])):
            totals[which][i] += value
        n += 1
    return [(ops / wall, cpu / ops * 1e6) for ops, wall, cpu in totals]


def sync_loop(products: Any, ids: list[int], seconds: float) -> tuple[float, float]:
    """Return ops/s and CPU µs per op of plain ``get(pk=...)`` calls in this thread."""
    done = 0
    started, cpu = time.perf_counter(), time.thread_time()
    while time.perf_counter() - started < seconds:
        products.get(pk=random.choice(ids))
        done += 1
    took, cpu = time.perf_counter() - started, time.thread_time() - cpu
    connections.close_all()
    return done / took, cpu / done * 1e6


def sequential_sync(fn: Callable[[], object], seconds: float) -> tuple[int, float]:
    """Return (queries, CPU seconds) of ``fn`` called one after another for ``seconds``."""
    done = 0
    deadline = time.perf_counter() + seconds
    cpu = time.process_time()
    while time.perf_counter() < deadline:
        fn()
        done += 1
    return done, time.process_time() - cpu


async def sequential_native(
    fn: Callable[[], Awaitable[object]], seconds: float
) -> tuple[int, float]:
    """Return (queries, CPU seconds) of ``fn`` awaited one after another by one task."""
    done = 0
    deadline = time.perf_counter() + seconds
    cpu = time.process_time()
    while time.perf_counter() < deadline:
        await fn()
        done += 1
    return done, time.process_time() - cpu


def against_sync(
    runner: asyncio.Runner,
    native: Callable[[], Awaitable[object]],
    sync: Callable[[], object],
    seconds: float,
) -> tuple[float, float, float]:
    """Return the CPU µs per query of ``native`` (one task), of ``native`` in a portal
    (the task's own greenlet, as in a request of the package's ASGI application) and
    of ``sync`` (this thread).

    They run in alternating pieces (A B C C B A ...), the sync ones with no loop running.
    """
    from django_asyncpool.orm.watchdog import portal

    totals = [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]  # queries, CPU seconds
    order = (0, 1, 2, 2, 1, 0)
    for n in range(3 * max(1, round(seconds / PIECE))):
        which = order[n % 6]
        if which == 0:
            got = runner.run(sequential_native(native, PIECE))
        elif which == 1:
            got = runner.run(portal(sequential_native(native, PIECE)))
        else:
            got = sequential_sync(sync, PIECE)
            connections.close_all()  # back to the sync pool, as at the end of a request
        for i, value in enumerate(got):
            totals[which][i] += value
    return tuple(cpu / ops * 1e6 for ops, cpu in totals)  # type: ignore[return-value]


def variants(
    ids: list[int], pick: Callable[[list[int]], int] = random.choice
) -> dict[str, tuple[Any, Any, Any]]:
    """Return each operation's (native, thread hop, sync ORM) call; ``pick`` picks a key."""
    products = Product.objects.using(ALIAS)
    low = ids[: len(ids) - 100]  # a start with 100 rows after it

    async def native_aget() -> object:
        return await products.aget(pk=pick(ids))

    async def thread_aget() -> object:
        return await sync_to_async(products.get)(pk=pick(ids))

    def sync_get() -> object:
        return products.get(pk=pick(ids))

    async def native_rows() -> object:
        return [p async for p in products.filter(pk__gt=pick(low)).order_by("pk")[:100]]

    async def thread_rows() -> object:
        qs = products.filter(pk__gt=pick(low)).order_by("pk")[:100]
        return await sync_to_async(list)(qs)

    def sync_rows() -> object:
        return list(products.filter(pk__gt=pick(low)).order_by("pk")[:100])

    async def native_count() -> object:
        return await products.filter(pk__gt=pick(low)).acount()

    async def thread_count() -> object:
        return await sync_to_async(products.filter(pk__gt=pick(low)).count)()

    def sync_count() -> object:
        return products.filter(pk__gt=pick(low)).count()

    return {
        "aget": (native_aget, thread_aget, sync_get),
        "async for 100 rows": (native_rows, thread_rows, sync_rows),
        "acount": (native_count, thread_count, sync_count),
    }


def main(seconds: float, rounds: int, tasks: int, only: str | None) -> int:
    ids = prepare()
    calls = variants(ids)
    missed = []
    with asyncio.Runner() as runner:
        for native, thread, sync in calls.values():  # warm up: connections, code paths
            runner.run(gather(tasks, native, thread))
            for _ in range(tasks):
                sync()
            connections.close_all()
        if only in (None, "hop"):
            missed += runner.run(against_hop(calls, seconds, rounds, tasks, ids))
        if only in (None, "sync"):
            missed += against_sync_all(runner, calls, seconds, rounds)
        if only == "layers":
            layers(runner, {name: v[2] for name, v in calls.items()}, calls, rounds)
    return 1 if missed else 0


async def gather(tasks: int, *fns: Callable[[], Awaitable[object]]) -> None:
    await asyncio.gather(*(f() for f in fns for _ in range(tasks)))


async def against_hop(
    variants: dict[str, tuple[Any, Any, Any]],
    seconds: float,
    rounds: int,
    tasks: int,
    ids: list[int],
) -> list[str]:
    """Print native against the thread hop at ``tasks`` tasks; return the bars missed."""
    products = Product.objects.using(ALIAS)
    results: dict[str, list[list[tuple[float, float]]]] = {name: [] for name in variants}
    floor: list[tuple[float, float]] = []
    for n in range(rounds):
        for name, (native, thread, _) in variants.items():
            results[name].append(await interleaved(native, thread, tasks, seconds, PIECE))
        floor.append(await asyncio.to_thread(sync_loop, products, ids, seconds / 2))
        line = "  ".join(
            f"{k} {v[-1][0][0] / v[-1][2][0]:.2f}x {v[-1][1][0] / v[-1][2][0]:.2f}x"
            for k, v in results.items()
        )
        print(f"round {n + 1}: native / thread hop, tasks and portals  {line}", flush=True)

    print(f"\n{tasks} tasks, medians of {rounds} rounds of {seconds:g}s each, alias {ALIAS!r}")
    print(
        f"  {'operation':20} {'ops/s: native':>13} {'portals':>8} {'thread hop':>10}"
        f" {'ratios':>7} {'portals':>8} {'CPU µs/op: native':>18} {'portals':>8} {'thread hop':>10}"
    )
    missed = []
    for name, rounds_ in results.items():
        (native, portals, thread), (cpu_native, cpu_portals, cpu_thread) = (
            [statistics.median(r[v][i] for r in rounds_) for v in range(3)] for i in range(2)
        )
        ratio, ratio_portals = (
            statistics.median(r[v][0] / r[2][0] for r in rounds_) for v in range(2)
        )
        bar = BARS[name]
        verdict = ""
        if bar is not None:
            verdict = f"  (bar >= {bar:g}x: {'met' if ratio >= bar else 'MISSED'})"
            if ratio < bar:
                missed.append(name)
        print(
            f"  {name:20} {native:13.0f} {portals:8.0f} {thread:10.0f} {ratio:6.2f}x"
            f" {ratio_portals:7.2f}x {cpu_native:18.0f} {cpu_portals:8.0f} {cpu_thread:10.0f}"
            f"{verdict}"
        )
    print(
        "  ratios: the median of the per-round ratios to the thread hop's, in tasks (the bar)"
        " and with each task in a portal, as the package's ASGI application serves a request"
    )
    ops, cpu = (statistics.median(f[i] for f in floor) for i in range(2))
    print(
        f"  the same get() in a loop of one thread, no event loop: {ops:.0f} ops/s, "
        f"{cpu:.0f} CPU µs/op (what either path adds to Django's own work)\n",
        flush=True,
    )
    return missed


def against_sync_all(
    runner: asyncio.Runner,
    variants: dict[str, tuple[Any, Any, Any]],
    seconds: float,
    rounds: int,
) -> list[str]:
    """Print one task's native queries against the sync ORM's; return the bars missed."""
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    for n in range(rounds):
        for name, (native, _, sync) in variants.items():
            results[name].append(against_sync(runner, native, sync, seconds))
        line = "  ".join(
            f"{k} {v[-1][0] / v[-1][2]:.2f}x {v[-1][1] / v[-1][2]:.2f}x" for k, v in results.items()
        )
        print(f"round {n + 1}: CPU per query / sync ORM's, task and portal  {line}", flush=True)

    print(f"\n1 task against the sync ORM, medians of {rounds} rounds of {seconds:g}s each")
    print(
        f"  {'operation':20} {'CPU µs/query: sync ORM':>22} {'native':>7} {'ratio':>6}"
        f" {'quartiles':>11}  {'in a portal':>11} {'ratio':>6} {'quartiles':>11}"
    )
    missed = []
    for name, rounds_ in results.items():
        sync = statistics.median(r[2] for r in rounds_)
        cells = []
        for i in (0, 1):
            ratios = [r[i] / r[2] for r in rounds_]
            low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            cells.append(
                (statistics.median(r[i] for r in rounds_), statistics.median(ratios), low, high)
            )
        met = cells[1][1] <= SYNC_BAR
        if not met:
            missed.append(name)
        shown = "  ".join(
            f"{cpu:{w}.0f} {ratio:5.2f}x {low:5.2f}-{high:.2f}x"
            for (cpu, ratio, low, high), w in zip(cells, (7, 11), strict=True)
        )
        print(
            f"  {name:20} {sync:22.0f} {shown}  (bar <= {SYNC_BAR:g}x: "
            f"{'met' if met else 'MISSED'})"
        )
    print(
        "  ratio: the median of the per-round ratios to the sync ORM's; quartiles: of the"
        " per-round ratios (this machine's noise). The bar is judged in the portal: a request"
        " of django_asyncpool's ASGI application runs its view there.",
        flush=True,
    )
    return missed


def layers(
    runner: asyncio.Runner,
    queries: dict[str, Callable[[], object]],
    variants: dict[str, tuple[Any, Any, Any]],
    rounds: int,
    n: int = 300,
) -> None:
    """Print what each layer of the native path adds to the sync ORM's CPU per query.

    Each layer runs ``n`` queries by one task, in turn with the others (reversed every
    other round); each adds one piece to the one above it. They call the package's
    private functions: a profiling aid, not an API.
    """
    for name, query in queries.items():
        holder = runner.run(_holder())
        steps = _layer_steps(runner, holder, query, variants[name][0], n)
        cpu: dict[str, list[float]] = {step: [] for step in steps}
        for r in range(rounds):
            for step in steps if r % 2 == 0 else reversed(steps):
                started = time.process_time()
                steps[step]()
                cpu[step].append((time.process_time() - started) / n * 1e6)
        base = statistics.median(cpu["sync ORM"])
        print(f"\n{name}: CPU µs per query, medians of {rounds} rounds of {n} queries, 1 task")
        previous = base
        for step, values in cpu.items():
            value = statistics.median(values)
            print(
                f"  {step:45} {value:7.1f}  {value - base:+6.1f} over sync,"
                f" {value - previous:+6.1f} over the line above"
            )
            previous = value


def _layer_steps(
    runner: asyncio.Runner,
    holder: Any,
    query: Callable[[], object],
    method: Callable[[], Awaitable[object]],
    n: int,
) -> dict[str, Callable[[], None]]:
    """Return the layers of :func:`layers`, each running ``n`` queries."""
    from django_asyncpool.orm import native, watchdog

    async def bound() -> None:
        def body() -> None:
            lease = holder.checkout()
            previous = native.bind(ALIAS, lease.wrapper)
            native.share_debugging(lease.wrapper, previous)
            try:
                for _ in range(n):
                    query()
            finally:
                native.unbind(ALIAS, previous)
                holder.checkin(lease)

        await watchdog.spawn(body)

    def op() -> None:
        native._op(
            holder,
            ALIAS,
            native._task_wrappers(ALIAS)[0],
            native._MISSING,
            [],
            query,
            (),
            {},
        )

    async def checkouts() -> None:
        await watchdog.spawn(lambda: [op() for _ in range(n)])

    async def spawns() -> None:
        for _ in range(n):
            await watchdog.spawn(op)

    async def runs() -> None:
        for _ in range(n):
            await native.run(ALIAS, query)

    async def methods() -> None:
        for _ in range(n):
            await method()

    def sync() -> None:
        for _ in range(n):
            query()
        connections.close_all()

    return {
        "sync ORM": sync,
        "in a greenlet, the wrapper bound once": lambda: runner.run(bound()),
        "+ checkout, bind, unbind, checkin per query": lambda: runner.run(checkouts()),
        "+ a greenlet switch per query (spawn)": lambda: runner.run(spawns()),
        "+ native.run()": lambda: runner.run(runs()),
        "+ the async method (the whole native path)": lambda: runner.run(methods()),
    }


async def _holder() -> Any:
    from django_asyncpool.orm import pool as ormpool

    return ormpool.holder(ALIAS)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument(
        "--only",
        choices=("hop", "sync", "layers"),
        help="only native against the thread hop, or the sync ORM; or what each layer "
        "of the native path adds (not in the default run)",
    )
    args = parser.parse_args()
    sys.exit(main(args.seconds, args.rounds, args.tasks, args.only))
