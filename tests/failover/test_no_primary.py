"""No host is the primary yet: a failover under way is retried, never counted by the breaker.

Between a primary's stop and its standby's promotion, an alias with several hosts and
``target_session_attrs = "read-write"`` finds one host down and the other answering
but read-only. That is a failover under way, not an outage: the attempts are retried
and fail as DatabaseUnavailable, but the breaker does not count them (it would fail
every caller for ``reset_timeout`` after the promotion, as ``benchmarks/soak_failover.py``
measured). Here the "standby" is the test server with a read-only session
(``-c default_transaction_read_only=on``), which libpq and asyncpg both refuse for
``read-write`` as they refuse a standby; the first host is a closed port.
"""

from __future__ import annotations

import asyncio

import pytest
from django.db import OperationalError

from django_asyncpool import DatabaseUnavailable
from django_asyncpool.core import registry as _registry
from django_asyncpool.orm import native as _asyncorm

from ..conftest import closed_port
from ..sides import SIDES, run_sql

CALLS = 3  # more than fail_max


@pytest.mark.parametrize("side", SIDES)
def test_no_host_accepting_writes_yet_is_retried_and_not_counted(
    make_alias, pg, db_access, side: str
) -> None:
    alias = make_alias(
        NAME="postgres",
        HOST=f"127.0.0.1,{pg.host}",
        PORT=f"{closed_port()},{pg.port}",
        OPTIONS={
            "target_session_attrs": "read-write",
            "options": "-c default_transaction_read_only=on",
            "pool": {"min_size": 0, "max_size": 2, "timeout": 2},
            "async_pool": {"pool_size": 2, "max_overflow": 0, "timeout": 2},
            "circuit_breaker": {"fail_max": 2, "reset_timeout": 30},
            "retry": {"max_tries": 2, "base_delay": 0.01, "max_delay": 0.02},
            "async_orm": side == "async_orm",
        },
    )
    if side == "async_orm":
        _asyncorm.install()
    guard = _registry.guard(alias)
    errors: list[BaseException] = []
    with asyncio.Runner() as runner:
        for _ in range(CALLS):
            with pytest.raises(OperationalError) as info:
                run_sql(side, alias, runner)
            errors.append(info.value)
    # More failed calls than fail_max, and the breaker never opened.
    assert guard.state == "closed" and guard.breaker.fail_counter == 0
    for err in errors:
        assert isinstance(err, DatabaseUnavailable), repr(err)
        words = str(err)
        assert "read-only" in words or "None of the hosts match" in words, words
