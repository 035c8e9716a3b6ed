"""The liveness rules every pool shares (``core/liveness.py``) alone: no database.

``socket_readable`` and ``poller`` run on a real socket pair: the peer plays the server.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from django_asyncpool.core.liveness import (
    DUE,
    GONE,
    LIVE,
    clock,
    poller,
    socket_readable,
    verdict,
)


def test_the_clock_is_monotonic() -> None:
    assert clock is time.monotonic


@pytest.mark.parametrize(
    ("now", "bypass", "found"),
    [
        (100.0, 0.5, LIVE),  # just returned
        (100.25, 0.5, LIVE),
        (100.5, 0.5, LIVE),  # exactly the window: still trusted
        (100.5 + 1e-9, 0.5, DUE),
        (200.0, 0.5, DUE),
        (100.0, 0.0, LIVE),  # no window: returned this instant
        (100.0 + 1e-9, 0.0, DUE),
    ],
)
def test_a_ping_is_due_past_the_bypass_window(now: float, bypass: float, found: int) -> None:
    assert verdict(False, 100.0, now, bypass) == found


@pytest.mark.parametrize("now", [100.0, 100.25, 200.0])
def test_a_connection_the_server_hung_up_on_is_gone_whenever_it_came_back(now: float) -> None:
    assert verdict(True, 100.0, now, 0.5) == GONE


def polled(fd: int) -> bool:
    return bool(poller(fd)(0))


#: The two forms of the check: each time, and made once per connection.
CHECKS = pytest.mark.parametrize("readable", [socket_readable, polled])


@CHECKS
def test_an_idle_socket_is_not_readable(
    pair: tuple[socket.socket, socket.socket], readable: Any
) -> None:
    ours, _ = pair
    assert readable(ours.fileno()) is False


@CHECKS
def test_bytes_from_the_peer_make_it_readable(
    pair: tuple[socket.socket, socket.socket], readable: Any
) -> None:
    ours, peer = pair
    peer.sendall(b"N")
    assert readable(ours.fileno()) is True
    assert ours.recv(1) == b"N"
    assert readable(ours.fileno()) is False


@CHECKS
def test_the_peer_closing_makes_it_readable(
    pair: tuple[socket.socket, socket.socket], readable: Any
) -> None:
    ours, peer = pair
    peer.close()
    assert readable(ours.fileno()) is True
    assert ours.recv(1) == b""  # EOF


def test_a_closed_socket_is_gone() -> None:
    ours, peer = socket.socketpair()
    fd = ours.fileno()
    ours.close()
    try:
        assert socket_readable(fd) is True
    finally:
        peer.close()


@CHECKS
def test_no_socket_is_gone(readable: Any) -> None:
    assert readable(-1) is True


def test_a_socket_closed_after_its_poller_was_made_is_gone() -> None:
    ours, peer = socket.socketpair()
    poll = poller(ours.fileno())  # made when the connection opens
    assert not poll(0)
    ours.close()
    try:
        assert poll(0)  # POLLNVAL
    finally:
        peer.close()
