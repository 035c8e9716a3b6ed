"""``dbpool_check --drain ALIAS``: replace an alias's connections in every process it can reach.

With the breaker state shared through Redis (``OPTIONS["circuit_breaker"]["storage"]``)
the drain is asked for there (:func:`~django_asyncpool.core.breaker_redis.request_drain`):
each process using the alias reads it within its ``storage_refresh`` and replaces its
connections, then says so in Redis; the command waits a little and counts them.
Without it, only the command's own process can be reached, and the output says so
and what to do instead.
"""

from __future__ import annotations

import time
from typing import Any

from ...core import breaker_redis as _shared
from ...core import registry as _registry
from ...errors import named, redact

#: Seconds the command waits for acknowledgements beyond the processes' refresh interval.
MARGIN = 0.5


def drain(alias: str) -> dict[str, Any]:
    """Drain ``alias`` here and, through Redis if shared, everywhere; return the report."""
    conf = _registry.config(alias)
    _registry.guard(alias)  # with shared storage: follows Redis from now on
    report: dict[str, Any] = {
        "alias": alias,
        "target": conf.describe(),
        "shared": False,
        "where": None,
        "drain": None,
        "refresh": conf.breaker.storage_refresh,
        "waited": 0.0,
        "processes": [],
        "error": None,
        "exit_code": 0,
    }
    store = _shared.live(alias) if conf.breaker.storage else None
    secret = store._password if store is not None else ""
    if conf.breaker.storage:
        report["where"] = _shared.where(conf.breaker.storage)
        try:
            asked = _shared.request_drain(alias)
        except Exception as exc:  # Redis down or refusing: said, never raised as a traceback
            report["error"] = f"{named(exc)}: {redact(str(exc).strip(), secret)}"
            report["exit_code"] = 1
            asked = None
        if asked is not None:
            report.update(shared=True, drain=asked[1])
        elif report["error"] is None:  # redis-py refused the URL: logged when the guard was made
            report["error"] = "OPTIONS['circuit_breaker']['storage'] was refused (see the log)"
            report["exit_code"] = 1
    _registry.drain(alias, "dbpool_check --drain")
    if store is not None and report["shared"]:
        wait = 2 * conf.breaker.storage_refresh + conf.breaker.storage_timeout + MARGIN
        time.sleep(wait)
        report["waited"] = round(wait, 2)
        try:
            report["processes"] = _shared.acks(store, report["drain"])
        except Exception as exc:
            report["error"] = f"{named(exc)}: {redact(str(exc).strip(), secret)}"
    return report


def render(report: dict[str, Any]) -> str:
    """Return what the command says about one drain."""
    alias, refresh = report["alias"], report["refresh"]
    head = f"Drain of database {report['target']}:"  # 'alias' (user@host:port/name)
    if report["shared"]:
        n = len(report["processes"])
        lines = [
            f"{head} drain #{report['drain']} asked through Redis at {report['where']}.",
            f"  Every process using {alias!r} replaces its connections within {refresh:g}s "
            "(storage_refresh): the idle ones at once, those in use when they come back.",
            f"  {n} other process{'' if n == 1 else 'es'} confirmed within "
            f"{report['waited']:g}s{': ' + ', '.join(report['processes']) if n else ''}.",
            "  This process's connections are replaced too. A process that has not used the "
            "alias yet has none to replace; one that cannot reach Redis now does it when it "
            "reaches Redis again.",
        ]
        if report["error"]:
            lines.append(f"  Counting them failed: {report['error']}")
        return "\n".join(lines)
    if report["error"]:
        why = (
            f"Redis at {report['where']} cannot be used ({report['error']}): the drain could "
            "not be asked for there."
        )
        what = (
            "run dbpool_check --drain again once Redis answers (every process drains when it "
            "reads the higher number), or restart them."
        )
    else:
        why = (
            "the breaker state is not shared (OPTIONS['circuit_breaker']['storage'] is not "
            "set), so there is no channel to them."
        )
        what = (
            f"restart them (a rolling restart of the servers and workers), or call "
            f"django_asyncpool.drain({alias!r}) in each, or set "
            "OPTIONS['circuit_breaker']['storage'] = 'redis://...' so that dbpool_check "
            "--drain reaches every process."
        )
    return "\n".join(
        [
            f"{head} only this process's connections were replaced.",
            f"  OTHER PROCESSES CANNOT BE REACHED: {why}",
            f"  To replace their connections: {what}",
        ]
    )
