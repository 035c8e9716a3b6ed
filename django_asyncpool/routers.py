"""Database routers that send the ORM's reads past a replica whose breaker is open.

A replica alias with ``OPTIONS["failover_to"]`` fails over on its own for
``session_scope()`` and ``ConnectionPool``; the ORM picks its alias through
``DATABASE_ROUTERS``, so it needs one of these:

* :class:`FailoverRouter`, first in ``DATABASE_ROUTERS``: it asks the routers after
  it, as Django would, and fails the chosen alias over;
* :class:`FailoverMixin`, in front of your own router's class.

Only ``db_for_read`` fails over: ``db_for_write``, ``allow_relation`` and
``allow_migrate`` are your router's, unchanged, and ``QuerySet.using()`` bypasses
routers altogether.
"""

from __future__ import annotations

from typing import Any

from django.db import DEFAULT_DB_ALIAS

from .failover.route import route

__all__ = ["FailoverMixin", "FailoverRouter"]


class FailoverMixin:
    """Fail the alias your router's ``db_for_read`` returns over while it is down.

    ``class Router(FailoverMixin, ReplicaRouter): pass`` and list ``Router``.
    """

    def db_for_read(self, model: type[Any], **hints: Any) -> str | None:
        alias: str | None = super().db_for_read(model, **hints)  # type: ignore[misc]
        return None if alias is None else route(alias)


class FailoverRouter:
    """Put it first in ``DATABASE_ROUTERS``: route reads as the routers after it, failed over."""

    def db_for_read(self, model: type[Any], **hints: Any) -> str | None:
        from django.db import router

        routers = router.routers
        chosen = None
        for other in routers[routers.index(self) + 1 :] if self in routers else routers:
            method = getattr(other, "db_for_read", None)
            if method is not None and not isinstance(other, FailoverRouter):
                chosen = method(model, **hints)
                if chosen:
                    break
        if not chosen:  # Django's own fallback, failed over too
            instance = hints.get("instance")
            chosen = instance._state.db if instance is not None else None
        return route(chosen or DEFAULT_DB_ALIAS)
