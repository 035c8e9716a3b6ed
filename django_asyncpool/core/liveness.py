"""When a pooled connection is checked before it is handed out: the rules both pools share.

No I/O here beyond a zero-timeout poll: each pool applies the rules with its own
driver (psycopg's non-blocking ping in :mod:`..sync.pool`, asyncpg's bounded ``select 1``
in :mod:`..sqla.engines`, psycopg's async ping in :mod:`..orm.pool`).

* An idle connection receives nothing but notifications, so a readable socket (or
  one that is gone) is the server saying goodbye: the connection is thrown away.
* A connection returned less than ``liveness_bypass`` seconds ago is handed out
  without a ping: it worked a moment ago, and a round trip per checkout would
  double a short request. Past that window it is pinged, with a bound (the pool
  timeout): on a dead network path an unbounded ping would hang the checkout.
* A new connection counts as just returned: it is not pinged at its first checkout.

Both pools stamp each connection with :func:`time.monotonic` when it opens and each
time it comes back; the same clock times how long it was held.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from . import process as _process

__all__ = [
    "clear_hint",
    "clock",
    "due_for_ping",
    "maybe_closed",
    "new_watcher",
    "poller",
    "readable",
    "socket_readable",
    "watch_hangups",
]

logger = logging.getLogger("django_asyncpool")

#: The one clock of both pools' stamps (returned, taken) and of the held time.
clock = time.monotonic


def due_for_ping(returned_at: float, now: float, bypass: float) -> bool:
    """Return True when a connection returned at ``returned_at`` must be pinged at ``now``."""
    return now - returned_at > bypass


def socket_readable(fd: int) -> bool:
    """Return True when an idle connection's socket has bytes or EOF waiting, or is gone."""
    try:
        return bool(select.select([fd], [], [], 0)[0])
    except (OSError, ValueError):  # closed, or a negative number: gone
        return True


def poller(fd: int) -> Callable[[int], object]:
    """Return ``poll``: ``poll(0)`` is truthy when ``fd`` has bytes or EOF waiting, or is gone.

    :func:`socket_readable` made once per connection, for a check on every checkout:
    a ``select.poll`` with the socket registered (a closed one reports POLLNVAL), so
    a check is one system call with no lists built, about half of select()'s, and it
    needs the socket's number once, not each time from asyncpg's transport (the
    figures: docs/performance.md, "Measured choices in the code").
    """
    if not hasattr(select, "poll"):  # Windows
        return lambda timeout: socket_readable(fd)
    poll = select.poll()
    try:
        poll.register(fd, select.POLLIN)
    except (OSError, ValueError):  # a negative number: gone
        return lambda timeout: True
    return poll.poll


# -- the hang-up watcher: which idle sockets the server closed, told by the kernel -------


def readable(conn: psycopg.Connection[Any]) -> bool:
    """Return True if an idle connection's socket has something to read (or is gone)."""
    try:
        return socket_readable(conn.pgconn.socket)
    except psycopg.Error:  # closed: no socket
        return True


class _Hangups:
    """The sockets whose server end has closed, learned from the kernel, not at checkout.

    Each connection's socket is registered once, when it is opened, with an epoll
    set for EPOLLRDHUP: the kernel reports the server's FIN or RST (a terminated
    backend, a restart, ``idle_session_timeout``) and a daemon thread, blocked in
    ``epoll_wait`` the rest of the time, records the socket. A checkout then looks
    its socket up in a set instead of polling it: a system call on every checkout
    shows in a primary-key request's throughput (benchmarks/bench_sync.py). The set is a hint: a
    socket found there is checked for real (its number may have been reused).
    Linux only; elsewhere every checkout polls its socket.
    """

    EVENTS = getattr(select, "EPOLLRDHUP", 0) | getattr(select, "EPOLLONESHOT", 0)

    def __init__(self) -> None:
        self.fds: set[int] = set()
        self._epoll = select.epoll()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def watch(self, conn: psycopg.Connection[Any]) -> None:
        fd = conn.pgconn.socket
        self.fds.discard(fd)  # a number reused from a closed connection
        try:
            self._epoll.register(fd, self.EVENTS)
        except FileExistsError:
            self._epoll.modify(fd, self.EVENTS)
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="django_asyncpool hangups", daemon=True
                    )
                    self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                events = self._epoll.poll()
            except OSError:  # the epoll set was closed
                return
            for fd, _ in events:
                self.fds.add(fd)  # EPOLLONESHOT: reported once, then disarmed


_hangups: _Hangups | None = _Hangups() if hasattr(select, "epoll") else None


def maybe_closed(conn: psycopg.Connection[Any]) -> bool:
    """Return True if the server may have closed an idle connection (check it for real)."""
    if _hangups is None:
        return readable(conn)
    try:
        return conn.pgconn.socket in _hangups.fds
    except psycopg.Error:  # closed: no socket
        return True


def watch_hangups(conn: psycopg.Connection[Any]) -> None:
    """Have the kernel report when the server closes ``conn``."""
    global _hangups
    if _hangups is None:
        return
    try:
        _hangups.watch(conn)
    except OSError as exc:  # out of epoll watches: every checkout polls its socket
        logger.warning("Cannot watch connections for hangups (%s): polling at checkout.", exc)
        _hangups = None


def clear_hint(conn: psycopg.Connection[Any]) -> None:
    """Forget a hang-up recorded for ``conn``'s socket number: it was a stale hint."""
    if _hangups is not None:
        _hangups.fds.discard(conn.pgconn.socket)


def new_watcher() -> None:
    """In a forked child: a watcher of its own (the parent's thread did not survive)."""
    global _hangups
    if _hangups is not None:
        _hangups = _Hangups()


_process.at_fork("liveness", new_watcher)
