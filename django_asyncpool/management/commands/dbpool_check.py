"""``manage.py dbpool_check``: is every database reachable through both pools?

Each alias of the ENGINE is probed through its sync pool (in a thread) and its
async pool (``ConnectionPool(alias).connection()`` on an event loop of its own,
in another thread), all at once. Every probe has its own deadline and the
command waits no longer than ``--timeout``: a probe still stuck then (a
blackholed network path) is reported as timed out and left behind in its
daemon thread. Exit status: 0 healthy, 1 an alias is unhealthy, 2 configuration
errors. The JSON schema is documented in docs/command.md.

``--drain ALIAS`` checks nothing: it replaces every connection of the alias, in every
process when the breaker state is shared through Redis, else only in its own, and
says so (:mod:`._drain`).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from ... import config as _config
from ...checks import problems
from ...core import registry as _registry
from ...errors import named, redact
from ...orm import handler as _handler
from . import _drain

SERVER_VERSION = "select current_setting('server_version')"
#: The server's connection slots: max_connections, and those kept for superusers (and,
#: from PostgreSQL 16, for pg_use_reserved_connections: NULL before).
HEADROOM = (
    "select current_setting('max_connections')::int,"
    " current_setting('superuser_reserved_connections')::int,"
    " coalesce(current_setting('reserved_connections', true)::int, 0)"
)


class Command(BaseCommand):
    help = (
        "Connect to every database alias of django-asyncpool through its sync and async "
        "pools; report server version, latency, pool statistics and breaker state. "
        "Exit status: 0 healthy, 1 unhealthy, 2 configuration errors."
    )
    requires_system_checks: list[str] = []  # it reports configuration problems itself

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--database",
            action="append",
            dest="databases",
            metavar="ALIAS",
            help="Check only this alias (repeatable). Default: every alias of the ENGINE.",
        )
        parser.add_argument(
            "--format", choices=("table", "json"), default="table", help="Output format."
        )
        parser.add_argument(
            "--drain",
            action="append",
            dest="drain",
            metavar="ALIAS",
            help="Replace every connection of this alias (repeatable) instead of checking: in "
            "every process when the breaker state is shared through Redis, else only here.",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=10.0,
            metavar="SECONDS",
            help="Give up on probes still running after this long (default: 10).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        timeout: float = options["timeout"]
        if timeout <= 0:
            raise CommandError("--timeout must be a positive number of seconds.", returncode=2)
        ours = [a for a, d in settings.DATABASES.items() if d.get("ENGINE") == _config.ENGINE]
        aliases: list[str] = options["drain"] or options["databases"] or ours
        unknown = [a for a in aliases if a not in ours]
        if unknown:
            raise CommandError(
                f"Not a database alias of ENGINE {_config.ENGINE!r}: {', '.join(unknown)}. "
                f"Use one of: {', '.join(ours) or 'none configured'}.",
                returncode=2,
            )
        if options["drain"]:
            self._drain(aliases, options["format"])
            return
        report = run(aliases, timeout)
        if options["format"] == "json":
            self.stdout.write(json.dumps(report, indent=2))
        else:
            self.stdout.write(render_table(report))
        if report["exit_code"] == 2:
            raise CommandError("configuration errors (see above)", returncode=2)
        if report["exit_code"] == 1:
            bad = [e["alias"] for e in report["aliases"] if not e["healthy"]]
            raise CommandError(f"unhealthy: {', '.join(bad)}", returncode=1)

    def _drain(self, aliases: list[str], output: str) -> None:
        reports = [_drain.drain(alias) for alias in aliases]
        if output == "json":
            self.stdout.write(json.dumps({"drains": reports}, indent=2))
        else:
            self.stdout.write("\n".join(_drain.render(report) for report in reports))
        failed = [r["alias"] for r in reports if r["exit_code"]]
        if failed:
            raise CommandError(
                f"other processes not reached: {', '.join(failed)} (see above)", returncode=1
            )


# -- probes -----------------------------------------------------------------------------


def run(aliases: list[str], timeout: float) -> dict[str, Any]:
    """Probe ``aliases`` through both pools, all at once; return the report (JSON-ready)."""
    started = time.monotonic()
    deadline = started + timeout
    found = problems(aliases=aliases)
    configs = {a: _config.from_settings(a, settings.DATABASES[a]) for a in aliases}
    probes = {
        (alias, side): _Probe(fn, alias, deadline)
        for alias in aliases
        for side, fn in (("sync", _probe_sync), ("async", _probe_async))
    }
    for probe in probes.values():
        probe.join(deadline)
    entries: list[dict[str, Any]] = []
    for alias in aliases:
        conf = configs[alias]
        sides = {side: probes[alias, side].result(conf.password) for side in ("sync", "async")}
        entries.append(
            {
                "alias": alias,
                "target": conf.describe(),
                "healthy": all(side["ok"] for side in sides.values()),
                "breaker": _breaker(alias),
                "failover_to": list(conf.failover_to),
                "budget": _registry.budget(alias, conf),
                **sides,
            }
        )
    probed = {entry["alias"]: entry["healthy"] for entry in entries}
    for entry in entries:
        entry["reads_go_to"] = _reads_go_to(entry["alias"], probed)
    healthy = all(entry["healthy"] for entry in entries)
    exit_code = 2 if found else 0 if healthy else 1
    servers = _servers(entries, configs)
    return {
        "healthy": healthy and not found,
        "exit_code": exit_code,
        "timeout": timeout,
        "elapsed_ms": round((time.monotonic() - started) * 1000, 1),
        "problems": [
            {
                "id": p.id,
                "alias": p.alias,
                "key": p.key,
                "message": redact(p.message, password),
                "hint": redact(p.hint, password),
            }
            for p, password in found
        ],
        "aliases": entries,
        "servers": servers,
        "request_path": _handler.request_path(),
    }


def _servers(entries: list[dict[str, Any]], configs: dict[str, Any]) -> list[dict[str, Any]]:
    """Return, per server, the connections one process of this configuration may open there,
    the server's room for clients, and how many such processes fit.

    A server is its host and port (``max_connections`` is the whole server's); the
    aliases on it add up. Its room is read by the sync probe of one of them.
    """
    servers: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in entries:
        conf = configs[entry["alias"]]
        key = (conf.host or "local socket", str(conf.port or 5432))
        server = servers.setdefault(
            key,
            {
                "server": f"{key[0]}:{key[1]}",
                "aliases": [],
                "per_process": 0,
                "max_connections": None,
                "reserved_connections": None,
            },
        )
        server["aliases"].append(entry["alias"])
        server["per_process"] += entry["budget"]["per_process"]
        probe = entry["sync"]
        if probe["ok"] and server["max_connections"] is None:
            server["max_connections"] = probe["max_connections"]
            server["reserved_connections"] = probe["reserved_connections"]
    for server in servers.values():
        if server["max_connections"] is None:
            server["available"] = server["processes_fit"] = None
            continue
        available = server["max_connections"] - server["reserved_connections"]
        server["available"] = available
        server["processes_fit"] = available // max(server["per_process"], 1)
    return list(servers.values())


class _Probe:
    """One probe running in a daemon thread, so that a stuck one can be left behind."""

    def __init__(
        self, fn: Callable[[str, float], dict[str, Any]], alias: str, deadline: float
    ) -> None:
        self.value: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(fn, alias, deadline), daemon=True, name=f"dbpool_check:{alias}"
        )
        self._thread.start()

    def _run(self, fn: Callable[[str, float], dict[str, Any]], alias: str, deadline: float) -> None:
        try:
            self.value = fn(alias, deadline)
        except BaseException as exc:  # reported, never raised in a thread
            self.error = exc

    def join(self, deadline: float) -> None:
        self._thread.join(max(deadline - time.monotonic(), 0.0))

    def result(self, password: str) -> dict[str, Any]:
        if self.value is not None:
            return {"ok": True, "error": None, **self.value}
        if self.error is None:
            error = "timed out: no answer before --timeout (server hung or network path dead)"
        else:
            text = redact(str(self.error).strip(), password)
            error = f"{named(self.error)}: {text}" if text else named(self.error)
        return {"ok": False, "error": error}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _probe_sync(alias: str, deadline: float) -> dict[str, Any]:
    from django.db import connections

    wrapper = connections[alias]  # this thread's own wrapper; the pool is the process's
    try:
        t0 = time.monotonic()
        wrapper.ensure_connection()
        t1 = time.monotonic()
        with wrapper.cursor() as cursor:
            cursor.execute(SERVER_VERSION)
            t2 = time.monotonic()
            (version,) = cursor.fetchone()
            cursor.execute(HEADROOM)
            max_connections, superuser_reserved, reserved = cursor.fetchone()
    finally:
        wrapper.close()  # back to the pool
    pool = _registry.sync_pools.get(alias)  # None with OPTIONS["pool"] = False
    return {
        "server_version": version,
        "connect_ms": _ms(t1 - t0),
        "query_ms": _ms(t2 - t1),
        "pool": pool.snapshot() if pool is not None else None,
        "max_connections": max_connections,
        "reserved_connections": superuser_reserved + reserved,
    }


def _probe_async(alias: str, deadline: float) -> dict[str, Any]:
    from ...pool import ConnectionPool

    async def probe() -> dict[str, Any]:
        pool = ConnectionPool(alias)
        t0 = time.monotonic()
        async with pool.connection(failover=False) as conn:
            t1 = time.monotonic()
            version = await conn.fetchval(SERVER_VERSION)
            t2 = time.monotonic()
        return {
            "server_version": version,
            "connect_ms": _ms(t1 - t0),
            "query_ms": _ms(t2 - t1),
            "pool": pool.metrics,
        }

    async def bounded() -> dict[str, Any]:
        # Cancelled at the deadline: asyncpg's connect and SQLAlchemy's wait both yield.
        return await asyncio.wait_for(probe(), max(deadline - time.monotonic(), 0.001))

    return asyncio.run(bounded())


def _reads_go_to(alias: str, probed: dict[str, bool]) -> str:
    """Return where reads of ``alias`` go now: itself, or the alias they fail over to.

    An alias probed in this run is healthy when its probes passed; another one
    when its breaker is closed in this process.
    """
    from ...failover import route as _failover

    try:
        members = _failover.chain(alias)
    except Exception:  # the settings are broken beyond what the checks report
        return alias
    for member in members:
        if probed[member] if member in probed else _failover.healthy(member):
            return member
    return alias


def _breaker(alias: str) -> dict[str, Any]:
    from ...core import breaker_redis as _shared

    try:
        guard = _registry.guard(alias)
    except Exception as exc:  # the settings are broken beyond what the checks report
        return {"state": "unknown", "failures": None, "error": named(exc)}
    storage = _shared.snapshot().get(alias) if guard.config.breaker.storage else None
    return {
        "state": guard.state,
        "failures": guard.breaker.fail_counter,
        "storage": storage or {"storage": "local"},
    }


# -- output -----------------------------------------------------------------------------


def _pool_text(pool: dict[str, Any] | None) -> str:
    if pool is None:
        return "no pool (OPTIONS['pool'] = False)"
    return (
        f"size {pool['size']}/{pool['max_size']}, idle {pool['idle']}, "
        f"in use {pool['in_use']}, waiting {pool['waiting']}"
    )


def _budget_lines(report: dict[str, Any]) -> list[str]:
    """Return what each alias may open per process, and what each server has room for."""
    lines = ["", "Connections one process may open (sync max_size + async cap per event loop):"]
    for entry in report["aliases"]:
        b = entry["budget"]
        sync = (
            f"sync max_size {b['sync_max_size']}"
            if b["sync_max_size"] is not None
            else "sync unpooled (one per thread, not counted)"
        )
        lines.append(
            f"  {entry['alias']}: {b['per_process']} = {sync} + async {b['async_cap']} "
            "(pool_size + max_overflow, all async kinds)"
        )
    for server in report["servers"]:
        names = ", ".join(server["aliases"])
        if server["available"] is None:
            lines.append(f"  server {server['server']} ({names}): room unknown (not reachable)")
            continue
        lines.append(
            f"  server {server['server']} ({names}): max_connections {server['max_connections']}"
            f" - {server['reserved_connections']} reserved = {server['available']} for clients;"
            f" {server['per_process']} per process: {server['processes_fit']} processes fit"
        )
        if server["processes_fit"] < 1:
            lines.append(
                f"  WARNING: one process may open {server['per_process']} connections to "
                f"{server['server']}, more than its {server['available']}: lower "
                "OPTIONS['pool']['max_size'] or OPTIONS['async_pool'] (pool_size, "
                "max_overflow), or raise the server's max_connections (or put PgBouncer in "
                "front)."
            )
    return lines


def _request_path_lines(path: dict[str, Any]) -> list[str]:
    """Say where get_asgi_application() runs Django's sync request parts, and the watchdog."""
    if path["greenlet"]:
        where = "in a greenlet on the event loop (every alias has async_orm)"
    else:
        without = ", ".join(path["aliases_without_async_orm"])
        where = f"in a thread, as Django does (no OPTIONS['async_orm'] on: {without})"
    ms = path["loop_blocked_ms"]
    watchdog = (
        f"sync code holding the loop over {ms:g} ms is logged and counted in "
        "db_loop_blocked_total{where}: move what blocks on more than the database to a "
        "thread (docs/async-orm.md, 'The watchdog')"
        if ms
        else "off (ASYNCPOOL_LOOP_BLOCKED_MS = 0)"
    )
    return [f"ASGI request path: Django's sync middleware and signals run {where}",
            f"Loop watchdog: {watchdog}"]  # fmt: skip


def render_table(report: dict[str, Any]) -> str:
    """Return the report as an aligned table, with problems and errors below it."""
    header = ("ALIAS", "POOL", "STATUS", "VERSION", "CONNECT", "QUERY", "BREAKER", "STATS")
    rows: list[tuple[str, ...]] = [header]
    errors: list[str] = []
    for entry in report["aliases"]:
        breaker = entry["breaker"]
        for side in ("sync", "async"):
            r = entry[side]
            if r["ok"]:
                cells = (
                    "ok",
                    str(r["server_version"]),
                    f"{r['connect_ms']:.1f} ms",
                    f"{r['query_ms']:.1f} ms",
                    _pool_text(r["pool"]),
                )
            else:
                cells = ("FAILED", "-", "-", "-", "-")
                errors.append(f"{entry['alias']} ({side}): {r['error']}")
            state = f"{breaker['state']} ({breaker['failures']} failures)"
            rows.append((entry["alias"], side, *cells[:4], state, cells[4]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.extend(_request_path_lines(report["request_path"]))
    for entry in report["aliases"]:
        alias, reads = entry["alias"], entry["reads_go_to"]
        if reads != alias:
            where = f"; reads fail over to {reads!r}"
        else:
            where = "; reads go to itself" if entry["failover_to"] else ""
        lines.append(f"{alias}: {entry['target']}{where}")
        storage = entry["breaker"].get("storage", {})
        if storage.get("storage") == "redis":
            lines.append(
                f"{entry['alias']}: breaker state shared through Redis at {storage['where']}"
                if storage["shared"]
                else f"{entry['alias']}: Redis at {storage['where']} NOT REACHABLE: falling "
                f"back to this process's own breaker state ({storage['errors']} errors)"
            )
    lines += _budget_lines(report)
    if errors:
        lines += ["", "Errors:", *(f"  {e}" for e in errors)]
    if report["problems"]:
        lines += ["", "Configuration problems:"]
        for p in report["problems"]:
            where = f"{p['alias']!r} " if p["alias"] else ""
            lines.append(f"  {p['id']} {where}{p['key']}: {p['message']} {p['hint']}")
    verdict = {0: "healthy", 1: "UNHEALTHY", 2: "CONFIGURATION ERRORS"}[report["exit_code"]]
    lines += ["", f"{verdict} ({report['elapsed_ms']:.0f} ms)"]
    return "\n".join(lines)
