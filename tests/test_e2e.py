"""testproject end to end: every view over HTTP, through an ASGI client and real servers.

The first part drives ``testproject.asgi.application`` in this process with httpx's
ASGI transport, on the test database. The second part runs the demo the way the
README does (``scripts/demo.py``: an embedded PostgreSQL of its own, uvicorn), then
``manage.py runserver`` and ``manage.py dbpool_check`` against it, and stops the demo
with Ctrl-C (SIGINT), and then with SIGTERM.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.core.management import call_command

from testproject import pgserver
from testproject.asgi import application

from .conftest import hops, metric_value, wait_until

ROOT = Path(__file__).resolve().parent.parent
DETAIL_STYLES = [
    "/products/{}/",
    "/fast/products/{}/",
    "/orm/products/{}/",
    "/orm/native/products/{}/",
    "/sync/products/{}/",
]

db = pytest.mark.django_db(
    transaction=True, reset_sequences=True, databases=["default", "replica", "replica_native"]
)


# -- through an ASGI client, in this process --------------------------------------------------


@pytest.fixture
def sample() -> None:
    call_command("load_sample", products=30, orders=3, stdout=io.StringIO())


@pytest.fixture
def no_held_connections(sample: None) -> None:
    """Give this thread's connections back: a server restart would break them."""
    from django.db import connections

    connections.close_all()


@pytest.fixture
async def client(sample: None) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


