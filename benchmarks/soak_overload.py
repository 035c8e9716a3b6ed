"""Soak: more concurrent callers than the pool's cap, no fault at all (issue 13).

    python benchmarks/soak_overload.py [--seconds 20] [--tasks 32] [--side async|sync|both]

The long version of tests/test_fairness.py's overload tests. The async side:
``OPTIONS["async_pool"] = {"pool_size": 8, "max_overflow": 4, "timeout": 5}``,
breaker ``fail_max`` 3 / ``reset_timeout`` 2, ``--tasks`` tasks on one event loop
looping a primary-key lookup through ``session_scope()``. The sync side: as many
threads looping the same lookup through the ORM's connection, ``OPTIONS["pool"]
["max_size"]`` 8. Printed per side: requests, errors by type, p50/p99/max time to
get a connection (after 1 s of warm-up: the pools opening their connections), how
often the breaker opened. The bars: 0 errors, the breaker
never opens, max wait < 1 s. Uses DATABASE_URL, or starts the embedded PostgreSQL;
creates a table ``fairness_items`` (1,000 rows) there if it is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

import django

django.setup()

from django.conf import settings  # noqa: E402
from django.db import connections  # noqa: E402

from tests.test_fairness import (  # noqa: E402
    OVERLOAD,
    create_items,
    for_seconds,
    run_async,
    run_sync,
)


def add_alias(name: str) -> str:
    """Add ``name`` to DATABASES: the default alias's database with issue 13's OPTIONS."""
    entry = copy.deepcopy(settings.DATABASES["default"])
    entry["OPTIONS"] = OVERLOAD
    settings.DATABASES[name] = entry
    connections.settings[name] = entry
    return name


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--side", choices=("async", "sync", "both"), default="both")
    args = parser.parse_args(argv)
    logging.getLogger("django_asyncpool").setLevel(logging.CRITICAL)  # pool timeouts, if any
    print(f"OPTIONS {OVERLOAD}")
    create_items()
    if args.side in ("async", "both"):
        alias = add_alias("overload_async")
        out = asyncio.run(run_async(alias, args.tasks, for_seconds(args.seconds)))
        print(out.summary(f"async session_scope(), {args.tasks} tasks, {args.seconds:g}s"))
        for kind, sample in out.samples().items():
            print(f"  {kind}: {sample}")
    if args.side in ("sync", "both"):
        alias = add_alias("overload_sync")
        out = run_sync(alias, args.tasks, for_seconds(args.seconds))
        print(out.summary(f"sync ORM connection, {args.tasks} threads, {args.seconds:g}s"))
        for kind, sample in out.samples().items():
            print(f"  {kind}: {sample}")
        connections[alias].close_pool()


if __name__ == "__main__":
    main(sys.argv[1:])
