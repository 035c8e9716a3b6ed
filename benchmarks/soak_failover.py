"""Soak: a failover under a steady write load, per path, beside the peers a user would pick.

    python benchmarks/soak_failover.py [--quick] [--writers 4] [--interval 0.025]
        [--warmup 3] [--window 10] [--reset-timeout S] [--scenarios demote,promote]
        [--variants ...] [--repeat 1] [--log]

Issue 21's figure: the time from the switch to 100 % successful writes. Two
throwaway servers (testproject/pgserver.py, never DATABASE_URL: the script turns
one read-only and stops another), the same table on both. Every client connects
with both hosts listed, the first one first, and ``target_session_attrs=read-write``
(libpq ``host=a,b port=pa,pb``; asyncpg lists; SQLAlchemy's
``?host=h:p&host=h:p&target_session_attrs=read-write``). The clients, each in its
own process (its own event loop or threads, as in an application), ``--writers``
writers each, every writer inserting one row every ``--interval`` seconds (a write
that comes back late is followed by the next at once, never by a burst):

- ``ours: ENGINE (threads)``: the ENGINE ``django_asyncpool``, ``Model.objects.create()``
  then ``connections[alias].close()`` (what the end of a request does);
- ``ours: session_scope()``: ``INSERT`` in ``session_scope(using=alias)`` (tasks);
- ``ours: async ORM``: ``await Model.objects.acreate()`` on an alias with
  ``OPTIONS["async_orm"]`` (tasks);
- ``SQLAlchemy``: ``create_async_engine()`` + asyncpg, its default queue pool
  (``pool_pre_ping`` off, ``pool_recycle`` -1: never), ``engine.begin()`` (tasks);
  ``SQLAlchemy pre_ping``: the same with ``pool_pre_ping=True``;
- ``Django pool (threads)``: Django's own ``django.db.backends.postgresql`` with
  ``OPTIONS["pool"]`` (psycopg_pool, ``max_lifetime`` 3600 s by default), the same
  ORM work as ours.

Our aliases keep the package's defaults but for the pool sizes (``--writers``) and
``--reset-timeout`` when given (``--quick``: 5 s). Scenarios, after ``--warmup``
seconds of load, then ``--window`` seconds of load:

- ``demote``: the first server turns read-only (``ALTER SYSTEM SET
  default_transaction_read_only = on; SELECT pg_reload_conf()``), as a primary
  demoted by Patroni or a switchover does: its sessions refuse writes with 25006.
  t=0 is the server's clock as it signals its backends;
- ``promote``: the second server is a streaming standby of the first
  (``pg_basebackup -R``); the first is stopped (``pg_ctl stop -m fast``), the
  standby promoted (``pg_ctl promote``). t=0 is the stop; the promotion's time is
  printed. The window is at least the breaker's ``reset_timeout`` + 8 s.

Printed per client and run: writes and errors after the switch (by type, one
message each), the time from the switch to the second server's first row of the
client (by the server's clock, which the client shares), to 100 % success (the end
of the first successful write after the last failed one, and not before that
first row; "not recovered" when writes still fail in the last second of the
window), the longest write, the rows the first server took after the switch (bar:
0; a write already on its way to an idle backend when the reload signal arrives
still commits, a few ms after t=0); then a Markdown table of every run and a
summary per client (docs/performance.md, "Failover under load"). About 2.5
minutes with ``--repeat 2``, 35 s with ``--quick``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import django  # noqa: E402
from django.conf import settings  # noqa: E402

from testproject.pgserver import LocalPostgres  # noqa: E402

TABLE = "soak_failover_write"
SCENARIOS = ("demote", "promote")
OURS = ("ours: ENGINE (threads)", "ours: session_scope()", "ours: async ORM")
PEERS = ("SQLAlchemy", "SQLAlchemy pre_ping", "Django pool (threads)")
VARIANTS = OURS + PEERS
#: Whose recovery each of ours is compared with: the peers doing the same work.
PAIRS = {
    "ours: ENGINE (threads)": ("Django pool (threads)",),
    "ours: session_scope()": ("SQLAlchemy", "SQLAlchemy pre_ping"),
    "ours: async ORM": ("SQLAlchemy", "Django pool (threads)"),
}
#: What the peers wait for, printed beside their figures.
RECYCLE = {
    "SQLAlchemy": "pool_recycle -1: never",
    "SQLAlchemy pre_ping": "pool_recycle -1: never; the ping passes on a live server",
    "Django pool (threads)": "psycopg_pool max_lifetime 3600 s",
}
#: A write: (start, end, error type or None, error message or None), in seconds of the
#: wall clock, which the servers on this machine share (their rows' ``at``).
Outcome = tuple[float, float, str | None, str | None]


def setup_django() -> None:
    """Configure Django (the aliases are added per scenario, before the fork)."""
    settings.configure(
        DEBUG=False,
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        INSTALLED_APPS=["django.contrib.contenttypes", "django_asyncpool"],
        DATABASES={"default": {"ENGINE": "django.db.backends.dummy"}},
    )
    django.setup()


setup_django()

from django.db import connections, models  # noqa: E402


class Write(models.Model):
    """One row per successful write; the server stamps ``at`` (clock_timestamp())."""

    variant = models.CharField(max_length=40)
    objects: models.Manager[Write] = models.Manager()

    class Meta:
        app_label = "soak_failover"
        db_table = TABLE
        managed = False


# -- the servers -------------------------------------------------------------------------


def create_table(pg: LocalPostgres) -> None:
    pg.psql(
        f"create table if not exists {TABLE} (id bigserial primary key, variant text not null, "
        "at timestamptz not null default clock_timestamp())"
    )


def servers(home: Path, scenario: str) -> tuple[LocalPostgres, LocalPostgres]:
    """Start the two servers of ``scenario``: two primaries, or a primary and its standby."""
    first = LocalPostgres(home / f"{scenario}-a")
    first.init()
    first.start()
    create_table(first)
    second = LocalPostgres(home / f"{scenario}-b")
    if scenario == "demote":
        second.init()
    else:
        second.datadir.mkdir(mode=0o700, parents=True)
        second._chown(second.datadir)
        first._run(
            "pg_basebackup",
            "-h",
            str(first.socket_dir),
            "-p",
            str(first.port),
            "-U",
            first.user,
            "-D",
            str(second.datadir),
            "-R",
            "-X",
            "stream",
            "--no-sync",
        )
    second.start()
    if scenario == "demote":
        create_table(second)
    else:  # the standby has replayed the table before it answers for it
        deadline = time.monotonic() + 30
        while second.psql(f"select to_regclass('{TABLE}') is not null") != "t":
            if time.monotonic() > deadline:
                raise RuntimeError("the standby did not replay the table in 30 s")
            time.sleep(0.1)
    return first, second


def rows_since(pg: LocalPostgres, since: float) -> dict[str, tuple[int, float, float]]:
    """Return, per variant, the rows ``pg`` took at or after ``since`` (time.time()), and
    the seconds from ``since`` to the first and the last of them."""
    out = pg.psql(
        f"select variant, count(*), extract(epoch from min(at)) - {since!r}, "
        f"extract(epoch from max(at)) - {since!r} "
        f"from {TABLE} where at >= to_timestamp({since!r}) group by 1"
    )
    rows = (line.split("|") for line in out.splitlines() if line)
    return {v: (int(n), float(first), float(last)) for v, n, first, last in rows}


# -- the clients -------------------------------------------------------------------------


def add_aliases(
    scenario: str, a: LocalPostgres, b: LocalPostgres, writers: int, reset_timeout: float | None
) -> None:
    """Add one alias per Django client, both hosts listed, the first one first."""
    conn = {
        "NAME": "postgres",
        "USER": a.user,
        "PASSWORD": a.password,
        "HOST": f"{a.host},{b.host}",
        "PORT": f"{a.port},{b.port}",
        "CONN_MAX_AGE": 0,
    }
    common: dict[str, object] = {"target_session_attrs": "read-write", "connect_timeout": 2}
    breaker = {} if reset_timeout is None else {"circuit_breaker": {"reset_timeout": reset_timeout}}
    sync_pool = {"min_size": writers, "max_size": writers, "timeout": 5}
    async_pool = {"pool_size": writers, "max_overflow": 0, "timeout": 5}
    entries: dict[str, tuple[str, dict[str, object]]] = {
        "ours: ENGINE (threads)": ("django_asyncpool", {"pool": sync_pool, **breaker}),
        "ours: session_scope()": ("django_asyncpool", {"async_pool": async_pool, **breaker}),
        "ours: async ORM": (
            "django_asyncpool",
            {"async_pool": async_pool, "async_orm": True, **breaker},
        ),
        "Django pool (threads)": ("django.db.backends.postgresql", {"pool": sync_pool}),
    }
    for variant, (engine, options) in entries.items():
        entry = {**conn, "ENGINE": engine, "OPTIONS": {**common, **options}}
        entry = connections.configure_settings({"default": entry})["default"]  # Django's defaults
        settings.DATABASES[alias(scenario, variant)] = entry
        connections.settings[alias(scenario, variant)] = entry


def alias(scenario: str, variant: str) -> str:
    return f"{scenario}_{variant.split(':')[-1].strip().split(' ')[0].strip('()')}".lower()


def sqlalchemy_url(a: LocalPostgres, b: LocalPostgres) -> str:
    password = quote(a.password, safe="")
    return (
        f"postgresql+asyncpg://{a.user}:{password}@/postgres?host={a.host}:{a.port}"
        f"&host={b.host}:{b.port}&target_session_attrs=read-write"
    )


@dataclass
class Job:
    """What one client process does: ``writers`` writers until ``end`` (time.time())."""

    scenario: str
    variant: str
    writers: int
    interval: float
    end: float
    url: str
    log: bool
    outcomes: list[Outcome] = field(default_factory=list)

    def record(self, t0: float, exc: BaseException | None) -> None:
        t1 = time.time()
        if exc is None:
            self.outcomes.append((t0, t1, None, None))
        else:
            message = " ".join(str(exc).split())[:160]
            self.outcomes.append((t0, t1, type(exc).__name__, message))

    def slots(self, n: int) -> float:
        """Return writer ``n``'s first tick: the writers spread over one interval."""
        return time.time() + self.interval * n / self.writers


