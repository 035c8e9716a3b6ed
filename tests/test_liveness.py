"""The liveness rules both pools share (``_liveness``) alone: no database.

``socket_readable`` runs on a real socket pair: the peer plays the server.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from django_asyncpool._liveness import clock, due_for_ping, socket_readable


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


def test_an_idle_socket_is_not_readable(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    assert socket_readable(ours.fileno()) is False


def test_bytes_from_the_peer_make_it_readable(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    peer.sendall(b"N")
    assert socket_readable(ours.fileno()) is True
    assert ours.recv(1) == b"N"
    assert socket_readable(ours.fileno()) is False


def test_the_peer_closing_makes_it_readable(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    peer.close()
    assert socket_readable(ours.fileno()) is True
    assert ours.recv(1) == b""  # EOF


def test_a_closed_socket_is_gone() -> None:
    ours, peer = socket.socketpair()
    fd = ours.fileno()
    ours.close()
    try:
        assert socket_readable(fd) is True
    finally:
        peer.close()


def test_no_socket_is_gone() -> None:
    assert socket_readable(-1) is True
