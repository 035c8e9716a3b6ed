"""HTTP load on one three-query view, sync Django against async Django, one worker each.

    python benchmarks/http_matrix.py [--seconds 5] [--rounds 5] [--cells c8-direct,...]
                                     [--variants sync,gthread,...] [--loop auto|asyncio|uvloop]

The project is benchmarks/http_site.py (CommonMiddleware only, ``DEBUG=False``); each
view runs ``get(pk=...)``, a ``filter().count()`` and ten rows as ``values()`` on
``shop.Product`` (1,000 rows). Variants, each its own server process (one worker):

- sync:    sync view, gunicorn, 1 sync worker
- gthread: sync view, gunicorn, 1 gthread worker with 8 threads
- hop:     async view, Django's ``aget`` & co. (thread hop), uvicorn + Django's ASGIHandler
- ours:    async view, ``OPTIONS["async_orm"]`` on, uvicorn + the package's
           ``get_asgi_application()``
- sqla:    async view, ``session_scope(readonly=True)`` with the same SQL, uvicorn + ours
           (``async_orm`` on, which the package's request path needs)
Not by default (``--variants``): ``native_django`` (``async_orm`` on under Django's
ASGIHandler), ``ours_asyncio`` (ours on asyncio's loop instead of uvloop) and
``ours_h11`` (ours with h11 instead of httptools), ``ours_noportal`` (ours with the
view outside a portal: a greenlet per native call); ``plain_sync``, ``plain_hop`` and
``plain_ours``: a view with no query under gunicorn's sync worker, Django's
ASGIHandler and ours.

Cells: wrk with 8 and 64 connections (``c8``, ``c64``), to PostgreSQL directly and
through a TCP proxy that delays each chunk 0.5 ms each way (``rtt1ms``: about 1 ms
RTT, as a network between app and database). Every variant serves in both networks
at once (one server per variant and network); the cells run interleaved, round after
round in a rotated order. Printed: medians over the rounds of requests/s, p99, and
the server's CPU per request (user + system of its process tree, from /proc), errors,
and the ratios the bars of issue 22 are about. Uses DATABASE_URL or the embedded
PostgreSQL; loopback only. Needs wrk (``apt-get install -y wrk``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from load_demo import Round, cpu_seconds, run_wrk  # noqa: E402

PATHS = {
    "sync": "/sync/{}/",
    "async": "/async/{}/",
    "sqla": "/sqla/{}/",
    "plain": "/plain/{}/",
    "aplain": "/aplain/{}/",
}
#: variant -> (server, application, path kind, async_orm)
VARIANTS = {
    "sync": ("gunicorn-sync", "http_site:wsgi", "sync", False),
    "gthread": ("gunicorn-gthread", "http_site:wsgi", "sync", False),
    "hop": ("uvicorn", "http_site:django_asgi", "async", False),
    "ours": ("uvicorn", "http_site:ours", "async", True),
    # async_orm on too: the request path needs it on every alias to be ours.
    "sqla": ("uvicorn", "http_site:ours", "sqla", True),
    "native_django": ("uvicorn", "http_site:django_asgi", "async", True),
    "ours_asyncio": ("uvicorn-asyncio", "http_site:ours", "async", True),
    "ours_h11": ("uvicorn-h11", "http_site:ours", "async", True),
    # Ours with the view outside a portal: each native call in a greenlet of its own.
    "ours_noportal": ("uvicorn", "http_site:ours_noportal", "async", True),
    # No query at all: what the server and Django's request path cost by themselves.
    "plain_sync": ("gunicorn-sync", "http_site:wsgi", "plain", False),
    "plain_hop": ("uvicorn", "http_site:django_asgi", "aplain", False),
    "plain_ours": ("uvicorn", "http_site:ours", "aplain", True),
}
DEFAULT_VARIANTS = "sync,gthread,hop,ours,sqla"
CELLS = {"c8-direct": (8, "direct"), "c64-direct": (64, "direct"),
         "c8-rtt1ms": (8, "rtt1ms"), "c64-rtt1ms": (64, "rtt1ms")}  # fmt: skip
ROWS = 1_000


def prepare_database() -> str:
    """Return the database URL, migrated and loaded with ROWS products."""
    url = os.environ.get("DATABASE_URL")
    if not url:
        from testproject import pgserver

        url = pgserver.embedded_url()
    os.environ["HTTP_MATRIX_DB"] = url
    os.environ["DJANGO_SETTINGS_MODULE"] = "http_site"
    import django

    django.setup()
    from django.core.management import call_command

    from testproject.shop.models import Product

    call_command("migrate", verbosity=0)
    missing = ROWS - Product.objects.count()
    if missing > 0:
        Product.objects.bulk_create(
            Product(sku=f"HTTP-{time.time_ns()}-{n}", name=f"item {n}", price_cents=n)
            for n in range(missing)
        )
    from django.db import connections

    connections.close_all()
    return url


def proxied(url: str) -> tuple[str, object]:
    """Return ``url`` through a TCP proxy adding 0.5 ms each way, and the proxy."""
    from urllib.parse import urlsplit, urlunsplit

    from tests.proxy import TcpProxy

    parts = urlsplit(url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    proxy.latency = 0.0005
    netloc = parts.netloc.rsplit("@", 1)
    where = f"{proxy.host}:{proxy.port}"
    netloc_new = f"{netloc[0]}@{where}" if len(netloc) == 2 else where
    return urlunsplit(parts._replace(netloc=netloc_new)), proxy


def free_port() -> int:
    from testproject.pgserver import free_port as free

    return free()


def start_server(variant: str, db_url: str, loop: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``variant``'s server on a free port; return it and its base URL once it serves."""
    server, app, kind, async_orm = VARIANTS[variant]
    port = free_port()
    env = dict(os.environ, HTTP_MATRIX_DB=db_url, DJANGO_SETTINGS_MODULE="http_site")
    env["HTTP_MATRIX_ASYNC_ORM"] = "1" if async_orm else "0"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT)])
    bind = f"127.0.0.1:{port}"
    bindir = Path(sys.executable).parent
    if server.startswith("gunicorn"):
        cmd = [str(bindir / "gunicorn"), app, "-b", bind, "-w", "1", "--log-level", "warning"]
        if server == "gunicorn-gthread":
            cmd += ["-k", "gthread", "--threads", "8"]
    else:
        cmd = [str(bindir / "uvicorn"), app, "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--no-access-log", "--log-level", "warning", "--loop", loop]
        if server == "uvicorn-asyncio":
            cmd[-1] = "asyncio"
        elif server == "uvicorn-h11":
            cmd += ["--http", "h11"]
    proc = subprocess.Popen(cmd, env=env, cwd=str(HERE))
    base = f"http://{bind}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(base + PATHS[kind].format(1), timeout=5) as response:
                response.read()
            return proc, base
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                sys.exit(f"The {variant} server did not start: {' '.join(cmd)}")
            time.sleep(0.2)