async def _pools(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/pool/")
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


@db
async def test_the_native_orm_view_takes_no_thread_hop(client: httpx.AsyncClient) -> None:
    """/orm/native/ runs aget() on the loop; /orm/ (the same code, async_orm off) hops."""
    with hops() as native:
        assert (await client.get("/orm/native/products/7/")).json()["id"] == 7
    with hops() as hopping:
        assert (await client.get("/orm/products/7/")).json()["id"] == 7
    assert "QuerySet.get" in hopping  # the spy sees Django's own thread hop
    assert not [name for name in native if name.startswith("QuerySet.")], native


@db
async def test_every_style_returns_the_same_product(client: httpx.AsyncClient) -> None:
    bodies = [(await client.get(style.format(7))).json() for style in DETAIL_STYLES]
    assert bodies[0] == {
        "id": 7,
        "sku": "SKU-00007",
        "name": bodies[0]["name"],
        "price_cents": bodies[0]["price_cents"],
    }
    assert all(body == bodies[0] for body in bodies)


@db
async def test_lists_index_and_report(client: httpx.AsyncClient) -> None:
    index = await client.get("/")
    assert index.status_code == 200 and 'href="/fast/products/1/"' in index.text
    page = (await client.get("/products/?limit=5&offset=10")).json()
    assert [p["id"] for p in page["products"]] == [11, 12, 13, 14, 15]
    assert (await client.get("/sync/products/?limit=5&offset=10")).json() == page
    report = (await client.get("/report/")).json()
    assert report["orders"] == 3 and report["lines"] == 9
    assert report["revenue_cents"] == sum(p["revenue_cents"] for p in report["top_products"])


@db
async def test_create_product_then_read_it_everywhere(client: httpx.AsyncClient) -> None:
    made = await client.post("/products/", json={"sku": "NEW-1", "name": "New", "price_cents": 5})
    assert made.status_code == 201
    pk = made.json()["id"]
    for style in DETAIL_STYLES:
        assert (await client.get(style.format(pk))).json()["sku"] == "NEW-1"
    again = await client.post(
        "/products/", json={"sku": "NEW-1", "name": "Other", "price_cents": 6}
    )
    assert again.status_code == 409
    assert again.json() == {
        "error": "That already exists (unique constraint shop_product_sku_key)."
    }


@db
async def test_order_is_created_in_one_transaction(client: httpx.AsyncClient) -> None:
    p1, p2 = (await client.get("/products/1/")).json(), (await client.get("/products/2/")).json()
    body = {
        "customer": "a@example.com",
        "lines": [{"product": 1, "quantity": 2}, {"product": 2, "quantity": 1}],
    }
    made = await client.post("/orders/", json=body)
    assert made.status_code == 201, made.text
    order = made.json()
    assert order["total_cents"] == 2 * p1["price_cents"] + p2["price_cents"]
    detail = (await client.get(f"/sync/orders/{order['id']}/")).json()
    assert detail["customer"] == "a@example.com"
    assert sorted((x["product"], x["quantity"]) for x in detail["lines"]) == [(1, 2), (2, 1)]
    assert (await client.get("/report/")).json()["orders"] == 4

    # A failure half-way rolls the whole order back: no order without its lines.
    for lines, status, message in [
        (
            [{"product": 1, "quantity": 1}, {"product": 999999, "quantity": 1}],
            404,
            "No product with id 999999",
        ),
        ([{"product": 1, "quantity": 0}], 400, "constraint orderline_quantity_at_least_1"),
        (
            [{"product": 1, "quantity": 1}, {"product": 1, "quantity": 3}],
            409,
            "orderline_one_per_product",
        ),
    ]:
        failed = await client.post("/orders/", json={"customer": "b", "lines": lines})
        assert failed.status_code == status and message in failed.json()["error"]
    assert (await client.get("/report/")).json()["orders"] == 4


@db
@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("GET", "/products/999999/", None, 404, "No product with id 999999"),
        ("GET", "/fast/products/999999/", None, 404, "No product with id 999999"),
        ("GET", "/orm/products/999999/", None, 404, "Product matching query does not exist"),
        ("GET", "/orm/native/products/9999/", None, 404, "Product matching query does not exist"),
        ("GET", "/sync/products/999999/", None, 404, "Product matching query does not exist"),
        ("GET", "/sync/orders/999999/", None, 404, "Order matching query does not exist"),
        ("GET", "/products/9223372036854775807/", None, 404, "No product with id 92233"),
        ("GET", "/fast/products/9223372036854775807/", None, 404, "No product with id 92233"),
        ("GET", "/products/99999999999999999999/", None, 404, "is not an id: ids are whole"),
        ("GET", "/sync/products/99999999999999999999/", None, 404, "is not an id"),
        ("GET", "/fast/products/9223372036854775808/", None, 404, "is not an id"),
        ("GET", "/products/abc/", None, 404, "'abc' is not an id"),
        ("GET", "/orm/products/-1/", None, 404, "'-1' is not an id"),
        ("GET", "/sync/orders/0/", None, 404, "'0' is not an id"),
        ("GET", "/products/?limit=x", None, 400, "limit and offset must be integers"),
        ("GET", "/sync/products/?limit=1000", None, 400, "limit must be within 1..100"),
        ("GET", "/products/?offset=99999999999999999999999", None, 400, "offset must be within"),
        ("GET", "/products/?offset=-1", None, 400, "offset must be within 0..2147483647"),
        ("POST", "/products/", b"{not json", 400, "not valid JSON"),
        ("POST", "/products/", b"\xff\xfe", 400, "not valid JSON"),
        ("POST", "/products/", b"[1, 2]", 400, "must be a JSON object"),
        ("POST", "/products/", {"sku": "X"}, 400, "'name' must be a non-empty string"),
        (
            "POST",
            "/products/",
            {"sku": "X", "name": "x", "price_cents": "1"},
            400,
            "must be an integer",
        ),
        (
            "POST",
            "/products/",
            {"sku": "X", "name": "x", "price_cents": 2**40},
            400,
            "out of range",
        ),
        ("POST", "/products/", {"sku": "X", "name": "x", "price_cents": -1}, 400, "constraint"),
        ("POST", "/products/", {"sku": "X" * 40, "name": "x", "price_cents": 1}, 400, "at most 32"),
        ("POST", "/orders/", {"customer": "c", "lines": []}, 400, "non-empty list"),
        (
            "POST",
            "/orders/",
            {"customer": "c", "lines": [{"product": 1}]},
            400,
            "lines[0]: 'quantity'",
        ),
        ("DELETE", "/products/1/", None, 405, "DELETE is not allowed here; use GET"),
        ("GET", "/orders/", None, 405, "GET is not allowed here; use POST"),
    ],
)
async def test_bad_input_gets_a_clear_4xx(
    client: httpx.AsyncClient, method: str, path: str, body: Any, status: int, message: str
) -> None:
    """As docs/demo.md says: a JSON {"error": ...} that says what is wrong, never a 500."""
    if isinstance(body, dict):
        response = await client.request(method, path, json=body)
    else:
        response = await client.request(method, path, content=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


@db
@pytest.mark.slow
async def test_database_down_is_a_503_that_says_what_to_do(
    client: httpx.AsyncClient, no_held_connections: None, server_down: Callable[[], None]
) -> None:
    from django_asyncpool.core import registry as _registry

    server_down()
    try:
        for path in ("/products/1/", "/fast/products/1/", "/report/"):
            response = await client.get(path)
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "5"
            assert "'replica'" in response.json()["error"]
            assert pgserver.PASSWORD not in response.text
    finally:
        _registry.reset("replica")  # a fresh breaker for the tests that follow


@db
async def test_reads_go_to_the_replica_pool_and_writes_to_default(
    client: httpx.AsyncClient,
) -> None:
    before = await _pools(client)
    await client.get("/products/1/")
    await client.get("/fast/products/1/")
    middle = await _pools(client)

    def checkouts(pools: dict[str, Any], alias: str) -> int:
        return int(pools[alias]["async"]["created"] + pools[alias]["async"]["reused"])

    assert checkouts(middle, "replica") == checkouts(before, "replica") + 2
    assert checkouts(middle, "default") == checkouts(before, "default")
    await client.post("/products/", json={"sku": "W1", "name": "w", "price_cents": 1})
    after = await _pools(client)
    assert checkouts(after, "default") == checkouts(middle, "default") + 1
    assert after["replica"]["async"]["breaker_state"] == "closed"
    assert after["default"]["sync"] is not None  # the sync pool load_sample used


def _checkouts(metrics_text: str, alias: str, pool: str) -> float:
    """Sum created + reused connections of one pool in a Prometheus text page."""
    return sum(
        metric_value(metrics_text, name, alias=alias, pool=pool)
        for name in ("db_pool_connections_created_total", "db_pool_connections_reused_total")
    )


needs_metrics = pytest.mark.skipif(
    not (ROOT / "django_asyncpool" / "metrics.py").exists(),
    reason="issue 4 (metrics) has not landed",
)


@db
@needs_metrics
async def test_metrics_page_shows_both_pools_moving(client: httpx.AsyncClient) -> None:
    before = (await client.get("/metrics")).text
    for _ in range(3):
        assert (await client.get("/products/1/")).status_code == 200  # async, replica
        assert (await client.get("/sync/products/1/")).status_code == 200  # sync, replica
    after = (await client.get("/metrics")).text
    assert _checkouts(after, "replica", "async") >= _checkouts(before, "replica", "async") + 3
    assert _checkouts(after, "replica", "sync") >= _checkouts(before, "replica", "sync") + 3
    assert 'db_connection_state{alias="replica",pool="async",state="idle"}' in after
    assert pgserver.PASSWORD not in after


@db
async def test_health_page_checks_every_alias(client: httpx.AsyncClient) -> None:
    response = await client.get("/health/?format=json")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "PoolCheck(alias='default')": "OK",
        "PoolCheck(alias='replica')": "OK",
        "PoolCheck(alias='replica_native')": "OK",
    }
    assert (await client.get("/health/")).status_code == 200  # the HTML page


