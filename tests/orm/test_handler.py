"""The greenlet request path (django_asyncpool.orm.handler) against Django's ASGIHandler.

The same requests, through Django's middleware stack, go to both handlers: the
responses, headers, cookies, signals and connections left must be the same, and the
greenlet path must hand nothing to a thread but the application's own sync code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django.core import signals
from django.core.handlers.asgi import ASGIHandler
from django.db import connections
from django.test import override_settings
from django.utils.deprecation import MiddlewareMixin

from django_asyncpool import metrics
from django_asyncpool.orm import pool as _ormpool
from django_asyncpool.orm import watchdog as _watchdog
from django_asyncpool.orm.handler import GreenASGIHandler

from ..conftest import hops

STACK = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
RECORDER = f"{__name__}.record"
SITE = {"MIDDLEWARE": STACK, "ROOT_URLCONF": "tests.orm.green_site", "DEBUG": False}
db = pytest.mark.django_db(transaction=True, databases=list(connections.settings))

seen: list[tuple[str, Any]] = []


def record(signal: Any, sender: Any, **kwargs: Any) -> None:
    seen.append(("started" if signal is signals.request_started else "finished", sender))


@pytest.fixture
def native() -> Iterator[None]:
    """Turn OPTIONS["async_orm"] on for every alias, and record the request signals."""
    before = {a: s["OPTIONS"].get("async_orm") for a, s in connections.settings.items()}
    for settings_dict in connections.settings.values():
        settings_dict["OPTIONS"]["async_orm"] = True
    signals.request_started.connect(record)
    signals.request_finished.connect(record)
    try:
        with override_settings(**SITE, ASYNCPOOL_DATABASE_ONLY=[RECORDER]):
            yield
    finally:
        signals.request_started.disconnect(record)
        signals.request_finished.disconnect(record)
        for alias, value in before.items():
            options = connections.settings[alias]["OPTIONS"]
            if value is None:
                options.pop("async_orm", None)
            else:
                options["async_orm"] = value


def _cookie(header: str) -> str:
    name, _, rest = header.partition("=")
    _value, _, attributes = rest.partition(";")
    attributes = re.sub(r"expires=[^;]*", "expires=<date>", attributes)  # the second ticks
    return f"{name}=<value>;{attributes}"


def _normal(response: httpx.Response) -> dict[str, Any]:
    headers = sorted(
        (k, _cookie(v) if k == "set-cookie" else v)
        for k, v in response.headers.multi_items()
        if k != "content-length" or "set-cookie" not in response.headers
    )
    return {"status": response.status_code, "headers": headers, "body": response.text}


async def _session(app: Any) -> list[Any]:
    """Run the requests of one visitor; return what each got and the signals it sent."""
    out: list[Any] = []
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        for method, url in [
            ("GET", "/page/"),
            ("GET", "/page/"),
            ("GET", "/page"),  # CommonMiddleware's APPEND_SLASH redirect
            ("POST", "/form/"),  # no CSRF token: 403
            ("POST", "/form/+token"),
            ("GET", "/sync/"),  # a sync view: Django's thread path in both
            ("GET", "/stream/"),
            ("GET", "/plain/"),
            ("GET", "/missing/"),
            ("GET", "/fails/"),
        ]:
            seen.clear()
            headers = {}
            if url.endswith("+token"):
                url = url.removesuffix("+token")
                headers["X-CSRFToken"] = client.cookies["csrftoken"]
            data = {"a": "1"} if method == "POST" else None
            response = await client.request(method, url, data=data, headers=headers)
            body = _normal(response)
            if url == "/page/":
                body["body"] = json.loads(body["body"])
            out.append((method, url, body, list(seen)))
    return out


def _held() -> list[tuple[str, int]]:
    """Return (alias, connections in use) of this loop's native pools that hold any."""
    loop = asyncio.get_running_loop()
    return [
        (alias, h.pool.size - len(h.pool.idle))
        for alias, h in _ormpool.holders()
        if h is _ormpool._holders[alias].get(loop) and h.pool.size != len(h.pool.idle)
    ]


def _thread_connections() -> list[str]:
    return [w.alias for w in connections.all(initialized_only=True) if w.connection is not None]