def tree_cpu(pid: int) -> float:
    """Return the CPU seconds of ``pid`` and its children (gunicorn's worker)."""
    total = cpu_seconds(pid)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                total += cpu_seconds(int(entry.name))
    return total


def median(rounds: list[Round], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per cell per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--cells", default=",".join(CELLS))
    parser.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install -y wrk")
    variants = args.variants.split(",")
    cells = args.cells.split(",")
    url = prepare_database()
    networks = {CELLS[c][1] for c in cells}
    urls = {"direct": url}
    if "rtt1ms" in networks:
        urls["rtt1ms"], _proxy = proxied(url)
    servers: dict[tuple[str, str], tuple[subprocess.Popen[bytes], str]] = {}
    results: dict[tuple[str, str], list[Round]] = {}
    try:
        for network in sorted(networks):
            for variant in variants:
                servers[variant, network] = start_server(variant, urls[network], args.loop)
        ids = list(range(1, ROWS + 1))
        from testproject.shop.models import Product

        ids = list(Product.objects.values_list("pk", flat=True))
        load = os.getloadavg()
        print(
            f"{len(variants)} variants x {len(cells)} cells, {args.rounds} rounds x "
            f"{args.seconds:g}s, uvicorn --loop {args.loop}, {os.cpu_count()} CPUs, "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
            flush=True,
        )
        pieces = [(v, c) for c in cells for v in variants]
        for variant, cell in pieces:  # warm up: connections, code paths
            proc, base = servers[variant, CELLS[cell][1]]
            run_wrk(base, PATHS[VARIANTS[variant][2]], ids, CELLS[cell][0], 1.0)
        for n in range(args.rounds):
            shift = n * len(pieces) // max(args.rounds, 1)
            for variant, cell in pieces[shift:] + pieces[:shift]:
                concurrency, network = CELLS[cell]
                proc, base = servers[variant, network]
                before = tree_cpu(proc.pid)
                r = run_wrk(base, PATHS[VARIANTS[variant][2]], ids, concurrency, args.seconds)
                r.cpu_ms = (tree_cpu(proc.pid) - before) * 1e3 / max(r.requests, 1)
                results.setdefault((variant, cell), []).append(r)
            print(f"round {n + 1}/{args.rounds} done", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    report(variants, cells, results)
    load = os.getloadavg()
    print(f"\nload average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


Results = dict[tuple[str, str], list[Round]]


def report(variants: list[str], cells: list[str], results: Results) -> None:
    print("\nreq/s (median), then CPU ms per request (median), errors summed over rounds")
    print(f"{'variant':<14}" + "".join(f"{c:>14}" for c in cells) + "".join(
        f"{'CPU ' + c:>17}" for c in cells) + f"{'errors':>8}")  # fmt: skip
    for v in variants:
        rps = "".join(f"{median(results[v, c], 'rps'):14.0f}" for c in cells)
        cpu = "".join(f"{median(results[v, c], 'cpu_ms'):17.2f}" for c in cells)
        errors = sum(r.errors for c in cells for r in results[v, c])
        print(f"{v:<14}{rps}{cpu}{errors:8d}")
    print("\np99 ms (median)")
    for v in variants:
        print(f"{v:<14}" + "".join(f"{median(results[v, c], 'p99_ms'):14.2f}" for c in cells))

    def ratio(a: str, b: str, cell: str, attr: str) -> float:
        return median(results[a, cell], attr) / median(results[b, cell], attr)

    if "ours" not in variants:
        return
    print("\nbars (issue 22), per cell:")
    for cell in cells:
        parts = []
        if "sync" in variants:
            r = ratio("ours", "sync", cell, "cpu_ms")
            parts.append(f"CPU/req ours/sync {r:.2f}x ({'met' if r <= 1.1 else 'MISSED'} <= 1.1)")
        if "gthread" in variants:
            r = ratio("ours", "gthread", cell, "rps")
            parts.append(f"req/s ours/gthread {r:.2f}x ({'met' if r >= 1.0 else 'MISSED'} >= 1)")
        if "hop" in variants:
            r = ratio("ours", "hop", cell, "rps")
            parts.append(f"req/s ours/hop {r:.2f}x ({'met' if r >= 2.0 else 'MISSED'} >= 2)")
        if parts:
            print(f"  {cell:<11} " + "; ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