# -- the demo, a real uvicorn process --------------------------------------------------------


#: ``python3 scripts/dev.py`` as the README runs it, on the virtualenv running the tests.
DEV_PY = (
    "import pathlib, sys; sys.path.insert(0, 'scripts'); import dev; "
    "dev.ensure_venv = lambda *a: pathlib.Path(sys.executable); sys.exit(dev.main(sys.argv[1:]))"
)


class Demo:
    """``scripts/demo.py`` (or ``dev.py demo``) in a subprocess, its output read by a thread."""

    def __init__(self, pgdata: Path, port: int, *, via_dev: bool = False) -> None:
        env = dict(os.environ, ASYNCPOOL_PGDATA=str(pgdata), PYTHONUNBUFFERED="1")
        env.pop("DATABASE_URL", None)  # the embedded server, as on a bare machine
        env.pop("DJANGO_SETTINGS_MODULE", None)
        self.pgdata = pgdata
        self.base = f"http://127.0.0.1:{port}"
        self.port = port
        self.lines: list[str] = []
        program = ["-c", DEV_PY, "demo"] if via_dev else [str(ROOT / "scripts" / "demo.py")]
        self.proc = subprocess.Popen(
            [sys.executable, *program, "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_until(lambda: "Press Ctrl-C" in self.output or self.proc.poll() is not None, 180)
        if "Press Ctrl-C" not in self.output:
            self.stop()
            raise AssertionError(f"the demo did not start:\n{self.output}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def pg_port(self) -> int:
        return int((self.pgdata / "demo.port").read_text())

    def stop(self, sig: int = signal.SIGINT) -> int:
        """Press Ctrl-C (or send ``sig``); return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._reader.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        # As servers do: a port with connections in TIME_WAIT but no listener is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def pgdata() -> Iterator[Path]:
    # Not pytest's tmp_path: concurrent pytest runs prune each other's old base directories.
    path = Path(tempfile.mkdtemp(prefix="asyncpool-demo-")) / "pgdata"
    yield path
    if (path / "PG_VERSION").exists():
        pgserver.LocalPostgres(path).destroy()
    shutil.rmtree(path.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def demo(pgdata: Path) -> Iterator[Demo]:
    d = Demo(pgdata, pgserver.free_port())
    yield d
    d.stop()


def _get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=30)


@pytest.mark.slow
def test_demo_prints_the_urls_and_serves_every_one(demo: Demo) -> None:
    from testproject.shop.views import PAGES

    assert "data in " + str(demo.pgdata.resolve()) in demo.output
    assert pgserver.PASSWORD not in demo.output
    for url, _ in PAGES:
        assert f"{demo.base}{url}" in demo.output
        response = _get(demo.base + url)
        assert response.status_code == 200, (url, response.text[:300])
    assert "Sample data: 1000 products, 50 new orders." in demo.output


@pytest.mark.slow
def test_demo_writes_and_rejects_bad_input(demo: Demo) -> None:
    made = httpx.post(
        f"{demo.base}/products/", json={"sku": "E2E-1", "name": "e2e", "price_cents": 1}
    )
    assert made.status_code == 201
    order = {"customer": "e2e", "lines": [{"product": made.json()["id"], "quantity": 3}]}
    assert httpx.post(f"{demo.base}/orders/", json=order).json()["total_cents"] == 3
    assert httpx.post(f"{demo.base}/orders/", content=b"{").status_code == 400
    dup = httpx.post(f"{demo.base}/products/", json={"sku": "E2E-1", "name": "x", "price_cents": 1})
    assert dup.status_code == 409
    assert _get(f"{demo.base}/fast/products/123456789/").status_code == 404


@pytest.mark.slow
def test_demo_pool_metrics_move_under_uvicorn(demo: Demo) -> None:
    before = _get(f"{demo.base}/pool/").json()["replica"]["async"]
    for _ in range(20):
        assert _get(f"{demo.base}/products/3/").status_code == 200
    pools = _get(f"{demo.base}/pool/").json()["replica"]
    after = pools["async"]
    assert pools["async_loops"] == 1  # uvicorn's one long loop: one engine
    assert after["created"] + after["reused"] == before["created"] + before["reused"] + 20
    assert after["created"] <= 15  # pool_size + max_overflow: connections are reused
    assert after["in_use"] == 0 and after["breaker_state"] == "closed"
    text = _get(f"{demo.base}/metrics").text
    assert "python_info" in text  # django-prometheus serves the registry


@pytest.mark.slow
@needs_metrics
def test_demo_metrics_page_moves_under_uvicorn(demo: Demo) -> None:
    before = _checkouts(_get(f"{demo.base}/metrics").text, "replica", "async")
    for _ in range(10):
        assert _get(f"{demo.base}/fast/products/4/").status_code == 200
    after = _checkouts(_get(f"{demo.base}/metrics").text, "replica", "async")
    assert after == before + 10


@pytest.mark.slow
def test_the_idle_demo_holds_no_connection(demo: Demo) -> None:
    """migrate and load_sample give their connection back: /pool/ shows nothing in use."""
    pools = _get(f"{demo.base}/pool/").json()
    assert {alias: p["sync"]["in_use"] for alias, p in pools.items()} == dict.fromkeys(pools, 0)


def _manage(
    *args: str, cwd: Path = ROOT, **env: str
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run ``manage.py ARGS`` from ``cwd`` as a user would, without DATABASE_URL.

    Return the process and what it left in a temporary directory of its own.
    """
    tmp = Path(tempfile.mkdtemp(prefix="manage-"))
    environ = {
        k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "DJANGO_SETTINGS_MODULE"}
    }
    try:
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            capture_output=True,
            text=True,
            cwd=cwd,
            env={**environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp), **env},
            timeout=120,
        )
        return done, sorted(p.name for p in tmp.iterdir())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_dbpool_check_against_the_demo(demo: Demo) -> None:
    """As docs/demo.md says: ASYNCPOOL_PGDATA points manage.py at the running demo."""
    done, left = _manage("dbpool_check", ASYNCPOOL_PGDATA=str(demo.pgdata))
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "default" in out and "replica" in out
    assert f"'default' (postgres@127.0.0.1:{demo.pg_port}/asyncpool)" in out
    assert f"Database: the embedded PostgreSQL with its data in {demo.pgdata}" in done.stderr
    assert pgserver.PASSWORD not in out
    assert left == [], "manage.py left these in the temporary directory"


