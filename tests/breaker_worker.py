"""One worker process of a shared breaker: the tests and benchmarks/shared_breaker.py drive it.

Run as ``python tests/breaker_worker.py`` with ``DJANGO_SETTINGS_MODULE`` set and the
alias in the environment variable ``BREAKER_WORKER`` (JSON: ``{"alias": ..., "settings":
{...}}``, a ``DATABASES`` entry of ENGINE django_asyncpool). It reads one JSON command a
line on stdin and answers each with one JSON line on stdout:

* ``{"op": "call"}``: one checkout through the async pool (a query, then back to the pool):
  ``{"ok", "error", "ms", "state"}``.
* ``{"op": "load", "seconds": S, "pause": P}``: checkouts one after another for S seconds
  (P seconds apart): ``{"outcomes": {"ok"|ErrorName: n}, "first_failure", "first_fast"}``,
  the wall-clock times of the first connection failure and of the first fail-fast.
* ``{"op": "state"}``: ``{"state", "shared", "storage_errors"}``.
* ``{"op": "pids"}``: the backend pid of one checkout through the sync pool and one through
  the async pool (each back to its pool after): ``{"sync", "async", "drains"}``.
* ``{"op": "quit"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class Worker:
    """The parent's end: start a worker process for ``alias`` and talk to it."""

    def __init__(self, alias: str, settings: dict[str, Any]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PROMETHEUS_", "METRICS_"))}
        env.update(
            DJANGO_SETTINGS_MODULE="testproject.settings",
            PYTHONPATH=str(ROOT),
            BREAKER_WORKER=json.dumps({"alias": alias, "settings": settings}),
        )
        self.process = subprocess.Popen(
            [sys.executable, __file__],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ready: dict[str, Any] | None = None  # read with the first answer: start many at once

    def send(self, op: str, **args: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.process.stdin.flush()

    def ask(self, op: str, **args: Any) -> dict[str, Any]:
        self.send(op, **args)
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        if self.ready is None:
            self.ready = {}
            self.ready = self._read()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {self.process.wait(10)}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        """Stop the worker (``send("quit")`` to several first: they exit side by side)."""
        with contextlib.suppress(OSError):
            self.send("quit")  # a second one after an earlier send("quit") goes nowhere
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def main() -> None:
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()

    from django.conf import settings
    from django.db import connections

    from django_asyncpool import CircuitOpenError, ConnectionPool
    from django_asyncpool.core import breaker_redis as _shared
    from django_asyncpool.core import registry as _registry

    spec = json.loads(os.environ["BREAKER_WORKER"])
    alias = spec["alias"]
    settings.DATABASES[alias] = connections.settings[alias] = spec["settings"]
    loop = asyncio.new_event_loop()

    async def checkout() -> None:
        async with ConnectionPool(alias).connection() as conn:
            await conn.fetchval("select 1")

    def call() -> dict[str, Any]:
        # The async pool: every connection it opens goes through the breaker (the sync
        # pool's own background reconnects would blur the count of connection attempts).
        started = time.perf_counter()
        try:
            loop.run_until_complete(checkout())
            error = None
        except CircuitOpenError:
            error = CircuitOpenError.__name__  # the async side's is a subclass of it
        except Exception as exc:
            error = type(exc).__name__
        return {"ok": error is None, "error": error, "ms": (time.perf_counter() - started) * 1e3}

    def state() -> dict[str, Any]:
        guard = _registry.guard(alias)
        shared = _shared.snapshot().get(alias, {})
        return {
            "state": guard.state,
            "shared": shared.get("shared"),
            "storage_errors": shared.get("errors", 0),
        }

    def load(seconds: float, pause: float) -> dict[str, Any]:
        outcomes: dict[str, int] = {}
        first_failure = first_fast = None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            result = call()
            key = result["error"] or "ok"
            outcomes[key] = outcomes.get(key, 0) + 1
            now = time.time()
            if key == CircuitOpenError.__name__:
                first_fast = first_fast or now
            elif key != "ok":
                first_failure = first_failure or now
            time.sleep(pause)
        return {"outcomes": outcomes, "first_failure": first_failure, "first_fast": first_fast}

    async def async_pid() -> int:
        async with ConnectionPool(alias).connection() as conn:
            return int(await conn.fetchval("select pg_backend_pid()"))

    def pids() -> dict[str, Any]:
        wrapper = connections[alias]
        try:
            with wrapper.cursor() as cursor:
                cursor.execute("select pg_backend_pid()")
                sync = int(cursor.fetchone()[0])
        finally:
            wrapper.close()
        drains = {side: _registry.stats(alias, side).drains for side in ("sync", "async")}
        return {"sync": sync, "async": loop.run_until_complete(async_pid()), "drains": drains}

    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "quit":
            os._exit(0)  # no graceful shutdown to wait for: the pools are throwaway
        if op == "call":
            answer = {**call(), "state": _registry.guard(alias).state}
        elif op == "pids":
            answer = pids()
        elif op == "load":
            answer = load(command["seconds"], command.get("pause", 0.0))
        else:
            answer = state()
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
