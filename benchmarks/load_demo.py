"""HTTP load on the running demo: the same primary-key lookup through five kinds of view.

    python benchmarks/load_demo.py [--url http://127.0.0.1:8000] [--seconds 5] [--rounds 5]
                                   [--concurrency 10] [--client auto|wrk|python]

Without --url it starts the demo itself (scripts/demo.py: uvicorn, one worker, on
DATABASE_URL or the embedded PostgreSQL) on a free port, and stops it afterwards.

Variants, each ``GET .../products/<random sample id>/`` answering the same JSON:

- session_scope: async view, ``session_scope(readonly=True)`` (SQLAlchemy AsyncSession)
- fast_path:     async view, ``ConnectionPool().connection()`` (raw asyncpg)
- aget:          async view, Django's async ORM ``Product.objects.aget()`` (thread hop)
- aget_native:   the same ``aget()`` on the alias with ``OPTIONS["async_orm"]`` on
- sync_orm:      sync view, ``Product.objects.get()``

The client is wrk when installed (``apt-get install -y wrk``), otherwise a small
asyncio HTTP/1.1 keep-alive client. The variants run interleaved, round after round
(each round in a rotated order); printed are the medians over the rounds of
requests/s, p50 and p99 latency, and requests/s relative to ``aget``, with the bars:
session_scope >= 1.0x, fast_path >= 1.3x and aget_native >= 1.4x ``aget``, and
aget_native >= 0.85x session_scope.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "session_scope": "/products/{}/",
    "fast_path": "/fast/products/{}/",
    "aget": "/orm/products/{}/",
    "aget_native": "/orm/native/products/{}/",
    "sync_orm": "/sync/products/{}/",
}
BASELINE = "aget"
#: (variant, compared with, bar on the ratio of their median requests/s)
BARS = [
    ("session_scope", BASELINE, 1.0),
    ("fast_path", BASELINE, 1.3),
    ("aget_native", BASELINE, 1.4),
    ("aget_native", "session_scope", 0.85),
]


@dataclass
class Round:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int = 0
    requests: int = 0
    cpu_ms: float = float("nan")  # the server's CPU time per request


@dataclass
class Results:
    rounds: dict[str, list[Round]] = field(default_factory=dict)

    def add(self, name: str, r: Round) -> None:
        self.rounds.setdefault(name, []).append(r)

    def median(self, name: str, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.rounds[name])


# -- clients -------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def run_wrk(base: str, template: str, ids: list[int], concurrency: int, seconds: float) -> Round:
    """Run wrk against ``template`` with random ids; return its figures."""
    lua = (
        f"local ids = {{{','.join(map(str, ids))}}}\n"
        "request = function()\n"
        f'  return wrk.format("GET", string.format("{template.replace("{}", "%d")}", '
        "ids[math.random(#ids)]))\n"
        "end\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(lua)
        script.flush()
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{concurrency}",
                f"-d{max(1, round(seconds))}s",  # wrk takes whole seconds
                "--latency",
                "-s",
                script.name,
                base,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: .*", out)
    count = int(bad.group(1)) if bad else 0
    if errors:
        count += sum(int(n) for n in re.findall(r"\d+", errors.group(0)))
    return Round(rps, p50, p99, count, requests)


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> None:
    """Read a response body: Content-Length, or chunked (Django sets no length itself)."""
    length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if length:
        await reader.readexactly(int(length.group(1)))
        return
    while True:
        size = int((await reader.readline()).strip(), 16)
        await reader.readexactly(size + 2)  # the chunk and its CRLF
        if size == 0:
            return


async def _python_round(
    host: str, port: int, template: str, ids: list[int], concurrency: int, seconds: float
) -> Round:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors
        rnd = random.Random()
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < deadline:
                path = template.format(rnd.choice(ids))
                started = time.perf_counter()
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                await _read_body(reader, head)
                latencies.append(time.perf_counter() - started)
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return Round(
        len(latencies) / elapsed,
        latencies[len(latencies) // 2] * 1e3,
        latencies[int(len(latencies) * 0.99)] * 1e3,
        errors,
        len(latencies),
    )


def run_python(base: str, template: str, ids: list[int], concurrency: int, seconds: float) -> Round:
    """Run the asyncio keep-alive client against ``template`` with random ids."""
    parts = urlsplit(base)
    return asyncio.run(
        _python_round(
            parts.hostname or "127.0.0.1", parts.port or 80, template, ids, concurrency, seconds
        )
    )


# -- the demo --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_demo() -> tuple[subprocess.Popen[str], str]:
    """Start scripts/demo.py on a free port; return it and its base URL once it serves."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "Press Ctrl-C" in line:
            break
    else:
        sys.exit("The demo did not start:\n" + "".join(seen[-30:]))
    # Keep reading: a full pipe would block the server's logging.
    threading.Thread(target=collections.deque, args=(proc.stdout, 50), daemon=True).start()
    return proc, f"http://127.0.0.1:{port}"