@pytest.mark.slow
def test_manage_py_finds_the_running_demo_without_being_told(demo: Demo) -> None:
    """From a clone with the demo running, manage.py checks the demo's server."""
    clone = Path(tempfile.mkdtemp(prefix="clone-"))
    try:
        shutil.copy(ROOT / "manage.py", clone)
        (clone / ".demo").mkdir()
        (clone / ".demo" / "pgdata").symlink_to(demo.pgdata)
        done, left = _manage("dbpool_check", cwd=clone)
    finally:
        shutil.rmtree(clone)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert f"'default' (postgres@127.0.0.1:{demo.pg_port}/asyncpool)" in out
    assert "Database: the embedded PostgreSQL with its data in" in done.stderr
    assert left == [], "manage.py left these in the temporary directory"


@pytest.mark.slow
def test_manage_py_says_when_its_database_is_a_throwaway_one() -> None:
    clone = Path(tempfile.mkdtemp(prefix="clone-"))
    try:
        shutil.copy(ROOT / "manage.py", clone)
        done, left = _manage("check", cwd=clone)
    finally:
        shutil.rmtree(clone)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Database: a throwaway embedded PostgreSQL, deleted when this command ends" in (
        done.stderr
    )
    assert left == [], "manage.py left these in the temporary directory"


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_runserver_runs_every_view_each_on_a_fresh_loop(demo: Demo) -> None:
    """Django's dev server (WSGI) runs each async view in its own event loop."""
    port = pgserver.free_port()
    # As docs/demo.md says: ASYNCPOOL_PGDATA points the settings at the running demo.
    env = dict(
        os.environ,
        ASYNCPOOL_PGDATA=str(demo.pgdata),
        PYTHONUNBUFFERED="1",
        PYTHONFAULTHANDLER="1",  # SIGABRT prints every thread's stack, should it hang
    )
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.pop("DATABASE_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
        # Ctrl-C must reach it: a shell without job control starts background jobs with
        # SIGINT ignored, and a child inherits that (runserver, unlike uvicorn, installs
        # no handler of its own, so it would never stop).
        preexec_fn=_sigint_default,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: not _port_free(port) or proc.poll() is not None, 60)
        assert proc.poll() is None
        for _ in range(3):  # again and again: each request is a new loop, a new engine
            for style in DETAIL_STYLES:
                response = _get(base + style.format(5))
                assert response.status_code == 200 and response.json()["id"] == 5
            assert _get(f"{base}/report/").status_code == 200
            assert _get(f"{base}/products/?limit=3").status_code == 200
        order = {"customer": "runserver", "lines": [{"product": 5, "quantity": 1}]}
        assert httpx.post(f"{base}/orders/", json=order).status_code == 201
        assert httpx.post(f"{base}/orders/", content=b"nope").status_code == 400
        pools = _get(f"{base}/pool/").json()
        assert pools["replica"]["async_loops"] <= 1  # closed loops' engines are gone
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # where it hangs, from faulthandler
            out, _ = proc.communicate(timeout=30)
            raise AssertionError(f"runserver did not exit within 30 s of SIGINT:\n{out}") from None
    assert "Traceback" not in out and "different loop" not in out, out


