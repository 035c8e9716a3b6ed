"""What a pool needs of an event loop: a hook on its shutdown, a sleep in a greenlet, its
live loops, and a drain run on the pool's own loop.

Every async pool keeps one pool per event loop (asyncpg and psycopg async connections
belong to the loop that opened them) and closes it while that loop shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any, TypeVar

from sqlalchemy.util.concurrency import await_

T = TypeVar("T")

__all__ = ["drain_on", "greenlet_sleep", "live", "on_loop", "run_at_loop_shutdown"]


def run_at_loop_shutdown(cleanup: Callable[[], Coroutine[Any, Any, None]]) -> Any:
    """Have the running loop await ``cleanup()`` when it shuts its async generators down.

    ``asyncio.run()`` and asgiref call ``loop.shutdown_asyncgens()`` before closing a
    loop; it closes every async generator the loop saw start, running its
    ``finally``. So an async generator started here (run to its ``yield`` by
    hand: that registers it with the running loop, through the loop's firstiter
    hook) is a hook on the loop's shutdown that needs no change to the loop. Keep
    the returned generator referenced for as long as the cleanup should run: a
    generator collected earlier is closed (and cleans up) then.
    """

    async def guardian() -> AsyncIterator[None]:
        try:
            yield
        finally:
            await cleanup()

    gen = guardian()
    with contextlib.suppress(StopIteration):
        gen.asend(None).send(None)  # type: ignore[attr-defined]
    return gen


def greenlet_sleep(seconds: float) -> None:
    """Sleep ``seconds`` in a greenlet on the loop (the guard's retries of an async pool)."""
    await_(asyncio.sleep(seconds))


def on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], object]) -> None:
    """Run ``fn()`` on ``loop``: now if it is this thread's running loop, else soon on it.

    A pool's connections belong to their loop: only its thread may close them. A loop
    that is not running runs ``fn`` when it runs again; a closed one never does (its
    connections went with it).
    """
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if loop is running:
        fn()
    elif not loop.is_closed():
        with contextlib.suppress(RuntimeError):  # closed meanwhile
            loop.call_soon_threadsafe(fn)


def live(loops: Mapping[asyncio.AbstractEventLoop, T]) -> list[tuple[asyncio.AbstractEventLoop, T]]:
    """Return ``(loop, value)`` of ``loops`` (a per-loop registry) whose loop is not closed.

    Another thread may add a loop meanwhile (a ``WeakKeyDictionary`` also drops one):
    read again, three times at most.
    """
    for _ in range(3):
        try:
            return [(loop, value) for loop, value in list(loops.items()) if not loop.is_closed()]
        except RuntimeError:
            continue
    return []


def drain_on(loop: asyncio.AbstractEventLoop, pool: Any) -> None:
    """Have ``pool`` (of ``loop``) replace every connection, from any thread.

    ``pool.stamp()`` now, so that no connection opened before is used again; its
    ``drain()`` (the idle ones closed) on the pool's own loop.
    """
    pool.stamp()
    on_loop(loop, pool.drain)
