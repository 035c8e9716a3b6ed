"""Soak: the load matrix, our pools beside the peers a user would pick instead.

    python benchmarks/soak_matrix.py [--quick] [--seconds 0.5] [--rounds 3] [--down 1.5]
        [--pool-size 8] [--overflows 0,4] [--multiples 0.5,1,2.5,4,10]
        [--fault-multiples 1,4,10] [--scenarios steady,restart,terminate,blackhole]
        [--timeout 5]

Each cell is a pool size (``--pool-size`` + an overflow of ``--overflows``: the cap
is pool_size + max_overflow on the async side, ``max_size`` on the sync side) and a
concurrency (``--multiples`` of the cap), every worker sending primary-key lookups
back to back (tests/loadmatrix.py). The clients, each with its own pool of the
same size and timeout:

- ours: ``session_scope()`` (async tasks on one loop) and the ENGINE through
  ``connections[alias]`` (threads), one alias; the native async ORM
  (``OPTIONS["async_orm"]``, a query through ``orm.native.run()`` as ``aget()`` runs
  it: tasks on one loop), an alias of its own;
- bare SQLAlchemy: ``create_async_engine(pool_size=, max_overflow=, pool_timeout=)``
  with an ``AsyncSession`` in a transaction, the same work as ``session_scope()``;
- Django's own ``django.db.backends.postgresql`` with ``OPTIONS["pool"]`` (threads):
  the same ORM work as our ENGINE, on psycopg_pool;
- psycopg_pool's ``ConnectionPool`` (threads), without Django.

Scenarios: ``steady`` runs each client alone (an event loop, or its threads, as in
an application), the clients one after another, ``--rounds`` times in alternating
order, ``--seconds`` each: our p99 wait (and connect time) is divided by each peer's
within a round, and the median of those ratios printed. A fault runs the async
clients at once (each on its own event loop and thread), then the threaded ones,
through one fault each:
``--seconds`` of load, ``--down`` seconds of the fault, then 2 s:

- ``restart``: the embedded server stopped (``pg_ctl stop -m fast``) and started;
- ``terminate``: ``pg_terminate_backend`` of every client backend;
- ``blackhole``: every client through a TCP proxy (tests/proxy.py) that drops every
  byte, then resets the connections it held (as a failover or a lost NAT entry does)
  and lets new ones through.

Printed per cell and client: requests, errors by type, p50/p99/max *wait* (the time
in the pool's own checkout, of the requests that got a connection, timed alike for
every client by wrapping that one method on the instance: ``get_new_connection()`` of
both Django ENGINEs, ours with its breaker, retries and liveness check as
``Stats.latency`` counts it; psycopg_pool's ``getconn()``; ``Pool.connect()`` of both
SQLAlchemy engines), the p99 *connect* time (from the start of the request to a
connection it can use: the wait plus the caller's path around it, Django's
``ensure_connection()`` or a session's ``connection()``), the median hold, the most
later arrivals served before one request (*overtaken*: 0 in a queue served in order;
for the threaded clients, counted in the pool's own handoffs, see tests/loadmatrix.py),
workers stuck afterwards, and the ratios of our p99 wait and p99 connect time to each
peer's; for a fault, when the last error happened after the fault ended. Then the
steady cells, and the faults, as Markdown tables (docs/reliability.md, "Load matrix").
Needs the embedded server for the faults (no DATABASE_URL). About 5 minutes in full,
2 with ``--quick`` (on a busy 2-core machine).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

import django

django.setup()

from django.conf import settings  # noqa: E402
from django.db import connections  # noqa: E402

from testproject import pgserver  # noqa: E402
from tests.conftest import terminate_backends  # noqa: E402
from tests.loadmatrix import (  # noqa: E402
    Client,
    DjangoOrm,
    Figures,
    NativeOrm,
    OurScope,
    PsycopgPool,
    Sizes,
    SqlAlchemySession,
    ensure_table,
    our_options,
    run,
)
from tests.proxy import TcpProxy  # noqa: E402

SCENARIOS = ("steady", "restart", "terminate", "blackhole")
#: Whose p99 wait each of ours is compared with: the peer doing the same work first.
PEERS = {
    OurScope.name: ("SQLAlchemy AsyncSession",),
    NativeOrm.name: ("SQLAlchemy AsyncSession",),
    NativeOrm.portal_name: ("SQLAlchemy AsyncSession",),
    "ours: ENGINE (threads)": ("Django pool (threads)", PsycopgPool.name),
}
_aliases = iter(range(1, 1_000_000))


def clients(sizes: Sizes, base: dict[str, Any], **where: Any) -> list[Client]:
    """Return every client of a cell, each with a new pool of ``sizes``."""
    entry = {**base, **where}
    ours = f"matrix{next(_aliases)}"
    django_alias = f"{ours}_django"
    add_alias(ours, entry, our_options(sizes))
    add_alias(f"{ours}_native", entry, our_options(sizes, async_orm=True))  # its own breaker
    add_alias(f"{ours}_portal", entry, our_options(sizes, async_orm=True))
    add_alias(
        django_alias,
        {**entry, "ENGINE": "django.db.backends.postgresql"},
        {
            "connect_timeout": int(sizes.connect_timeout),
            "pool": {"min_size": sizes.pool_size, "max_size": sizes.cap, "timeout": sizes.timeout},
        },
    )
    return [
        OurScope(ours),
        NativeOrm(f"{ours}_native"),
        NativeOrm(f"{ours}_portal", portal=True),
        SqlAlchemySession(entry, sizes),
        DjangoOrm(ours),
        DjangoOrm(django_alias, "Django pool (threads)"),
        PsycopgPool(entry, sizes),
    ]


def add_alias(alias: str, entry: dict[str, Any], options: dict[str, Any]) -> None:
    entry = {**entry, "OPTIONS": options}
    settings.DATABASES[alias] = entry
    connections.settings[alias] = entry


def merge(runs: Sequence[Figures]) -> Figures:
    """Return the figures of several rounds of one client as one."""
    total = Figures(runs[0].name)
    for f in runs:
        total.requests += f.requests
        total.errors.update(f.errors)
        total.samples.update(f.samples)
        total.waits += f.waits
        total.connects += f.connects
        total.holds += f.holds
        total.error_times += f.error_times
        total.stuck += f.stuck
        total.overtaken = max(total.overtaken, f.overtaken)
        total.served_meanwhile = max(total.served_meanwhile, f.served_meanwhile)
    return total


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}" if seconds < 0.1 else f"{seconds * 1e3:.0f}"


Ratios = dict[str, dict[str, float]]


def ratios(figures: dict[str, Figures], measure: str = "wait") -> Ratios:
    """Return, for each of ours, its p99 ``measure`` (wait, connect) over each peer's."""
    out: Ratios = {}
    for ours, peers in PEERS.items():
        if ours in figures:
            mine = getattr(figures[ours], measure)(0.99)
            out[ours] = {p: mine / max(getattr(figures[p], measure)(0.99), 1e-6) for p in peers}
    return out