@pytest.mark.slow
@pytest.mark.parametrize("client", ["python", "wrk"])
def test_load_script_drives_the_demo(demo: Demo, client: str) -> None:
    if client == "wrk" and not shutil.which("wrk"):
        pytest.skip("wrk is not installed (apt-get install -y wrk)")
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/load_demo.py",
            "--url",
            demo.base,
            "--pid",
            str(demo.proc.pid),
            "--seconds",
            "1",
            "--rounds",
            "1",
            "--concurrency",
            "4",
            "--client",
            client,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode in (0, 1), done.stdout + done.stderr  # 1: a bar missed
    rows = re.findall(
        r"^(session_scope|fast_path|aget|sync_orm) +(\d+) .* (\d+) +([\d.]+) +([\d.]+)x",
        done.stdout,
        re.M,
    )
    assert [r[0] for r in rows] == ["session_scope", "fast_path", "aget", "sync_orm"], (
        done.stdout + done.stderr
    )
    assert all(int(r[1]) > 0 and r[2] == "0" for r in rows), done.stdout  # req/s, no errors


@pytest.mark.slow
def test_ctrl_c_stops_the_server_and_the_embedded_postgresql(demo: Demo) -> None:
    pg_port = demo.pg_port
    assert not _port_free(demo.port) and not _port_free(pg_port)
    assert demo.stop() == 0, demo.output
    assert "Embedded PostgreSQL stopped." in demo.output
    assert "Traceback" not in demo.output, demo.output
    assert _port_free(demo.port), "the web server still listens"
    assert wait_until(lambda: _port_free(pg_port), 10), f"PostgreSQL still listens\n{demo.output}"
    assert not pgserver.LocalPostgres(demo.pgdata, port=pg_port).is_running()


