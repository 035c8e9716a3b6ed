"""Soak: more concurrent callers than the pool's cap, no fault at all (issue 13).

    python benchmarks/soak_overload.py [--seconds 20] [--tasks 32] [--side async|sync|both]

The long version of tests/sqla/test_fairpool.py's overload tests. The async side:
``OPTIONS["async_pool"] = {"pool_size": 8, "max_overflow": 4, "timeout": 5}``,
breaker ``fail_max`` 3 / ``reset_timeout`` 2, ``--tasks`` tasks on one event loop
looping a primary-key lookup through ``session_scope()``. The sync side: as many
threads looping the same lookup through the ORM's connection, ``OPTIONS["pool"]
["max_size"]`` 8. The load is tests/loadmatrix.py's runner. Printed per side:
requests, errors by type, wait and connect times (after 1 s of warm-up: the pools
opening their connections), how often the breaker opened. The bars: 0 errors, the
breaker never opens, max connect < 1 s. Uses DATABASE_URL, or starts the embedded
PostgreSQL; creates loadmatrix's table (100 rows) there if it is missing.
"""

from __future__ import annotations

import argparse
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

from django_asyncpool.core import registry as _registry  # noqa: E402
from tests.loadmatrix import DjangoOrm, OurScope, describe, ensure_table, run  # noqa: E402
from tests.sqla.test_fairpool import OVERLOAD  # noqa: E402


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
    ensure_table(settings.DATABASES["default"])
    sides = {"async": "async session_scope()", "sync": "sync ORM connection"}
    for side, what in sides.items():
        if args.side not in (side, "both"):
            continue
        alias = add_alias(f"overload_{side}")
        client = OurScope(alias) if side == "async" else DjangoOrm(alias)
        # As the issue's: the pool opens its connections under the load (one request first).
        [figures] = run([client], args.tasks, warmup=1.0, seconds=args.seconds - 1.0, prewarm=1)
        print(f"{what}, {args.tasks} workers, {args.seconds:g}s: {describe(figures)}")
        for kind, sample in figures.samples.items():
            print(f"  {kind}: {sample}")
        print(
            f"  errors during the 1 s warm-up: {figures.warmup_errors}; breaker opened "
            f"{_registry.guard(alias).entered['open']} times"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
