"""Waiting for the server's answer right in the greenlet, while the event loop is idle.

A native query sends its statement and then waits for the answer. Handing the wait
to the event loop costs a trip out of the greenlet and through the loop (a switch
out of Django's deep stack, the task's step, the loop's own poll), and psycopg's
wait (a reader registered and removed, a future, a timer) when the answer is not
there after one turn: together more than the rest of the native path
(benchmarks/bench_async_orm.py). When the loop has nothing else to do (no callback
ready, no timer due), the loop would only block in its selector until something
happens; :func:`wait_here` blocks right here instead, in one ``poll()`` of the
connection's socket *and of the loop's selector*, so that it returns as soon as
anything else the loop waits for is ready, before the next timer is due, and
after :data:`MOST` at the latest. Then the loop takes over, as before.

Only on asyncio's own selector loops (the attributes read here are theirs); with
any other loop (uvloop, Windows' proactor) every wait goes through the loop.
"""

from __future__ import annotations

import asyncio
import select
import selectors
from collections import deque
from typing import Any

from . import watchdog

__all__ = ["MOST", "QUIET", "wait_here"]

#: The longest wait right here (seconds); a longer one goes through the loop.
MOST = 0.002

#: On a connection: a ``call_soon`` handle of its loop that does nothing while someone
#: waits on the connection (the native pool's give-back of it to the pool, due unless
#: its task took it again), so that the loop still looks idle with it ready.
QUIET = "_asyncpool_quiet"

#: On a connection: (its loop, its socket, a poll of the socket and of the loop's
#: selector, or None when the loop is not one to wait for here). A pooled connection
#: is only ever used on its pool's loop, the one running at its first wait: no
#: ``get_running_loop()`` per wait (on Python 3.11 that is a ``getpid`` system call).
_POLL = "_asyncpool_idle_poll"


def _poller(loop: Any, fd: int) -> tuple[Any, int, Any]:
    """Return what :func:`wait_here` keeps on a connection of ``loop`` with socket ``fd``."""
    selector: Any = getattr(loop, "_selector", None)
    if not (
        hasattr(select, "poll")
        and isinstance(loop, asyncio.BaseEventLoop)
        and isinstance(getattr(loop, "_ready", None), deque)
        and isinstance(getattr(loop, "_scheduled", None), list)
        and isinstance(selector, selectors.BaseSelector)
    ):
        return loop, fd, None
    try:
        loop_fd = selector.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return loop, fd, None
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    poll.register(loop_fd, select.POLLIN)
    return loop, fd, poll.poll


def wait_here(conn: Any, fd: int) -> bool:
    """Return True once socket ``fd`` of ``conn`` is readable, waiting for it right here
    while the running loop has nothing else to do; False when it has (or may soon
    have), and the wait is the loop's."""
    cached = getattr(conn, _POLL, None)
    if cached is None or cached[1] != fd:
        cached = _poller(asyncio.get_running_loop(), fd)
        setattr(conn, _POLL, cached)
    loop, _, poll = cached
    if poll is None:
        return False
    ready = loop._ready
    if ready:
        # A cancelled callback is nothing to do (the loop drops cancelled ones only when
        # it runs them), nor is the connection's quiet one; anything else, the loop's turn.
        quiet = getattr(conn, QUIET, None)
        for handle in ready:
            if not (handle is quiet or handle._cancelled):
                return False
    timeout = MOST
    scheduled = loop._scheduled
    if scheduled:
        due = scheduled[0]._when - loop.time()
        if due <= 0:
            return False
        timeout = min(timeout, due)
    for event in watchdog.idle(poll, timeout * 1e3, fd):  # noqa: SIM110 (no generator: every wait)
        if event[0] == fd:
            return True
    return False
