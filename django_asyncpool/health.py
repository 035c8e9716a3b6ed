"""A django-health-check plugin: one check per alias, through both pools.

Install the extra (``pip install django-asyncpool[health]``), add
``"health_check"`` to INSTALLED_APPS and list the checks in the view::

    from health_check.views import HealthCheckView
    from django_asyncpool.health import pool_checks

    urlpatterns = [path("health/", HealthCheckView.as_view(checks=pool_checks()))]

Each check gets an async connection on the request's event loop and a sync one
from the ORM's pool (in a thread), runs ``select 1`` on both, and fails when the
breaker is open. Its messages name the alias and the error class only: health
pages are often public, so no host, user or server message is shown there (the
log has them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
from typing import Any

from health_check.base import HealthCheck
from health_check.exceptions import ServiceUnavailable, ServiceWarning

from .core import registry as _registry
from .errors import named

__all__ = ["PoolCheck", "pool_checks"]

logger = logging.getLogger("django_asyncpool")


@dataclasses.dataclass
class PoolCheck(HealthCheck):  # type: ignore[misc]  # health_check ships no type hints
    """Check one alias of the ENGINE: breaker state, then ``select 1`` through both pools."""

    alias: str = "default"

    # Not a dataclass field (no annotation): django-health-check's own convention.
    timeout = datetime.timedelta(seconds=5)

    async def run(self) -> None:
        from .pool import ConnectionPool

        pool = ConnectionPool(self.alias)
        if pool.metrics["breaker_state"] == "open":
            raise ServiceUnavailable(
                f"database {self.alias!r}: circuit breaker open after repeated connection failures"
            )
        try:
            async with pool.connection(failover=False) as conn:
                await conn.fetchval("select 1")
            await asyncio.to_thread(_select_one, self.alias)
        except Exception as exc:
            logger.warning("Health check of database %r failed: %s", self.alias, exc)
            raise ServiceUnavailable(
                f"database {self.alias!r}: {named(exc)} (see the log)"
            ) from exc
        if pool.metrics["breaker_state"] == "half-open":
            raise ServiceWarning(f"database {self.alias!r}: circuit breaker half-open")


def _select_one(alias: str) -> None:
    from django.db import connections

    wrapper = connections[alias]
    try:
        with wrapper.cursor() as cursor:
            cursor.execute("select 1")
    finally:
        wrapper.close()  # back to the pool; this executor thread keeps no connection


def pool_checks(aliases: list[str] | None = None) -> list[tuple[type[PoolCheck], dict[str, Any]]]:
    """Return ``HealthCheckView`` checks for ``aliases`` (default: every alias of the ENGINE)."""
    if aliases is None:
        aliases = _registry.aliases()
    return [(PoolCheck, {"alias": alias}) for alias in aliases]