def run_threads(job: Job, write: Callable[[], None]) -> None:
    def writer(n: int) -> None:
        tick = job.slots(n)
        while (now := time.time()) < job.end:
            if tick > now:
                time.sleep(tick - now)
            t0 = time.time()
            try:
                write()
            except Exception as exc:
                job.record(t0, exc)
            else:
                job.record(t0, None)
            tick = max(tick + job.interval, time.time())  # late: at once, no burst

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(job.writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


async def run_tasks(job: Job, write: Callable[[], Awaitable[None]]) -> None:
    async def writer(n: int) -> None:
        tick = job.slots(n)
        while (now := time.time()) < job.end:
            if tick > now:
                await asyncio.sleep(tick - now)
            t0 = time.time()
            try:
                await write()
            except Exception as exc:
                job.record(t0, exc)
            else:
                job.record(t0, None)
            tick = max(tick + job.interval, time.time())

    await asyncio.gather(*(writer(n) for n in range(job.writers)))


def client(job: Job, pipe: Connection) -> None:
    """Run one client in this (forked) process; send its outcomes back, or its traceback."""
    try:
        load(job)
    except BaseException:
        pipe.send(traceback.format_exc())
    else:
        pipe.send(job.outcomes)
    pipe.close()


def load(job: Job) -> None:
    """Run ``job``'s writers on its client's path until ``job.end``."""
    from sqlalchemy import text

    if not job.log:
        for name in ("django_asyncpool", "psycopg.pool", "sqlalchemy.pool"):  # thousands
            logging.getLogger(name).setLevel(logging.CRITICAL)
    else:
        logging.basicConfig(format=f"%(asctime)s {job.variant}: %(name)s %(message)s")
    db = alias(job.scenario, job.variant)
    insert = text(f"insert into {TABLE} (variant) values (:v)")

    if job.variant in ("ours: ENGINE (threads)", "Django pool (threads)"):

        def orm_write() -> None:
            try:
                Write.objects.using(db).create(variant=job.variant)
            finally:
                connections[db].close()  # the end of a request

        run_threads(job, orm_write)
    elif job.variant == "ours: session_scope()":
        from django_asyncpool import session_scope

        async def scope_write() -> None:
            async with session_scope(using=db) as session:
                await session.execute(insert, {"v": job.variant})

        asyncio.run(run_tasks(job, scope_write))
    elif job.variant == "ours: async ORM":

        async def native_write() -> None:
            await Write.objects.using(db).acreate(variant=job.variant)

        asyncio.run(run_tasks(job, native_write))
    else:
        from sqlalchemy.ext.asyncio import create_async_engine

        async def bare() -> None:
            engine = create_async_engine(
                job.url,
                pool_size=job.writers,
                max_overflow=0,
                pool_timeout=5,
                pool_pre_ping=job.variant == "SQLAlchemy pre_ping",
                connect_args={"timeout": 2},
            )

            async def sqla_write() -> None:
                async with engine.begin() as conn:
                    await conn.execute(insert, {"v": job.variant})

            try:
                await run_tasks(job, sqla_write)
            finally:
                await engine.dispose()

        asyncio.run(bare())


# -- one scenario ------------------------------------------------------------------------


@dataclass
class Figures:
    """One client's figures after the switch (seconds from the switch)."""

    warmup_writes: int
    warmup_errors: int
    writes: int
    errors: collections.Counter[str]
    samples: dict[str, str]
    recovered: float | None  # None: still failing in the last second
    longest: float  # the longest write that ended after the switch
    failing_at_end: float  # share of the writes of the window's last second that failed
    ok_after: int
    #: Rows on the first and the second server from the switch, by the server's clock.
    rows_first: int | None = None  # None: the server is stopped
    last_on_first: float = 0.0  # seconds from the switch to the last of them
    rows_second: int = 0
    first_on_second: float | None = None  # seconds from the switch to its first row

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def figures(outcomes: list[Outcome], switch: float, end: float) -> Figures:
    """Return the figures of a client's writes around a switch at ``switch``."""
    before = [o for o in outcomes if o[1] < switch]  # done before: a write across t=0 is after
    after = [o for o in outcomes if o[1] >= switch and o[0] < end]
    failed = [o for o in after if o[2] is not None]
    errors: collections.Counter[str] = collections.Counter(o[2] for o in failed if o[2])
    samples: dict[str, str] = {}
    for _, _, kind, message in failed:
        if kind and message and kind not in samples:
            samples[kind] = message
    last = [o for o in after if o[0] >= end - 1.0]
    failing = sum(o[2] is not None for o in last) / max(len(last), 1)
    last_error = max((o[1] for o in failed), default=switch)
    ok_after = sum(o[2] is None for o in after if o[0] >= switch)
    # 100 % success from the end of the first successful write after the last failure: a
    # write that waited for the new primary is only a success when it is done.
    back = min((o[1] for o in after if o[2] is None and o[1] > last_error), default=None)
    return Figures(
        warmup_writes=len(before),
        warmup_errors=sum(o[2] is not None for o in before),
        writes=len(after),
        errors=errors,
        samples=samples,
        recovered=None if failing or back is None else max(back - switch, 0.0),
        longest=max((o[1] - o[0] for o in after), default=0.0),
        failing_at_end=failing,
        ok_after=ok_after,
    )


def scenario_run(
    scenario: str, variants: list[str], args: argparse.Namespace, home: Path
) -> tuple[dict[str, Figures], str]:
    """Run ``scenario``; return each client's figures and what was done when."""
    a, b = servers(home, scenario)
    try:
        add_aliases(scenario, a, b, args.writers, args.reset_timeout)
        url = sqlalchemy_url(a, b)
        start = time.time()
        end = start + args.warmup + window(scenario, args)
        ctx = multiprocessing.get_context("fork")
        procs = []
        for variant in variants:
            ours, theirs = ctx.Pipe(duplex=False)
            job = Job(scenario, variant, args.writers, args.interval, end, url, args.log)
            proc = ctx.Process(target=client, args=(job, theirs), daemon=True)
            proc.start()
            procs.append((variant, proc, ours))
        time.sleep(max(start + args.warmup - time.time(), 0.0))
        if scenario == "demote":
            a.psql("alter system set default_transaction_read_only = on")  # a file: no effect yet
            # t=0: the server's clock when it signals its backends to reload.
            switch = since = float(
                a.psql("select extract(epoch from clock_timestamp()) from pg_reload_conf()")
            )
            note = "the first server turned read-only at t=0 (ALTER SYSTEM, pg_reload_conf())"
        else:
            switch = time.time()
            a.stop("fast")
            stopped = time.time() - switch
            since = time.time()  # rows before, on the standby, were the first server's
            b._run("pg_ctl", "-D", str(b.datadir), "-w", "promote")
            note = (
                f"the first server stopped at t=0 (pg_ctl stop -m fast took {stopped:.2f} s), "
                f"the standby promoted at t={time.time() - switch:.2f} s"
            )
        results: dict[str, Figures] = {}
        for variant, proc, pipe in procs:
            if not pipe.poll(max(end + 30 - time.time(), 1.0)):
                proc.kill()
                raise RuntimeError(f"{variant}: no result 30 s after the window")
            outcomes = pipe.recv()
            proc.join(5)
            if isinstance(outcomes, str):
                raise RuntimeError(f"{variant} failed:\n{outcomes}")
            results[variant] = figures(outcomes, switch, end)
        on_first = rows_since(a, switch) if a.is_running() else None
        on_second = rows_since(b, since)
        for variant, f in results.items():
            if on_first is not None:
                f.rows_first, _, f.last_on_first = on_first.get(variant, (0, 0.0, 0.0))
            f.rows_second, from_since, _ = on_second.get(variant, (0, None, 0.0))
            if from_since is not None:
                f.first_on_second = from_since + since - switch
            if f.recovered is not None:  # a write that waited is not back until B has it
                f.recovered = max(f.recovered, f.first_on_second or 0.0)
        return results, note
    finally:
        a.destroy()
        b.destroy()


def window(scenario: str, args: argparse.Namespace) -> float:
    """Return the seconds of load after the switch: in ``promote``, past the breaker's reset."""
    if scenario == "promote":
        return max(float(args.window), reset_timeout(args) + 8.0)
    return float(args.window)


def reset_timeout(args: argparse.Namespace) -> float:
    from django_asyncpool.config.model import BreakerConfig

    return float(args.reset_timeout or BreakerConfig().reset_timeout)


def seconds(value: float | None, window: float) -> str:
    return f"{value:.2f} s" if value is not None else f"not in {window:g} s"


def print_scenario(scenario: str, results: dict[str, Figures], note: str, span: float) -> None:
    print(f"\n== {scenario}: {note}; {span:g} s of load after it")
    print(
        f"  {'client':24s} {'warm-up writes':>16s} {'after: writes':>13s} {'errors':>6s} "
        f"{'1st row on B':>12s} {'100 % ok':>11s} {'longest':>8s} {'rows on A':>9s} {'on B':>5s}"
    )
    for variant, f in results.items():
        print(
            f"  {variant:24s} {f.warmup_writes:6d} ({f.warmup_errors:3d} err) {f.writes:13d} "
            f"{f.error_count:6d} {seconds(f.first_on_second, span):>12s} "
            f"{seconds(f.recovered, span):>11s} {f.longest:6.2f} s "
            f"{'stopped' if f.rows_first is None else f.rows_first:>9} {f.rows_second:5d}"
        )
        if f.recovered is None:
            print(
                f"  {'':24s} not recovered in {span:g} s: {f.error_count} errors, "
                f"{f.failing_at_end:.0%} of the last second's writes failed"
                + (f" ({RECYCLE[variant]})" if variant in RECYCLE else "")
            )
        if f.rows_first:
            print(
                f"  {'':24s} {f.rows_first} rows on A after the switch, the last "
                f"{f.last_on_first * 1e3:.0f} ms after it"
                + (
                    ": sent before its backend read the reloaded file"
                    if f.last_on_first < 0.1
                    else ""
                )
            )
        for kind, n in f.errors.most_common():
            print(f"  {'':24s} {n:5d} {kind}: {f.samples.get(kind, '')}"[:230])
    print(
        "  (A: the first server, B: the second; rows counted from the switch by the servers' "
        "clock; 100 % ok: the end of the first successful write after the last failure; "
        "longest: the longest write that ended after the switch)"
    )


def markdown(rows: list[tuple[str, dict[str, Figures], float]]) -> None:
    print(
        "\n| scenario | client | errors after the switch | first row on the 2nd server "
        "| 100 % success | longest write | rows on the 1st after |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for scenario, results, span in rows:
        for variant, f in results.items():
            recovered = (
                f"{f.recovered:.2f} s"
                if f.recovered is not None
                else f"not recovered in {span:g} s ({f.failing_at_end:.0%} failing at the end)"
            )
            first = "stopped" if f.rows_first is None else f.rows_first
            print(
                f"| {scenario} | {variant} | {f.error_count} | "
                f"{seconds(f.first_on_second, span)} | {recovered} | {f.longest:.2f} s "
                f"| {first} |"
            )


def summary(rows: list[tuple[str, dict[str, Figures], float]]) -> None:
    """Print, per scenario and client, over the runs: recovered how often, how fast, errors."""
    runs: dict[tuple[str, str], list[tuple[Figures, float]]] = collections.defaultdict(list)
    for title, results, span in rows:
        for variant, f in results.items():
            runs[title.split(" #")[0], variant].append((f, span))
    print("\nSummary (per scenario and client, over its runs):")
    for (scenario, variant), both in runs.items():
        times = sorted(f.recovered for f, _ in both if f.recovered is not None)
        errors = sorted(f.error_count for f, _ in both)
        opened = sum(any("Circuit" in kind for kind in f.errors) for f, _ in both)
        line = f"  {scenario:8s} {variant:24s} recovered in {len(times)} of {len(both)} runs"
        if times:
            line += f" ({', '.join(f'{t:.2f}' for t in times)} s)"
        if len(times) < len(both):
            line += f"; not recovered in {both[0][1]:g} s"
            if variant in RECYCLE:
                line += f" ({RECYCLE[variant]})"
        line += f"; errors {', '.join(map(str, errors))}"
        print(line + (f"; the breaker opened in {opened} of the runs" if opened else ""))


def ratio(ours: Figures, peer: Figures, span: float) -> str:
    """Return the peer's time to 100 % success over ours ("> x": the peer never got there)."""
    mine = max(ours.recovered or 0.0, 0.01)  # the switch itself takes about 10 ms
    if ours.recovered is None:
        return "neither" if peer.recovered is None else f"< {peer.recovered / span:.2f}x"
    if peer.recovered is None:
        return f"> {span / mine:.0f}x"
    return f"{peer.recovered / mine:.2f}x"


def ratios(rows: list[tuple[str, dict[str, Figures], float]]) -> None:
    """Print, per scenario and pair, the peer's time to 100 % success over ours, per run."""
    print("\nPeer's time to 100 % success / ours, per run (> x: the peer not in the window):")
    pairs: dict[tuple[str, str, str], list[str]] = collections.defaultdict(list)
    for title, results, span in rows:
        for ours, peers in PAIRS.items():
            for peer in peers:
                if ours in results and peer in results:
                    key = (title.split(" #")[0], ours, peer)
                    pairs[key].append(ratio(results[ours], results[peer], span))
    for (scenario, ours, peer), values in pairs.items():
        print(f"  {scenario:8s} {peer:22s} / {ours:24s} {', '.join(values)}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--writers", type=int, default=4, help="per client")
    parser.add_argument("--interval", type=float, default=0.025, help="seconds between writes")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before the switch")
    parser.add_argument("--window", type=float, default=10.0, help="seconds after the switch")
    parser.add_argument(
        "--reset-timeout",
        type=float,
        help="our aliases' circuit_breaker reset_timeout (default: the package's, 30 s; "
        "the promote window is at least this + 8 s)",
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--repeat", type=int, default=1, help="runs of each scenario")
    parser.add_argument("--log", action="store_true", help="the pools' warnings, to stderr")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    args = parser.parse_args(argv)
    if args.quick:
        quick = {"warmup": 2.0, "window": 6.0, "interval": 0.05, "reset_timeout": 5.0}
        for key, value in quick.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    scenarios = args.scenarios.split(",")
    variants = args.variants.split(",")
    if unknown := set(scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenarios {sorted(unknown)}: choose from {', '.join(SCENARIOS)}")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}: choose from {', '.join(VARIANTS)}")
    print(
        f"{len(variants)} clients, one process each, {args.writers} writers each, a write every "
        f"{args.interval * 1e3:g} ms per writer; {args.warmup:g} s of warm-up, "
        f"{args.window:g} s after the switch; our breaker's reset_timeout "
        f"{reset_timeout(args):g} s"
    )
    home = Path(tempfile.mkdtemp(prefix="soak-failover-"))
    started = time.monotonic()
    rows = []
    try:
        for scenario in scenarios:
            for n in range(args.repeat):
                results, note = scenario_run(scenario, variants, args, home)
                title = scenario if args.repeat == 1 else f"{scenario} #{n + 1}"
                print_scenario(title, results, note, window(scenario, args))
                rows.append((title, results, window(scenario, args)))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    markdown(rows)
    summary(rows)
    ratios(rows)
    print(f"\n{time.monotonic() - started:.0f}s in all")


if __name__ == "__main__":
    os.environ.pop("DATABASE_URL", None)  # the aliases name their servers themselves
    main(sys.argv[1:])
