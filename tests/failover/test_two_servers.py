"""A database failover is never an outage: two real servers, ``HOST`` listing both.

Writers on the three paths of one alias (the sync ORM, ``session_scope()``, the
native async ORM) with ``target_session_attrs = "read-write"``; then the server
they write to stops being the primary:

- it turns read-only (a demoted primary: 25006 on every write): each pool replaces
  its connections, and the new ones skip it for the second server;
- it stops, and a streaming standby of it is promoted: the breaker, open during the
  outage, lets the writers through to the new primary after ``reset_timeout``.

Each write names its row, so which server took it is read from the servers
themselves. The measured times (switch to first write on the new server, per path)
are printed (``-s`` shows them).
"""

from __future__ import annotations

import time
from urllib.parse import quote

import django.db
import pytest

from django_asyncpool.core import registry as _registry
from django_asyncpool.orm import native as _asyncorm
from testproject.pgserver import LocalPostgres

from ..conftest import wait_until
from .servers import alias_settings, promote, read_only
from .writers import PATHS, Writers

pytestmark = pytest.mark.usefixtures("db_access")

APP = "asyncpool-two-servers"
POOLS = {
    "pool": {"min_size": 2, "max_size": 4, "timeout": 5},
    "async_pool": {"pool_size": 4, "max_overflow": 0, "timeout": 5},
    "async_orm": True,
    "application_name": APP,
}


def names(pg: LocalPostgres) -> set[str]:
    return set(pg.psql("select name from shop_tag").split())


def paths_on(pg: LocalPostgres) -> set[str]:
    return {name.rsplit("-", 1)[0] for name in names(pg)}


def first_writes(
    writers: Writers, pg: LocalPostgres, since: float, after: float = 0.0
) -> dict[str, float]:
    """Return, per path, the seconds from ``since`` to the end of its first write on ``pg``.

    Only writes started at ``after`` or later count (a standby has the primary's rows).
    """
    rows = names(pg)
    return {
        w.path: min(x.ended for x in w.succeeded(after) if x.name in rows) - since for w in writers
    }


def check_errors(writers: Writers) -> None:
    """Every error is Django's; an outage (anything but a refused write) an OperationalError."""
    for writer in writers:
        for error in writer.errors():
            assert isinstance(error, django.db.DatabaseError), (writer.path, repr(error))
            if "read-only transaction" not in str(error):
                assert isinstance(error, django.db.OperationalError), (writer.path, repr(error))


def report(title: str, took: dict[str, float], writers: Writers) -> None:
    failed = {w.path: len(w.errors()) for w in writers}
    print(f"\n{title}: first write on the new server (s) {took}, failed writes {failed}")


@pytest.mark.parametrize("source", ["settings", "DATABASE_URL"])
def test_a_read_only_first_server_sends_every_path_to_the_second(
    make_alias, servers, monkeypatch, source
) -> None:
    first = servers.primary("first")
    second = servers.primary("second")
    if source == "settings":
        alias = make_alias(**alias_settings([first, second], **POOLS))
    else:
        # The hosts, ports and target_session_attrs from the URL's query, libpq's way.
        password = quote(first.password, safe="")
        monkeypatch.setenv(
            "DATABASE_URL",
            f"postgresql://{first.user}:{password}@/postgres?host={first.host},{second.host}"
            f"&port={first.port},{second.port}&target_session_attrs=read-write",
        )
        empty = dict.fromkeys(("NAME", "USER", "PASSWORD", "HOST", "PORT"), "")
        alias = make_alias(**empty, OPTIONS=POOLS)
    _asyncorm.install()
    fallbacks = dict(_registry.stats(alias, "async_orm").fallbacks)
    writers = Writers(alias)
    try:
        assert wait_until(lambda: all(len(w.succeeded()) >= 5 for w in writers), timeout=15)
        assert not names(second)  # the first server is the one that takes writes
        switched = read_only(first, True)
        assert wait_until(lambda: paths_on(second) == set(PATHS), timeout=10, step=0.1), paths_on(
            second
        )
        time.sleep(0.5)  # the writers go on: on the second only
    finally:
        writers.stop()

    took = first_writes(writers, second, switched)
    report(f"read-only first server ({source})", took, writers)
    assert max(took.values()) <= 2.0, took
    check_errors(writers)
    for writer in writers:
        # No error before the switch.
        assert all(w.ended >= switched for w in writer.writes if w.error is not None), writer.path
        # Every pool replaced its connections, once or a few times (at most once a second).
        assert 1 <= _registry.stats(alias, writer.path).demotions <= 4, writer.path
    # Nothing written to the first server once its sessions read the new setting.
    on_first = names(first)
    late = [
        w.name
        for writer in writers
        for w in writer.succeeded(after=switched + 0.5)
        if w.name in on_first
    ]
    assert not late, late
    on_second = names(second)
    for writer in writers:
        # Every write that ended well after the switch is on the second server.
        assert any(w.name in on_second for w in writer.succeeded(after=switched)), writer.path
    # The native path stayed native (no fallback to Django's thread path).
    assert dict(_registry.stats(alias, "async_orm").fallbacks) == fallbacks


@pytest.mark.parametrize("stop", ["fast", "immediate"])  # a shutdown; a crash
def test_a_promoted_standby_takes_every_path_within_the_breaker_reset(
    make_alias, servers, stop
) -> None:
    reset = 2.0
    primary = servers.primary("primary")
    standby = servers.standby(primary, "standby")
    alias = make_alias(
        **alias_settings(
            [primary, standby],
            **POOLS,
            circuit_breaker={"fail_max": 3, "reset_timeout": reset},
            retry={"max_tries": 2, "max_time": 1},
        )
    )
    _asyncorm.install()
    writers = Writers(alias)
    try:
        assert wait_until(lambda: all(len(w.succeeded()) >= 5 for w in writers), timeout=15)
        stopped = time.monotonic()
        primary.stop(stop)
        down = time.monotonic()  # a write started from now on cannot reach the old primary
        time.sleep(1.0)  # an outage: the writers fail, the breaker opens
        outage = {w.path: len(w.errors(after=stopped)) for w in writers}
        promote(standby)
        promoted = time.monotonic()
        assert wait_until(lambda: all(w.succeeded(after=down) for w in writers), timeout=reset + 10)
        time.sleep(0.5)
    finally:
        writers.stop()

    took = first_writes(writers, standby, promoted, after=down)
    report(f"promoted standby ({stop} stop, reset_timeout {reset:g}s)", took, writers)
    assert all(outage.values()), outage  # every path saw the outage
    assert max(took.values()) <= reset + 1.0, took
    check_errors(writers)
    # Every write that succeeded after the promotion is on the new primary.
    on_standby = names(standby)
    for writer in writers:
        after = writer.succeeded(after=down)
        assert after and all(w.name in on_standby for w in after), writer.path
