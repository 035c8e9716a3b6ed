"""The breaker and the retries around getting a sync connection, against a real server."""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
import warnings

import pytest
from django.db import IntegrityError, connection

from django_asyncpool import (
    CircuitOpenError,
    DatabaseUnavailable,
    PoolTimeout,
    _registry,
    _syncpool,
)
from testproject.pgserver import PASSWORD
from testproject.shop.models import Product

from .conftest import query, terminate_backends, wait_until

FAST = {"pool": {"min_size": 0, "max_size": 2, "timeout": 2}}


def test_breaker_opens_fails_fast_half_opens_and_closes(make_wrapper, pg, server_down) -> None:
    wrapper = make_wrapper(
        OPTIONS={
            **FAST,
            "circuit_breaker": {"fail_max": 3, "reset_timeout": 1},
            "retry": {"max_tries": 1},
        }
    )
    guard = _registry.guard(wrapper.alias, wrapper)
    query(wrapper)
    server_down()

    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable) as info:
            query(wrapper)
        # the waiter is failed when the connect attempt fails, not after the 2 s timeout
        assert time.monotonic() - started < 1.5
    assert "Check that the server is running" in str(info.value)
    assert guard.state == "open"

    started = time.monotonic()
    with pytest.raises(CircuitOpenError) as open_error:
        query(wrapper)
    assert time.monotonic() - started < 0.05
    assert "circuit breaker is open" in str(open_error.value)

    time.sleep(1.05)  # reset_timeout: the next call is a trial, which fails: open again
    with pytest.raises(DatabaseUnavailable):
        query(wrapper)
    assert guard.state == "open"

    pg.start()
    time.sleep(1.05)
    query(wrapper)  # the trial succeeds
    assert guard.state == "closed"