@pytest.mark.slow
def test_a_second_run_reuses_the_data(demo: Demo, pgdata: Path) -> None:
    keep = {"sku": "KEEP", "name": "k", "price_cents": 1}
    made = demo.proc.poll() is None and httpx.post(f"{demo.base}/products/", json=keep).is_success
    assert demo.stop() == 0
    again = Demo(pgdata, pgserver.free_port())
    try:
        assert "Sample data: 1" in again.output and "0 new orders." in again.output
        assert _get(f"{again.base}/sync/orders/1/").json()["customer"] == "customer0@example.com"
        if made:  # still there from the first run
            assert httpx.post(f"{again.base}/products/", json=keep).status_code == 409
    finally:
        assert again.stop() == 0
    assert "Embedded PostgreSQL stopped." in again.output


def _running(pid: int) -> bool:
    """Return True while process ``pid`` runs (a zombie, exited but not reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_sigterm_stops_the_server_and_the_embedded_postgresql(demo: Demo, pgdata: Path) -> None:
    """docker stop, systemd: SIGTERM to ``dev.py demo``, which is the demo itself (an exec)."""
    demo.stop()  # the module's demo: this one is started as the README says
    run = Demo(pgdata, pgserver.free_port(), via_dev=True)
    pid_lines = (pgdata / "postmaster.pid").read_text().splitlines()
    postmaster, socket_dir = int(pid_lines[0]), Path(pid_lines[4])  # pid, unix socket dir
    assert _running(postmaster) and not _port_free(run.port)
    started = time.monotonic()
    assert run.stop(signal.SIGTERM) == 0, run.output
    took = time.monotonic() - started
    assert took < 30, f"the demo took {took:.1f}s to stop\n{run.output}"
    assert "Embedded PostgreSQL stopped." in run.output
    assert "Traceback" not in run.output, run.output
    assert _port_free(run.port), "the web server still listens"
    assert wait_until(lambda: not _running(postmaster), 10), f"PostgreSQL still runs\n{run.output}"
    assert not (pgdata / "postmaster.pid").exists()
    assert not socket_dir.exists(), "the server's socket directory was left behind"