@db
async def test_same_responses_cookies_and_signals_as_djangos_handler(native: None) -> None:
    with hops() as django_hops:
        expected = await _session(ASGIHandler())
    assert _thread_connections() == []
    with hops() as green_hops:
        got = await _session(GreenASGIHandler())
    assert _thread_connections() == []
    assert _held() == []
    assert got == expected
    assert got[1][2]["body"]["visits"] == 2  # the session was saved (in the greenlet)
    assert got[3][2]["status"] == 403 and got[4][2]["status"] == 200
    assert "SessionMiddleware.process_response" in django_hops
    # What is left for a thread: the sync view, Django's paths for 404 and 500, and
    # close() after the requests that used the thread (request_finished closes there
    # what the thread opened, as Django does) or stream.
    assert set(green_hops) == {
        "sync_view",
        "HttpResponseBase.close",
        "log_response",
        "response_for_exception",
        "BaseHandler.process_exception_by_middleware",
    }
    assert green_hops.count("sync_view") == 1
    assert green_hops.count("HttpResponseBase.close") == 3  # /sync/, /stream/, /fails/


@db
async def test_a_sync_views_connection_goes_back_to_its_pool(native: None) -> None:
    """Its thread opened it: request_finished closes it in that thread, as Django does."""
    from django_asyncpool import _registry

    def in_use() -> dict[tuple[str, str], int]:
        return {(s["alias"], s["pool"]): s["in_use"] for s in _registry.snapshots()}

    transport = httpx.ASGITransport(app=GreenASGIHandler())
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        await c.get("/sync/")
        before = in_use()
        with hops() as seen_hops:
            for _ in range(3):
                assert (await c.get("/sync/")).status_code == 200
    assert in_use() == before
    assert seen_hops.count("HttpResponseBase.close") == 3


@db
async def test_a_page_through_the_whole_stack_takes_no_thread(native: None) -> None:
    app = GreenASGIHandler()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        await client.get("/page/")  # the session row exists: the next one reads and updates it
        with hops() as seen_hops:
            response = await client.get("/page/")
    assert response.status_code == 200 and response.json()["visits"] == 2
    assert seen_hops == []
    assert _held() == []


@db
async def test_unknown_sync_middleware_keeps_the_thread_path(native: None) -> None:
    with override_settings(MIDDLEWARE=[*STACK, "tests.orm.test_handler.Blocking"]):
        app = GreenASGIHandler()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            with hops() as seen_hops:
                assert (await c.get("/plain/")).status_code == 200
    # In a thread, and so the close() that follows; Django's own hooks are not.
    assert seen_hops == ["Blocking.process_request", "HttpResponseBase.close"]


@db
async def test_a_body_kept_on_disk_is_parsed_in_a_thread(native: None) -> None:
    transport = httpx.ASGITransport(app=GreenASGIHandler())
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        await client.get("/page/")
        headers = {"X-CSRFToken": client.cookies["csrftoken"]}
        with override_settings(FILE_UPLOAD_MAX_MEMORY_SIZE=100), hops() as seen_hops:
            response = await client.post("/form/", data={"a": "x" * 200}, headers=headers)
    assert response.status_code == 200 and response.text == "posted ['a']"
    assert "CsrfViewMiddleware.process_view" in seen_hops
    assert "CsrfViewMiddleware.process_request" in seen_hops


@db
async def test_without_async_orm_everywhere_it_is_djangos_path(native: None) -> None:
    connections.settings["replica"]["OPTIONS"]["async_orm"] = False
    app = GreenASGIHandler()
    assert not app.green
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        with hops() as seen_hops:
            assert (await client.get("/plain/")).status_code == 200
    assert "SessionMiddleware.process_request" in seen_hops


class Blocking(MiddlewareMixin):
    """Sync middleware that sleeps in process_request: it blocks on something else."""

    def process_request(self, request: Any) -> None:
        time.sleep(0.05)


class Busy(MiddlewareMixin):
    """Sync middleware that computes for 50 ms in process_response: CPU holds the loop too."""

    def process_response(self, request: Any, response: Any) -> Any:
        deadline = time.thread_time() + 0.05
        while time.thread_time() < deadline:
            pass
        return response


