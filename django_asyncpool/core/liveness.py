"""When a pooled connection is checked before it is handed out: the rules every pool shares.

:func:`verdict` is the rule, once; no I/O here beyond a zero-timeout poll: each pool
looks at its socket and pings with its own driver (psycopg's non-blocking ping in
:mod:`..sync.pool`, asyncpg's bounded ``select 1`` in :mod:`..sqla.engines`, psycopg's
async ping in :mod:`..orm.pool`).

* An idle connection receives nothing but notifications, so a readable socket (or
  one that is gone) is the server saying goodbye: the connection is thrown away.
* A connection returned less than ``liveness_bypass`` seconds ago is handed out
  without a ping: it worked a moment ago, and a round trip per checkout would
  double a short request. Past that window it is pinged, with a bound (the pool
  timeout): on a dead network path an unbounded ping would hang the checkout.
* A new connection counts as just returned: it is not pinged at its first checkout.

Every pool stamps each connection with :func:`time.monotonic` when it opens and each
time it comes back; the same clock times how long it was held.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable

__all__ = ["DUE", "GONE", "LIVE", "clock", "poller", "socket_readable", "verdict"]

#: The one clock of every pool's stamps (returned, taken) and of the held time.
clock = time.monotonic

#: What :func:`verdict` says of an idle connection about to be handed out: hand it out,
LIVE = 0
#: throw it away (the server hung up),
GONE = 1
#: or ping it first, with a bound (the pool timeout).
DUE = 2


def verdict(hung_up: bool, returned_at: float, now: float, bypass: float) -> int:
    """Return :data:`LIVE`, :data:`GONE` or :data:`DUE` for an idle connection at ``now``.

    ``hung_up`` is what the pool's driver saw of the socket (bytes or EOF waiting on an
    idle connection, or no socket); ``returned_at`` its :data:`~.checkout.RETURNED` stamp.
    """
    if hung_up:
        return GONE
    return DUE if now - returned_at > bypass else LIVE


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