def print_cell(
    title: str,
    figures: dict[str, Figures],
    compared: Ratios,
    fault_ends: dict[str, float] | None = None,
    connects: Ratios | None = None,
) -> None:
    print(f"\n== {title}")
    head = f"  {'client':27s} {'requests':>8s}  {'wait ms: p50':>12s} {'p99':>7s} {'max':>7s}"
    head += f" {'connect p99':>11s} {'hold p50':>8s} {'overtaken':>9s} {'stuck':>5s}"
    print(head + ("  recovered" if fault_ends is not None else "") + "  errors")
    for name, f in figures.items():
        errors = ", ".join(f"{k} {v}" for k, v in f.errors.most_common()) or "0"
        line = (
            f"  {name:27s} {f.requests:8d}  {ms(f.wait(0.5)):>12s} {ms(f.wait(0.99)):>7s} "
            f"{ms(max(f.waits, default=0.0)):>7s} {ms(f.connect(0.99)):>11s} "
            f"{ms(f.hold_p50):>8s} {f.overtaken:9d} "
            f"{f.stuck:5d}"
        )
        if fault_ends is not None:  # the last error, after the fault ended
            end = fault_ends[name]
            line += f"  {max(max(f.error_times, default=end) - end, 0.0):8.2f}s"
        print(f"{line}  {errors}")
        for peer, ratio in compared.get(name, {}).items():
            print(f"  {'':27s} p99 wait {ratio:.2f}x {peer}'s")
        for peer, ratio in (connects or {}).get(name, {}).items():
            print(f"  {'':27s} p99 connect {ratio:.2f}x {peer}'s")
    for f in figures.values():
        for kind, sample in f.samples.items():
            print(f"    {f.name} {kind}: {sample}"[:240])


