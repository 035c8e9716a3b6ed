"""ASGI lifespan: warm the pools at startup, close them at shutdown.

Django's ``ASGIHandler`` does not speak the ASGI lifespan protocol, so a server
(uvicorn, hypercorn, daphne) cannot tell it that the process is stopping. Wrap
the application in ``asgi.py``::

    from django_asyncpool.asgi import get_asgi_application

    application = get_asgi_application()

or wrap your own stack with ``PoolLifespan(app)``. At startup, aliases with
``OPTIONS["warmup"]`` open an async connection on the server's event loop (a
failure, :class:`~.errors.DatabaseUnavailable` as the sync warm-up's, fails the
startup, so the server exits instead of serving errors); at
shutdown every async pool of this process and every sync pool is closed, so the
server sees clean disconnects instead of broken sockets. Requests go to Django's
handler with its own sync parts in a greenlet on the loop (:mod:`.orm.handler`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from . import config as _config
from .errors import ConfigurationFault, PoolError, unreachable

__all__ = ["PoolLifespan", "close_all", "get_asgi_application", "warm_up_async"]

logger = logging.getLogger("django_asyncpool")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[Mapping[str, Any]]]
Send = Callable[[Mapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def warm_up_async() -> None:
    """Open one async connection of every alias with ``OPTIONS["warmup"]``, on this loop."""
    from django.conf import settings

    from .pool import ConnectionPool

    for alias, settings_dict in settings.DATABASES.items():
        if settings_dict.get("ENGINE") != _config.ENGINE:
            continue
        conf = _config.from_settings(alias, settings_dict)
        if conf.warmup is None:
            continue
        try:
            async with asyncio.timeout(conf.warmup):
                async with ConnectionPool(alias).connection(failover=False) as conn:
                    await conn.execute("select 1")
        except ConfigurationFault:
            raise  # the server's own words: not "could not be reached"
        except (TimeoutError, OSError, PoolError) as exc:
            # As the sync warm-up fails (apps.py): one error type, one message.
            raise unreachable(conf, conf.warmup, exc) from exc


async def close_all() -> None:
    """Close every async pool's engine on this loop, and every sync pool of the process."""
    from .core.registry import close_pools
    from .pool import ConnectionPool

    for pool in list(ConnectionPool._instances.values()):
        try:
            await pool.close()
        except Exception:
            logger.warning("Closing the async pool of %r failed", pool.alias, exc_info=True)
    # psycopg_pool's close() joins its worker threads: not on the event loop.
    await asyncio.to_thread(close_pools)


def freeze_startup_objects() -> None:
    """Keep what the process holds at startup out of the garbage collector's full passes.

    Django, the drivers and the application loaded at startup are objects that live as
    long as the process; a full collection walks all of them each time (70-100 ms per
    pass for a small project). An event loop serving many requests at once keeps their
    objects alive across the young collections, so full passes come often, and each one
    holds the loop: every request of the process waits. ``gc.freeze()`` after one
    collection at startup leaves them out (Python's own advice for long-lived servers);
    ``settings.ASYNCPOOL_GC_FREEZE = False`` turns it off (benchmarks/http_matrix.py).
    """
    from django.conf import settings

    if getattr(settings, "ASYNCPOOL_GC_FREEZE", True):
        gc.collect()
        gc.freeze()


class PoolLifespan:
    """ASGI middleware: handle ``lifespan`` events, pass every other scope to ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await warm_up_async()
                except Exception as exc:
                    logger.error("Startup failed: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                freeze_startup_objects()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await close_all()
                await send({"type": "lifespan.shutdown.complete"})
                return


def get_asgi_application() -> PoolLifespan:
    """Return Django's ASGI application, its sync parts in a greenlet, in :class:`PoolLifespan`.

    The handler is :class:`~django_asyncpool.orm.handler.GreenASGIHandler`: Django's own,
    with no thread for Django's sync request parts (docs/async-orm.md, "The request path").
    """
    import django

    from .orm.handler import GreenASGIHandler

    django.setup(set_prefix=False)  # as django.core.asgi.get_asgi_application()
    return PoolLifespan(GreenASGIHandler())
