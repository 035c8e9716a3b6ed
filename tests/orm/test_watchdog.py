"""watchdog.spawn: one greenlet reused call after call, each call as in a greenlet of its own."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import sys
import time
import weakref
from typing import Any

import pytest
from django.test import override_settings
from greenlet import getcurrent
from sqlalchemy.exc import MissingGreenlet
from sqlalchemy.util.concurrency import await_, in_greenlet

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


# -- a portal: the task's own greenlet --------------------------------------------------------


async def test_in_a_portal_spawned_calls_run_right_there_in_the_tasks_context() -> None:
    def call(value: str) -> tuple[object, str]:
        seen = var.get()
        var.set(value)
        await_(asyncio.sleep(0))  # the portal's driver awaits it for the call
        return getcurrent(), seen

    async def body() -> tuple[object, object, str, str]:
        var.set("a")
        here = getcurrent()
        first, seen = await _watchdog.spawn(call, "b")
        await asyncio.sleep(0.001)  # a future of the loop, through the portal
        second, _ = await _watchdog.spawn(call, "c")
        assert second is first
        return here, first, seen, var.get()

    here, called_in, seen, last = await _watchdog.portal(body())
    assert isinstance(here, _watchdog.Portal) and called_in is here
    assert (seen, last) == ("a", "c")
    assert var.get() == "c"  # the task's context: the portal's too
    assert not isinstance(getcurrent(), _watchdog.Portal)


async def test_only_sync_code_of_spawn_may_await_in_a_portal_or_not() -> None:
    async def body() -> list[bool]:
        seen = [in_greenlet(), await _watchdog.spawn(in_greenlet)]
        seen.append(_watchdog.call(in_greenlet))  # code without I/O: no
        with pytest.raises(MissingGreenlet):
            await_(asyncio.sleep(0))  # SQLAlchemy's error, as in any task
        return [*seen, in_greenlet()]  # its own code again, after the calls

    assert await body() == [False, True, False, False]
    assert await _watchdog.portal(body()) == [False, True, False, False]
    failing = _watchdog.spawn(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        await _watchdog.portal(failing)
    assert await _watchdog.portal(body()) == [False, True, False, False]  # a call that raised


async def test_a_portal_returns_raises_and_serves_the_next_one() -> None:
    async def fail() -> None:
        await asyncio.sleep(0)
        await _watchdog.spawn(lambda: await_(asyncio.sleep(0)))
        raise KeyError("boom")

    async def greenlet_of() -> object:
        return getcurrent()

    with pytest.raises(KeyError, match="boom"):
        await _watchdog.portal(fail())
    first = await _watchdog.portal(greenlet_of())
    assert await _watchdog.portal(greenlet_of()) is first  # kept for reuse
    assert first.gr_context is None  # type: ignore[attr-defined]  # idle: no task's context


async def test_a_cancelled_portal_cancels_what_its_sync_code_awaits() -> None:
    reached = asyncio.Event()
    cleaned: list[str] = []

    def call() -> None:
        reached.set()
        try:
            await_(asyncio.sleep(10))
        finally:
            cleaned.append("sync")

    async def body() -> None:
        try:
            await _watchdog.spawn(call)
        finally:
            cleaned.append("async")

    task = asyncio.create_task(_watchdog.portal(body()))
    await reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["sync", "async"]

    async def waits() -> None:
        await asyncio.sleep(10)

    task = asyncio.create_task(_watchdog.portal(waits()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_a_task_made_in_a_portal_has_none_and_a_portal_in_one_is_the_same() -> None:
    async def where() -> object:
        return getcurrent()

    async def body() -> tuple[object, object, object]:
        inner = await _watchdog.portal(where())
        made = await asyncio.create_task(where())
        spawned = await asyncio.create_task(_watchdog.spawn(getcurrent))
        assert isinstance(spawned, _watchdog._Green) and spawned is not getcurrent()
        return getcurrent(), inner, made

    outer, inner, made = await _watchdog.portal(body())
    assert inner is outer
    assert not isinstance(made, _watchdog.Portal)


async def test_a_portal_times_its_slices_as_spawn_does() -> None:
    async def holds_the_loop() -> None:
        await asyncio.sleep(0)
        time.sleep(0.05)  # the task's own code, in the portal: every other task waits
        await asyncio.sleep(0)

    where = "tests.orm.test_watchdog.holds_the_loop"
    with override_settings(ASYNCPOOL_LOOP_BLOCKED_MS=10):
        before = _watchdog.blocked.get(where, 0)
        await _watchdog.portal(holds_the_loop())
    assert _watchdog.blocked.get(where, 0) == before + 1


async def test_a_portal_names_a_slice_by_its_long_call_when_no_stack_shows_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The monitor looks every half threshold and may miss the call (a busy machine):
    a call over the threshold still names the slice, not the portal's coroutine."""
    monkeypatch.setattr(sys, "_current_frames", dict)  # the monitor sees no thread

    def computes() -> None:
        deadline = time.thread_time() + 0.05
        while time.thread_time() < deadline:
            pass

    async def body() -> None:
        await _watchdog.spawn(lambda: None)
        await asyncio.sleep(0)
        await _watchdog.spawn(computes)
        await asyncio.sleep(0)  # the slice ends here, its stack the portal's own

    where = "tests.orm.test_watchdog.computes"
    with override_settings(ASYNCPOOL_LOOP_BLOCKED_MS=10):
        before = dict(_watchdog.blocked)
        await _watchdog.portal(body())
    grown = {w: n - before.get(w, 0) for w, n in _watchdog.blocked.items() if n != before.get(w)}
    assert grown == {where: 1}
