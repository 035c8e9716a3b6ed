"""Instructions per query of the native async ORM against the sync ORM (valgrind's callgrind).

    python benchmarks/instructions_async_orm.py [--ops aget,acount,async-for]

The CPU time of these machines moves by ±5 % from run to run, more than most changes
to the native path (``bench_async_orm.py --only sync``); an instruction count moves
far less: about ±3k instructions per query (±0.3 %) between runs of the same tree, so
a cut smaller than that needs several runs to show. Each operation of
``bench_async_orm.py`` (``aget``, ``acount``, ``async for`` over 100 rows) runs 200
and then 1,200 times in a process under callgrind, by one task
natively (``OPTIONS["async_orm"]``) and in the sync ORM (the main thread, no loop
running); the difference divided by 1,000 is one query's instructions, without the
process's start-up. The watchdog's threshold is an hour (valgrind's slowness would
trip it) and ``PYTHONHASHSEED`` is 0. Instructions are not time: the CPU time ratio
has run about twice as far from 1 (docs/performance.md).

Needs valgrind (``apt-get install valgrind``); about a minute per operation and path,
two valgrind runs at a time. Uses DATABASE_URL, or starts the embedded PostgreSQL once
for every run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
#: --ops name -> bench_async_orm's operation.
OPS = {"aget": "aget", "acount": "acount", "async-for": "async for 100 rows"}
COUNTS = (200, 1_200)


def work(path: str, op: str, n: int) -> None:
    """Run ``op`` ``n`` times on ``path`` (native or sync), after one untimed run: the
    queries of ``bench_async_orm.py``, on the keys in the middle of the table."""
    sys.path.insert(0, str(HERE.parent))
    import bench_async_orm as bench  # sets Django up
    from django.conf import settings

    settings.ASYNCPOOL_LOOP_BLOCKED_MS = 3_600_000
    calls = bench.variants(bench.prepare(), pick=lambda keys: keys[len(keys) // 2])
    native, _, sync = calls[OPS[op]]
    if path == "sync":
        for _ in range(n + 1):
            sync()
        return

    async def queries(count: int) -> None:
        for _ in range(count):
            await native()

    wrap: Any = lambda coro: coro  # noqa: E731
    if path == "portal":
        from django_asyncpool.orm.watchdog import portal as wrap

    with asyncio.Runner() as runner:
        runner.run(wrap(queries(1)))
        runner.run(wrap(queries(n)))


def count(path: str, op: str, outdir: str) -> int:
    """Return ``op``'s instructions per query on ``path``."""
    runs = []
    for n in COUNTS:
        out = os.path.join(outdir, f"{path}.{op}.{n}")
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        command += [sys.executable, str(HERE), "--work", path, op, str(n)]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        runs.append((out, subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)))
    totals = []
    for out, process in runs:
        _, err = process.communicate()
        if process.returncode:
            sys.exit(f"{path} {op}: valgrind failed (exit {process.returncode}):\n{err[-2000:]}")
        lines = Path(out).read_text().splitlines()
        totals.append(next(int(line.split()[1]) for line in lines if line.startswith("summary:")))
    return (totals[1] - totals[0]) // (COUNTS[1] - COUNTS[0])


def main(ops: list[str]) -> int:
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: apt-get install valgrind", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE.parent))
    import bench_async_orm as bench  # starts the embedded server (sets DATABASE_URL)

    bench.prepare()  # here, once: the runs would migrate side by side

    print(f"instructions per query, ({COUNTS[1]} - {COUNTS[0]} queries) / {COUNTS[1] - COUNTS[0]}")
    print(
        f"  {'operation':10} {'native':>11} {'in a portal':>11} {'sync ORM':>11} "
        f"{'ratios: native':>15} {'portal':>7}"
    )
    with tempfile.TemporaryDirectory(prefix="asyncpool-callgrind-") as outdir:
        for op in ops:
            native, portal = count("native", op, outdir), count("portal", op, outdir)
            sync = count("sync", op, outdir)
            print(
                f"  {op:10} {native:11,} {portal:11,} {sync:11,} {native / sync:14.3f}x "
                f"{portal / sync:6.3f}x",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"of {', '.join(OPS)}")
    parser.add_argument("--work", nargs=3, metavar=("PATH", "OP", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.work:
        work(args.work[0], args.work[1], int(args.work[2]))
        sys.exit(0)
    unknown = set(args.ops.split(",")) - set(OPS)
    if unknown:
        parser.error(f"unknown --ops {', '.join(sorted(unknown))}: use {', '.join(OPS)}")
    sys.exit(main(args.ops.split(",")))
