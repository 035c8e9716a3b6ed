"""The liveness rules both pools share (``_liveness``) alone: no database.

``socket_readable`` and ``poller`` run on a real socket pair: the peer plays the server.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from django_asyncpool.core.liveness import clock, due_for_ping, poller, socket_readable


def test_the_clock_is_monotonic() -> None:
    assert clock is time.monotonic


@pytest.mark.parametrize(
    ("now", "bypass", "due"),
    [
        (100.0, 0.5, False),  # just returned
        (100.25, 0.5, False),
        (100.5, 0.5, False),  # exactly the window: still trusted
        (100.5 + 1e-9, 0.5, True),
        (200.0, 0.5, True),
        (100.0, 0.0, False),  # no window: returned this instant
        (100.0 + 1e-9, 0.0, True),
    ],
)
def test_due_for_ping_past_the_bypass_window(now: float, bypass: float, due: bool) -> None:
    assert due_for_ping(100.0, now, bypass) is due


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, peer = socket.socketpair()
    yield ours, peer
    ours.close()
    peer.close()


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
