"""Which idle sockets the server closed, told by the kernel: the hang-up watcher.

A connection is checked at checkout by the rules of :mod:`.liveness`; an idle one
whose socket the server closed (a terminated backend, a restart,
``idle_session_timeout``) is found here without a system call per checkout. Used
by every pool: the psycopg ones (:mod:`..sync.pool`, :mod:`..orm.pool`) through their
connections, the asyncpg one (:mod:`..sqla.engines`) through its sockets' numbers.
"""

from __future__ import annotations

import logging
import select
import threading
from typing import Any

import psycopg
from psycopg import pq

from . import process as _process
from .liveness import socket_readable

__all__ = [
    "clear_hint",
    "forget_hint",
    "hinted",
    "hung_up",
    "maybe_closed",
    "new_watcher",
    "readable",
    "watch_hangups",
    "watch_socket",
]

logger = logging.getLogger("django_asyncpool")


def readable(conn: psycopg.Connection[Any]) -> bool:
    """Return True if an idle connection's socket has something to read (or is gone)."""
    try:
        return socket_readable(conn.pgconn.socket)
    except psycopg.Error:  # closed: no socket
        return True


def hung_up(conn: psycopg.Connection[Any]) -> bool:
    """Return True if the server closed an idle connection (its socket says so, for real).

    An idle connection receives nothing but notifications; anything else is the server
    saying goodbye (or an EOF); a notification waiting is not (it is read and dropped).
    Raise psycopg's error if reading finds the connection broken.
    """
    if conn.closed or conn.broken:
        return True
    if not readable(conn):
        return False
    pgconn = conn.pgconn
    pgconn.consume_input()
    return pgconn.status != pq.ConnStatus.OK or pgconn.notifies() is None


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

    def watch(self, fd: int) -> None:
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


def hinted(fd: int) -> bool:
    """Return True if the server may have closed socket ``fd`` (check it for real): the
    watcher saw it hang up, or nothing watches."""
    return _hangups is None or fd in _hangups.fds


def watch_hangups(conn: psycopg.Connection[Any]) -> None:
    """Have the kernel report when the server closes ``conn``."""
    watch_socket(conn.pgconn.socket)


def watch_socket(fd: int) -> None:
    """Have the kernel report when the server closes the connection on socket ``fd``."""
    global _hangups
    if _hangups is None:
        return
    try:
        _hangups.watch(fd)
    except OSError as exc:  # out of epoll watches: every checkout polls its socket
        logger.warning("Cannot watch connections for hangups (%s): polling at checkout.", exc)
        _hangups = None


def clear_hint(conn: psycopg.Connection[Any]) -> None:
    """Forget a hang-up recorded for ``conn``'s socket number: it was a stale hint."""
    forget_hint(conn.pgconn.socket)


def forget_hint(fd: int) -> None:
    """Forget a hang-up recorded for socket number ``fd``: it was a stale hint."""
    if _hangups is not None:
        _hangups.fds.discard(fd)


def new_watcher() -> None:
    """In a forked child: a watcher of its own (the parent's thread did not survive)."""
    global _hangups
    if _hangups is not None:
        _hangups = _Hangups()


_process.at_fork("hangups", new_watcher)