def steady(
    sizes: Sizes, workers: int, base: dict[str, Any], args: Any
) -> tuple[dict[str, Figures], Ratios, Ratios]:
    """Return each client's figures over ``--rounds`` rounds, our median p99 ratios.

    Ratios of the wait, then of the connect time.
    Each client runs alone (one event loop or its threads, as in an application), the
    clients one after another, in the reverse order every other round; a ratio is
    taken within each round (runs a few seconds apart), then the median of the rounds.
    """
    cell = clients(sizes, base)
    runs: dict[str, list[Figures]] = collections.defaultdict(list)
    for r in range(args.rounds):
        for client in cell if r % 2 == 0 else cell[::-1]:
            [f] = run(
                [client],
                workers,
                seconds=args.seconds,
                warmup=args.warmup,
                prewarm=min(workers, sizes.cap),
            )
            runs[client.name].append(f)
    medians = []
    for measure in ("wait", "connect"):
        per_round = [
            ratios({c.name: runs[c.name][r] for c in cell}, measure) for r in range(args.rounds)
        ]
        medians.append(
            {
                ours: {p: statistics.median(rr[ours][p] for rr in per_round) for p in peers}
                for ours, peers in per_round[0].items()
            }
        )
    return {c.name: merge(runs[c.name]) for c in cell}, medians[0], medians[1]


def faulty(
    scenario: str, sizes: Sizes, workers: int, base: dict[str, Any], args: Any
) -> dict[str, tuple[Figures, float]]:
    """Return each client's figures and when the fault ended.

    The async clients go through one fault together, then the threaded ones through
    another: a hundred threads would starve an event loop of the GIL.
    """
    pg = pgserver.current()
    assert pg is not None
    out: dict[str, tuple[Figures, float]] = {}
    proxy = TcpProxy(pg.host, pg.port) if scenario == "blackhole" else None
    where = {"HOST": proxy.host, "PORT": proxy.port} if proxy is not None else {}
    cell = clients(sizes, base, **where)
    ends: list[float] = []

    def fault() -> None:
        time.sleep(args.seconds)
        if scenario == "restart":
            pg.stop("fast")
            time.sleep(args.down)
            pg.start()
        elif scenario == "terminate":
            terminate_backends(pg)
        else:
            assert proxy is not None
            proxy.blackhole()
            time.sleep(args.down)
            proxy.cut()  # what was sent into the hole is lost: reset what hangs on it
            proxy.restore()
        ends.append(time.perf_counter())
        time.sleep(2.0)

    try:
        for threaded in (False, True):
            group = [c for c in cell if c.threaded is threaded]
            figures = run(
                group,
                workers,
                warmup=args.warmup,
                during=fault,
                grace=sizes.timeout + 5,
                prewarm=min(workers, sizes.cap),
            )
            out.update((f.name, (f, ends[-1])) for f in figures)
    finally:
        if not pg.is_running():
            pg.start()
        if proxy is not None:
            proxy.close()
    return {c.name: out[c.name] for c in cell}


Row = tuple[str, int, dict[str, Figures], Ratios, Ratios]


def markdown(rows: list[Row]) -> None:
    """Print the steady cells: p99 / max wait (p99 connect) in ms per client, our ratios."""
    names = list(rows[0][2])
    print(
        "\n| cell | workers | "
        + " | ".join(names)
        + " | ours / peer, p99 wait (median) | ours / peer, p99 connect (median) |"
    )
    print("|---|---:|" + "---:|" * len(names) + "---|---|")
    for title, workers, figures, compared, connects in rows:
        cells = []
        for name in names:
            f = figures[name]
            errors = sum(f.errors.values())
            cell = f"{ms(f.wait(0.99))} / {ms(max(f.waits, default=0.0))} ({ms(f.connect(0.99))})"
            cells.append(cell + (f" ({errors} errors)" if errors else ""))
        both = [
            ", ".join(
                f"{r:.2f}x {peer.split(' ')[0]}" for ours in rr for peer, r in rr[ours].items()
            )
            for rr in (compared, connects)
        ]
        print(f"| {title} | {workers} | " + " | ".join(cells) + f" | {' | '.join(both)} |")


