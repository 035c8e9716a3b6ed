"""idle.wait_here: a native query waits right in the greenlet only while the loop is idle."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

from django.test import override_settings

from django_asyncpool.orm import idle as _idle
from django_asyncpool.orm import watchdog as _watchdog


class Conn:
    """Stands for a GreenConnection: wait_here keeps its poll object on it."""


async def test_returns_once_the_socket_is_readable(pair: Any) -> None:
    server, client = pair
    server.send(b"x")
    assert _idle.wait_here(Conn(), client.fileno()) is True


async def test_gives_the_wait_to_the_loop_when_another_callback_is_ready(pair: Any) -> None:
    server, client = pair
    server.send(b"x")  # readable, yet the loop has other work: not waited for here
    asyncio.get_running_loop().call_soon(lambda: None)
    assert _idle.wait_here(Conn(), client.fileno()) is False


async def test_a_cancelled_callback_leaves_the_loop_idle(pair: Any) -> None:
    server, client = pair
    server.send(b"x")
    asyncio.get_running_loop().call_soon(lambda: None).cancel()
    assert _idle.wait_here(Conn(), client.fileno()) is True


async def test_the_connections_quiet_callback_leaves_the_loop_idle(pair: Any) -> None:
    server, client = pair
    server.send(b"x")
    # What the native pool leaves ready when a task takes its kept connection again:
    # the give-back, which does nothing while the connection is out.
    conn, other = Conn(), Conn()
    handle = asyncio.get_running_loop().call_soon(lambda: None)
    setattr(conn, _idle.QUIET, handle)
    try:
        assert _idle.wait_here(other, client.fileno()) is False  # not its own: work to do
        assert _idle.wait_here(conn, client.fileno()) is True
    finally:
        handle.cancel()


async def test_gives_the_wait_to_the_loop_when_a_timer_is_due(pair: Any) -> None:
    server, client = pair
    server.send(b"x")
    loop = asyncio.get_running_loop()
    handle = loop.call_at(loop.time(), lambda: None)
    try:
        assert _idle.wait_here(Conn(), client.fileno()) is False
    finally:
        handle.cancel()


async def test_ends_at_once_when_anything_else_of_the_loop_is_ready(pair: Any) -> None:
    _, client = pair
    other_server, other_client = socket.socketpair()
    try:
        loop = asyncio.get_running_loop()
        loop.add_reader(other_client.fileno(), lambda: None)
        other_server.send(b"y")  # the loop has I/O to handle: no wait here
        started = time.perf_counter()
        assert _idle.wait_here(Conn(), client.fileno()) is False
        assert time.perf_counter() - started < _idle.MOST
        loop.remove_reader(other_client.fileno())
    finally:
        other_server.close()
        other_client.close()


async def test_waits_at_most_a_moment(pair: Any) -> None:
    _, client = pair
    started = time.perf_counter()
    assert _idle.wait_here(Conn(), client.fileno()) is False  # no answer: the loop's wait
    assert time.perf_counter() - started < 0.1


async def test_the_watchdog_does_not_count_the_wait() -> None:
    def wait() -> float:
        started = time.perf_counter()
        for _ in range(20):
            _watchdog.idle(lambda ms: time.sleep(ms / 1e3), 2.0)
        return time.perf_counter() - started

    with override_settings(ASYNCPOOL_LOOP_BLOCKED_MS=20):
        before = dict(_watchdog.blocked)
        took = await _watchdog.spawn(wait)
    assert took > 0.02
    assert _watchdog.blocked == before