@pytest.fixture
def caplog_pool(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="django_asyncpool")
    return caplog


@db
async def test_watchdog_names_the_code_that_held_the_loop(
    native: None, caplog_pool: pytest.LogCaptureFixture
) -> None:
    mw = "tests.orm.test_handler.Blocking"
    with override_settings(MIDDLEWARE=[*STACK, mw], ASYNCPOOL_DATABASE_ONLY=[RECORDER, mw]):
        app = GreenASGIHandler()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            metrics.flush()
            before = dict(_watchdog.blocked)
            with hops() as seen_hops:
                for _ in range(3):
                    assert (await c.get("/plain/")).status_code == 200
    assert seen_hops == []  # listed as database-only: run in the greenlet
    where = "tests.orm.test_handler.process_request"
    assert _watchdog.blocked[where] - before.get(where, 0) == 3
    logged = [r for r in caplog_pool.records if "held the event loop" in r.getMessage()]
    assert len(logged) == 1  # once per code location
    assert "time.sleep(0.05)" in logged[0].getMessage()
    metrics.flush()
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry()
    metrics.install(registry)
    assert f'db_loop_blocked_total{{where="{where}"}}' in generate_latest(registry).decode()


@db
async def test_watchdog_off_with_zero(native: None) -> None:
    mw = "tests.orm.test_handler.Blocking"
    with override_settings(
        MIDDLEWARE=[*STACK, mw], ASYNCPOOL_DATABASE_ONLY=[mw], ASYNCPOOL_LOOP_BLOCKED_MS=0
    ):
        before = dict(_watchdog.blocked)
        transport = httpx.ASGITransport(app=GreenASGIHandler())
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            assert (await c.get("/plain/")).status_code == 200
    assert _watchdog.blocked == before


@db
async def test_watchdog_counts_cpu_work_too(native: None) -> None:
    mw = "tests.orm.test_handler.Busy"
    with override_settings(MIDDLEWARE=[*STACK, mw], ASYNCPOOL_DATABASE_ONLY=[mw]):
        before = dict(_watchdog.blocked)
        transport = httpx.ASGITransport(app=GreenASGIHandler())
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            assert (await c.get("/plain/")).status_code == 200
    grown = {w: n - before.get(w, 0) for w, n in _watchdog.blocked.items()}
    assert grown.get("tests.orm.test_handler.process_response") == 1


@db
def test_dbpool_check_says_where_the_request_path_runs(native: None) -> None:
    from ..test_dbpool_check import dbpool_check

    code, out, _ = dbpool_check("--database", "default")
    assert "ASGI request path: Django's sync middleware and signals run in a greenlet" in out
    assert "Loop watchdog: sync code holding the loop over 20 ms is logged" in out
    connections.settings["replica"]["OPTIONS"]["async_orm"] = False
    code2, out, _ = dbpool_check("--database", "default", "--format", "json")
    path = json.loads(out.rsplit("\n", 1)[0])["request_path"]
    assert code2 == code == 0, out
    assert path["greenlet"] is False and path["aliases_without_async_orm"] == ["replica"]
    assert path["database_only"] == [RECORDER] and path["loop_blocked_ms"] == 20


@db
def test_under_uvicorn_no_thread_is_started(native: None) -> None:
    """A real server: Django's handler starts a thread per request, ours none."""
    import socket
    import threading

    import uvicorn

    started: list[str] = []
    original = threading.Thread.start

    def start(self: threading.Thread) -> None:
        started.append(self.name)
        original(self)

    def serve(app: Any) -> list[str]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        config = uvicorn.Config(app, port=port, lifespan="off", log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            assert _wait(lambda: server.started)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                assert client.get("/page/").status_code == 200  # warm: pools, sessions
                started.clear()
                threading.Thread.start = start  # type: ignore[method-assign]
                try:
                    for _ in range(5):
                        response = client.get("/page/")
                        assert response.status_code == 200
                finally:
                    threading.Thread.start = original  # type: ignore[method-assign]
                return list(started)
        finally:
            server.should_exit = True
            thread.join(10)

    assert len(serve(ASGIHandler())) >= 5  # one per request at least (its sync hooks)
    assert serve(GreenASGIHandler()) == []


def _wait(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