def test_half_open_admits_one_trial_at_a_time(make_wrapper, proxy) -> None:
    wrapper = make_wrapper(
        HOST=proxy.host,
        PORT=proxy.port,
        OPTIONS={
            **FAST,
            "circuit_breaker": {"fail_max": 1, "reset_timeout": 0.2},
            "retry": {"max_tries": 1},
        },
    )
    guard = _registry.guard(wrapper.alias, wrapper)
    proxy.cut()
    with pytest.raises(DatabaseUnavailable):
        query(wrapper)
    assert guard.state == "open"
    proxy.restore()
    proxy.delay(0.05)  # the trial connection takes a while (several round trips)
    time.sleep(0.25)

    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def caller(settings_dict) -> None:
        w = DatabaseWrapper(copy.deepcopy(settings_dict), alias=wrapper.alias)
        barrier.wait()
        try:
            query(w)
            outcomes.append("ok")
        except CircuitOpenError:
            outcomes.append("fast-fail")
        except Exception as exc:
            outcomes.append(repr(exc))

    # each thread has its own wrapper (as Django's thread-local connections do),
    # all sharing the alias's pool and guard
    import copy

    from django_asyncpool.base import DatabaseWrapper

    threads = [threading.Thread(target=caller, args=(wrapper.settings_dict,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 1, outcomes
    assert outcomes.count("fast-fail") == 5
    assert guard.state == "closed"


def test_short_outage_within_the_retry_budget_is_invisible(make_wrapper, pg, server_down) -> None:
    wrapper = make_wrapper(
        OPTIONS={
            **FAST,
            "circuit_breaker": {"fail_max": 50},
            "retry": {"max_tries": 30, "max_time": 10, "max_delay": 0.3},
        }
    )
    first = query(wrapper)
    server_down()
    threading.Timer(1.0, pg.start).start()
    started = time.monotonic()
    second = query(wrapper)  # retried until the server is back
    assert time.monotonic() - started >= 0.5
    assert second != first  # a new backend: the old one died with the server


@pytest.mark.parametrize("watch", ["epoll", "poll at checkout"])
def test_terminated_backends_are_replaced_before_the_caller_sees_them(
    make_wrapper, pg, monkeypatch, watch
) -> None:
    if watch != "epoll":  # what platforms without epoll do
        monkeypatch.setattr(_syncpool, "_hangups", None)
    elif _syncpool._hangups is None:
        pytest.skip("no epoll on this platform")
    wrapper = make_wrapper(
        OPTIONS={"pool": {"min_size": 2, "max_size": 2}, "retry": {"max_tries": 1}}
    )
    pids = {query(wrapper) for _ in range(4)}
    assert terminate_backends(pg, "postgres") >= 1
    wait_until(lambda: False, timeout=0.2)  # within liveness_bypass: no ping
    for _ in range(10):
        assert query(wrapper) not in pids
    assert _registry.guard(wrapper.alias, wrapper).breaker.fail_counter == 0


def test_a_stale_hangup_hint_costs_a_check_not_the_connection(make_wrapper) -> None:
    if _syncpool._hangups is None:
        pytest.skip("no epoll on this platform")
    wrapper = make_wrapper(OPTIONS={"pool": {"min_size": 1, "max_size": 1}})
    pid = query(wrapper)
    conn = wrapper.pool.getconn()
    fd = conn.pgconn.socket
    wrapper.pool.putconn(conn)
    _syncpool._hangups.fds.add(fd)  # as if an old socket with this number had hung up
    assert query(wrapper) == pid  # checked for real, found alive, kept
    assert fd not in _syncpool._hangups.fds


@pytest.mark.django_db(transaction=True)
def test_application_errors_never_move_the_breaker() -> None:
    guard = _registry.guard("default")
    Product.objects.create(sku="DUP", name="one", price_cents=1)
    for _ in range(guard.breaker.fail_max + 2):
        with pytest.raises(IntegrityError):
            Product.objects.create(sku="DUP", name="two", price_cents=1)
        connection.close()
    assert guard.state == "closed"
    assert guard.breaker.fail_counter == 0


def test_pool_timeout_is_typed_and_says_how_full_the_pool_is(make_wrapper) -> None:
    wrapper = make_wrapper(
        OPTIONS={
            "pool": {"min_size": 1, "max_size": 1, "timeout": 0.3},
            "circuit_breaker": {"fail_max": 100},
        }
    )
    import copy

    from django_asyncpool.base import DatabaseWrapper

    holder = DatabaseWrapper(copy.deepcopy(wrapper.settings_dict), alias=wrapper.alias)
    holder.ensure_connection()  # takes the only connection
    started = time.monotonic()
    with pytest.raises(PoolTimeout) as info:
        query(wrapper)
    assert time.monotonic() - started < 1.0  # not retried past the pool timeout
    assert "size 1/1, in use 1" in str(info.value)
    # Django's parallel test runner pickles errors: one that is its own cause breaks it.
    assert info.value.__cause__ is not info.value
    pickle.loads(pickle.dumps(info.value))
    holder.close()
    query(wrapper)  # service resumes at once


def test_password_never_appears_in_errors_or_logs(make_wrapper, proxy, caplog) -> None:
    bad = "Wr0ng-" + PASSWORD
    wrappers = [
        make_wrapper(PASSWORD=bad, OPTIONS={**FAST, "retry": {"max_tries": 2, "base_delay": 0.01}}),
        make_wrapper(
            PASSWORD=bad,
            HOST=proxy.host,
            PORT=proxy.port,
            OPTIONS={**FAST, "retry": {"max_tries": 2, "base_delay": 0.01}},
        ),
    ]
    proxy.cut()
    texts = []
    with caplog.at_level(logging.DEBUG):
        for wrapper in wrappers:
            with pytest.raises(DatabaseUnavailable) as info:
                query(wrapper)
            err = info.value
            texts += [str(err), repr(err), str(err.__cause__), repr(_registry.guard(wrapper.alias))]
            texts.append(repr(_registry.guard(wrapper.alias).config))
    texts.append(caplog.text)
    assert "password authentication failed" in texts[0]
    for text in texts:
        assert bad not in text and PASSWORD not in text


def test_fork_child_builds_its_own_pool(make_wrapper) -> None:
    """A child forked after the parent used the pool never touches the parent's sockets."""
    wrapper = make_wrapper(OPTIONS={"pool": {"min_size": 1, "max_size": 2}})
    with wrapper.cursor() as cursor:  # the parent holds a connection across the fork
        cursor.execute("select pg_backend_pid()")
        parent_pid = cursor.fetchone()[0]
    idle_pid = query(wrapper) if False else None  # noqa: F841
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            pids = [query(wrapper) for _ in range(3)]
            os.write(write, repr(pids).encode())
        finally:
            os._exit(0)
    os.close(write)
    with wrapper.cursor() as cursor:  # the parent keeps working meanwhile
        cursor.execute("select pg_backend_pid()")
        assert cursor.fetchone()[0] == parent_pid
    _, status = os.waitpid(child, 0)
    child_pids = eval(os.read(read, 1000).decode())
    assert status == 0
    assert len(child_pids) == 3 and parent_pid not in child_pids
    with wrapper.cursor() as cursor:  # still the same healthy connection after the child exit
        cursor.execute("select pg_backend_pid()")
        assert cursor.fetchone()[0] == parent_pid
    wrapper.close()
    query(wrapper)
