"""Soak: the server restarted, then every backend terminated, under sustained load.

    python benchmarks/soak_restart.py [--seconds 30] [--down 5] [--tasks 16] [--threads 8]
                                      [--rounds 10]

Scenarios 1, 2 and 7 of docs/reliability.md, long versions of the tests in
tests/test_faults.py. Async ``session_scope()`` tasks and ORM threads query
one alias continuously:

1. restart: after a third of ``--seconds`` the embedded server is stopped for
   ``--down`` seconds, then started; the load goes on until ``--seconds``.
2. terminate: ``--rounds`` times, the load is paused between requests, every
   backend of the pools is killed with pg_terminate_backend, the load resumes.

Prints the figures of each: requests, those that waited longer than the pool
timeout, errors (by type) and when, the time from the server being back to
100% success (bar: reset_timeout + 2 s), server connections afterwards (bar:
the configured maximum), stuck tasks or threads (bar: 0). Needs the embedded
server (no DATABASE_URL): it stops and starts it.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
if os.environ.get("DATABASE_URL"):
    sys.exit("soak_restart needs the embedded server (it stops it): unset DATABASE_URL")

import django

django.setup()

from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connections  # noqa: E402

from testproject import pgserver  # noqa: E402
from testproject.shop.models import Product  # noqa: E402
from tests.conftest import backends, terminate_backends, wait_until  # noqa: E402
from tests.test_faults import APP, Load, _options, clean  # noqa: E402

ALIAS = "soak"


def setup(options: dict[str, Any]) -> None:
    call_command("migrate", verbosity=0)
    for i in range(1, 21):
        Product.objects.get_or_create(
            sku=f"R{i}", defaults={"name": f"reliable {i}", "price_cents": i}
        )
    entry = {**settings.DATABASES["default"], "OPTIONS": options}
    settings.DATABASES[ALIAS] = entry
    connections.settings[ALIAS] = entry


def report(name: str, load: Load, pool_timeout: float, extra: str) -> list[BaseException]:
    errors = load.errors()
    kinds = collections.Counter(type(e).__name__ for e in errors)
    late = sum(d > pool_timeout + 0.5 for _, d, _, _ in load.outcomes)
    unclean = [e for e in errors if not clean(e)]
    print(
        f"{name}: {len(load.outcomes)} requests; waited > pool timeout ({pool_timeout:g}s): "
        f"{late}; errors {len(errors)} {dict(kinds)}; not typed/clean {len(unclean)}; "
        f"stuck {load.stuck}; {extra}"
    )
    for e in unclean[:3]:
        print(f"  unclean: {e!r}"[:300])
    return errors


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--down", type=float, default=5.0)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    for name in ("django_asyncpool", "psycopg.pool"):  # the outage's warnings: thousands
        logging.getLogger(name).setLevel(logging.CRITICAL)
    pg = pgserver.current()
    assert pg is not None
    options = _options(
        pool={"min_size": 2, "max_size": 8, "timeout": 2},
        async_pool={"pool_size": 8, "max_overflow": 2, "timeout": 2},
    )
    setup(options)
    reset_timeout = options["circuit_breaker"]["reset_timeout"]
    pool_timeout = options["async_pool"]["timeout"]
    cap = options["pool"]["max_size"] + options["async_pool"]["pool_size"] + 2
    print(
        f"{args.tasks} async tasks + {args.threads} ORM threads; sync pool max 8, async 8 + 2 "
        f"overflow; breaker fail_max 3 reset_timeout {reset_timeout:g}s; pool timeout "
        f"{pool_timeout:g}s"
    )

    marks: dict[str, float] = {}

    def outage(load: Load) -> None:
        started = time.monotonic()
        time.sleep(args.seconds / 3)
        marks["down"] = time.monotonic()
        pg.stop("fast")
        time.sleep(args.down)
        pg.start()
        marks["up"] = time.monotonic()
        time.sleep(max(args.seconds - (time.monotonic() - started), reset_timeout + 3))

    load = Load(ALIAS, tasks=args.tasks, threads=args.threads, pool_timeout=pool_timeout)
    try:
        load.run(outage)
    finally:
        if not pg.is_running():
            pg.start()
    last_error = max((t for t, _, e, _ in load.outcomes if e is not None), default=marks["up"])
    recovery = max(last_error - marks["up"], 0.0)
    outside = sum(1 for t, _, e, _ in load.outcomes if e is not None and not marks["down"] <= t)
    after = backends(pg, app=APP)
    report(
        f"restart ({args.down:g}s down)",
        load,
        pool_timeout,
        f"errors before the outage {outside}; back to 100% success {recovery:.2f}s after the "
        f"server (bar {reset_timeout + 2:g}s); server connections afterwards {after} "
        f"(max {cap})",
    )

    killed: list[int] = []

    def massacre(load: Load) -> None:
        for _ in range(args.rounds):
            time.sleep(1.0)
            load.pause()
            killed.append(terminate_backends(pg, app=APP))
            wait_until(lambda: backends(pg, app=APP) == 0, timeout=5)
            load.gate.set()
        time.sleep(1.0)

    load = Load(ALIAS, tasks=args.tasks, threads=args.threads, pool_timeout=pool_timeout)
    load.run(massacre)
    from django_asyncpool import ConnectionPool

    report(
        f"terminate ({args.rounds} rounds)",
        load,
        pool_timeout,
        f"backends killed {sum(killed)}; async connections found dead at checkout "
        f"{ConnectionPool(ALIAS).metrics['invalidated']}",
    )


if __name__ == "__main__":
    main(sys.argv[1:])