def stop_demo(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def cpu_seconds(pid: int | None) -> float:
    """Return the user + system CPU time of process ``pid`` (all threads), or NaN."""
    if pid is None:
        return float("nan")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def get_json(url: str) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


# -- main ------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running demo (default: start one)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    # 10: the async pool's pool_size (the replica alias's default). Above it, SQLAlchemy
    # closes each overflow connection at check-in, and that churn is what gets measured.
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--client", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--pid", type=int, help="the server's pid, for CPU per request")
    args = parser.parse_args()
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "python"
    run = run_wrk if client == "wrk" else run_python

    proc = None
    base = args.url.rstrip("/") if args.url else None
    pid = args.pid
    if base is None:
        proc, base = start_demo()
        pid = proc.pid
    try:
        ids = [p["id"] for p in get_json(f"{base}/products/?limit=100")["products"]]
        print(
            f"{base}: {len(VARIANTS)} variants, {args.rounds} rounds x {args.seconds:g}s, "
            f"{args.concurrency} connections, client {client}, {len(ids)} product ids, "
            f"{os.cpu_count()} CPUs",
            flush=True,
        )
        for template in VARIANTS.values():  # warm up: connections, code paths
            run(base, template, ids, args.concurrency, 1.0)
        results = Results()
        names = list(VARIANTS)
        for n in range(args.rounds):
            order = names[n % len(names) :] + names[: n % len(names)]
            for name in order:
                cpu = cpu_seconds(pid)
                r = run(base, VARIANTS[name], ids, args.concurrency, args.seconds)
                r.cpu_ms = (cpu_seconds(pid) - cpu) * 1e3 / max(r.requests, 1)
                results.add(name, r)
            figures = "  ".join(f"{k} {results.rounds[k][-1].rps:7.0f}" for k in names)
            print(f"round {n + 1}: requests/s  {figures}", flush=True)
        pools = get_json(f"{base}/pool/")
    finally:
        if proc is not None:
            stop_demo(proc)

    base_rps = results.median(BASELINE, "rps")
    print(
        f"\n{'variant':<14} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
        f"{'CPU ms/req':>10}  req/s vs {BASELINE}"
    )
    for name in names:
        rps = results.median(name, "rps")
        errors = sum(r.errors for r in results.rounds[name])
        print(
            f"{name:<14} {rps:8.0f} {results.median(name, 'p50_ms'):8.2f} "
            f"{results.median(name, 'p99_ms'):8.2f} {errors:7d} "
            f"{results.median(name, 'cpu_ms'):10.2f}  {rps / base_rps:5.2f}x"
        )
    missed = []
    print()
    for name, against, bar in BARS:
        ratio = results.median(name, "rps") / results.median(against, "rps")
        met = ratio >= bar
        print(f"bar {name} / {against} >= {bar:.2f}x: {ratio:.2f}x {'met' if met else 'MISSED'}")
        if not met:
            missed.append(name)
    for alias, stats in pools.items():
        a = stats["async"]
        print(
            f"async pool {alias!r}: created {a['created']}, reused {a['reused']}, "
            f"invalidated {a['invalidated']}, "
            f"timeouts {a['timeouts']}, failures {a['failures']}, breaker {a['breaker_state']}"
        )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
