"""watchdog.spawn: one greenlet reused call after call, each call as in a greenlet of its own."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import time
import weakref
from typing import Any

import pytest
from django.test import override_settings
from greenlet import getcurrent
from sqlalchemy.util.concurrency import await_

from django_asyncpool.orm import watchdog as _watchdog

var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")


async def test_calls_reuse_one_greenlet_in_their_callers_context() -> None:
    def call(value: str) -> tuple[object, str]:
        seen = var.get()
        var.set(value)  # the caller's context: as a greenlet sharing it would
        await_(asyncio.sleep(0))
        return getcurrent(), seen

    var.set("a")
    first, seen_a = await _watchdog.spawn(call, "b")
    assert (seen_a, var.get()) == ("a", "b")
    second, seen_b = await _watchdog.spawn(call, "c")
    assert second is first and seen_b == "b" and var.get() == "c"
    assert first.gr_context is None  # idle: keeps no task's context alive


async def test_an_error_propagates_and_the_greenlet_serves_the_next_call() -> None:
    def fail() -> None:
        await_(asyncio.sleep(0))
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await _watchdog.spawn(fail)
    assert await _watchdog.spawn(lambda: 42) == 42


async def test_concurrent_calls_get_greenlets_of_their_own() -> None:
    def call(n: int) -> tuple[int, object]:
        await_(asyncio.sleep(0.01))
        return n, getcurrent()

    results = await asyncio.gather(*(_watchdog.spawn(call, n) for n in range(5)))
    assert [n for n, _ in results] == list(range(5))
    assert len({id(g) for _, g in results}) == 5


async def test_an_idle_greenlet_keeps_nothing_of_its_last_call() -> None:
    class Row:
        pass

    def call() -> weakref.ref[Row]:
        row = Row()
        return weakref.ref(row)

    ref = await _watchdog.spawn(call)
    gc.collect()
    assert ref() is None


async def test_a_cancelled_call_ends_and_its_task_sees_the_cancellation() -> None:
    reached = asyncio.Event()

    def call() -> None:
        reached.set()
        await_(asyncio.sleep(10))

    task = asyncio.ensure_future(_watchdog.spawn(call))
    await reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _watchdog.spawn(lambda: "next") == "next"


async def test_a_slice_the_garbage_collector_held_is_told_apart(caplog: Any) -> None:
    junk = [[] for _ in range(400_000)]  # objects a full collection walks
    before = _watchdog.blocked.get(_watchdog.GC, 0)
    _watchdog._logged.discard((_watchdog.GC, 0))  # logged once per process: again here
    busy = "tests.orm.test_watchdog.test_a_slice_the_garbage_collector_held_is_told_apart"
    with override_settings(ASYNCPOOL_LOOP_BLOCKED_MS=2), caplog.at_level(logging.WARNING):
        started = time.thread_time()
        await _watchdog.spawn(gc.collect)
        took = time.thread_time() - started
    assert took > 0.002, took  # else the machine is too fast for this test to say anything
    assert _watchdog.blocked.get(_watchdog.GC, 0) == before + 1
    assert not any(busy in where for where in _watchdog.blocked)
    said = [r.getMessage() for r in caplog.records if "garbage collector held" in r.getMessage()]
    assert len(said) == 1 and "gc.freeze()" in said[0], said
    del junk
