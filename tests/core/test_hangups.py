"""The psycopg side of the liveness rules (``core/hangups.py``), on a real server."""

from __future__ import annotations

from typing import Any

import psycopg

from django_asyncpool.core.hangups import hung_up, readable

from ..conftest import wait_until


def test_hung_up_tells_a_goodbye_from_a_notification(pg: Any) -> None:
    conn = psycopg.connect(pg.url(), autocommit=True, application_name="asyncpool-hangup")
    try:
        conn.execute("listen news")
        assert hung_up(conn) is False  # idle, nothing waiting
        pg.psql("notify news")
        assert wait_until(lambda: readable(conn), timeout=5)
        assert hung_up(conn) is False  # a notification is not the server leaving
        pg.psql(
            "select pg_terminate_backend(pid) from pg_stat_activity "
            "where application_name = 'asyncpool-hangup'"
        )
        assert wait_until(lambda: hung_up(conn), timeout=5)
    finally:
        conn.close()
    assert hung_up(conn) is True  # closed