def fault_markdown(rows: list[tuple[str, dict[str, tuple[Figures, float]]]]) -> None:
    """Print the fault cells: per client, errors, then the last one after the fault ended."""
    names = list(rows[0][1])
    print("\n| fault, cell | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for title, both in rows:
        cells = []
        for name in names:
            f, end = both[name]
            last = max(max(f.error_times, default=end) - end, 0.0)
            kinds = ", ".join(f"{v} {k}" for k, v in f.errors.most_common())
            longest = ms(max(f.connects, default=0.0))  # to a usable connection
            cells.append(
                f"{kinds or 'no errors'}; last {last:.2f} s after; max connect {longest} ms"
            )
        print(f"| {title} | " + " | ".join(cells) + " |")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run: fewer, shorter cells")
    parser.add_argument("--seconds", type=float, default=0.5, help="per client and round")
    parser.add_argument("--rounds", type=int, default=3, help="steady rounds, interleaved")
    parser.add_argument("--warmup", type=float, default=0.2)
    parser.add_argument("--down", type=float, default=1.5, help="seconds of each fault")
    parser.add_argument("--pool-size", type=int, default=8)
    parser.add_argument("--overflows", default="0,4")
    parser.add_argument("--multiples", default="0.5,1,2.5,4,10")
    parser.add_argument("--fault-multiples", default="1,4,10", help="the cells with faults")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--timeout", type=float, default=5.0, help="every pool's timeout")
    args = parser.parse_args(argv)
    if args.quick:  # what is not given on the command line
        quick = {
            "seconds": 0.4,
            "rounds": 2,
            "down": 1.0,
            "multiples": "1,4,10",
            "fault_multiples": "4",
        }
        for key, value in quick.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    scenarios = args.scenarios.split(",")
    if unknown := set(scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenarios {sorted(unknown)}: choose from {', '.join(SCENARIOS)}")
    if set(scenarios) - {"steady"} and pgserver.current() is None:
        sys.exit("the faults need the embedded server (it is stopped): unset DATABASE_URL")
    for name in ("django_asyncpool", "psycopg.pool", "sqlalchemy.pool"):  # faults: thousands
        logging.getLogger(name).setLevel(logging.CRITICAL)
    base = {k: v for k, v in settings.DATABASES["default"].items() if k != "OPTIONS"}
    ensure_table(base)
    multiples = [float(m) for m in args.multiples.split(",")]
    fault_multiples = [float(m) for m in args.fault_multiples.split(",")]
    overflows = [int(o) for o in args.overflows.split(",")]
    started = time.monotonic()
    print(
        f"pool_size {args.pool_size}, max_overflow {overflows}, timeout {args.timeout:g}s; "
        f"concurrency {multiples} x the cap (faults: {fault_multiples}); {args.seconds:g}s per "
        "client and round"
    )
    table: list[Row] = []
    faults: list[tuple[str, dict[str, tuple[Figures, float]]]] = []
    for scenario in scenarios:
        for overflow in overflows:
            sizes = Sizes(pool_size=args.pool_size, max_overflow=overflow, timeout=args.timeout)
            for multiple in multiples if scenario == "steady" else fault_multiples:
                workers = max(1, round(multiple * sizes.cap))
                title = f"overflow {overflow} (cap {sizes.cap}), {multiple:g}x"
                if scenario == "steady":
                    figures, compared, connects = steady(sizes, workers, base, args)
                    print_cell(
                        f"steady, {title} = {workers} workers", figures, compared, None, connects
                    )
                    table.append((title, workers, figures, compared, connects))
                else:
                    both = faulty(scenario, sizes, workers, base, args)
                    faults.append((f"{scenario}, {title}", both))
                    figures = {name: f for name, (f, _) in both.items()}
                    print_cell(
                        f"{scenario}, {title} = {workers} workers",
                        figures,
                        ratios(figures),
                        {name: end for name, (_, end) in both.items()},
                    )
    if table:
        markdown(table)
    if faults:
        fault_markdown(faults)
    print(f"\n{time.monotonic() - started:.0f}s in all")


if __name__ == "__main__":
    main(sys.argv[1:])
