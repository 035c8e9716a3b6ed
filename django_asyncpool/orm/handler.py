"""Django's ASGI request path without a thread: its own sync parts in a greenlet on the loop.

Django's ``ASGIHandler`` runs every sync part of a request in a thread of its own
(asgiref's ``ThreadSensitiveContext``): the request signals' receivers, each hook of
a ``MiddlewareMixin`` middleware, ``response.close()``. :class:`GreenASGIHandler` runs
those parts instead on the event loop when their only blocking I/O is the database:
Django's own receivers and built-in middleware (:data:`MIDDLEWARE`, :data:`RECEIVERS`),
and what ``settings.ASYNCPOOL_DATABASE_ONLY`` lists. Code that does no I/O at all is
called right there (:func:`.watchdog.call`); code that may query runs in a greenlet
(:func:`.watchdog.spawn`), its queries native: each
alias is a :class:`_Lazy` wrapper there, which takes a connection of the alias's
native pool at its first query and gives it back when the hook returns. Everything
else (your sync middleware, receivers and views, template rendering, exception
middleware) keeps Django's thread path, so the thread is only started when such
code runs. That needs every database alias to have ``OPTIONS["async_orm"]``: else
the handler is Django's own.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from contextvars import ContextVar
from typing import Any

from asgiref.sync import SyncToAsync, iscoroutinefunction, sync_to_async
from django.conf import settings
from django.core import signals
from django.core.handlers import asgi as _django_asgi
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.base import BaseHandler
from django.db import connections
from django.dispatch.dispatcher import NO_RECEIVERS
from django.http.response import HttpResponseBase
from django.utils.deprecation import MiddlewareMixin
from psycopg import pq

from ..config import database_only
from . import native as _asyncorm
from . import pool as _ormpool
from . import watchdog as _watchdog
from .watchdog import portal, spawn

__all__ = ["MIDDLEWARE", "RECEIVERS", "GreenASGIHandler", "GreenMiddleware", "request_path"]

logger = logging.getLogger("django_asyncpool")

_SESSIONS = "django.contrib.sessions.middleware.SessionMiddleware"
_AUTH = "django.contrib.auth.middleware."
#: Django's middleware whose hooks block on nothing but the database, with what they
#: need: "" (no I/O at all: called right on the loop), "db" (the ORM: in a greenlet),
#: "session" (and a session engine that only blocks on the database), "auth" (and
#: Django's own authentication backends).
MIDDLEWARE: dict[str, str] = {
    "django.middleware.security.SecurityMiddleware": "",
    "django.middleware.common.CommonMiddleware": "",
    "django.middleware.clickjacking.XFrameOptionsMiddleware": "",
    "django.middleware.gzip.GZipMiddleware": "",
    "django.middleware.http.ConditionalGetMiddleware": "",
    "django.middleware.locale.LocaleMiddleware": "",
    "django.middleware.csp.ContentSecurityPolicyMiddleware": "",
    "django.middleware.csrf.CsrfViewMiddleware": "session",
    _SESSIONS: "session",
    "django.contrib.messages.middleware.MessageMiddleware": "session",
    _AUTH + "AuthenticationMiddleware": "auth",
    _AUTH + "LoginRequiredMiddleware": "auth",
    "django.contrib.admindocs.middleware.XViewMiddleware": "auth",  # request.user
    "django.contrib.sites.middleware.CurrentSiteMiddleware": "db",
    "django.contrib.redirects.middleware.RedirectFallbackMiddleware": "db",
}
#: Django's receivers of request_started / request_finished. They do I/O only on a
#: connection a thread opened for the request, and then the whole send goes to a thread
#: (_thread_touched): else they are called right on the loop. "caches": every cache
#: of this process is locmem or dummy.
RECEIVERS: dict[str, str] = {
    "django.db.reset_queries": "",
    "django.db.close_old_connections": "",
    "django.core.handlers.base.reset_urlconf": "",
    "django.core.cache.close_caches": "caches",
}
_LOCAL_CACHES = (
    "django.core.cache.backends.locmem.LocMemCache",
    "django.core.cache.backends.dummy.DummyCache",
)
_DB_SESSIONS = (
    "django.contrib.sessions.backends.db",
    "django.contrib.sessions.backends.signed_cookies",
)


def _name(obj: Any) -> str:
    """Return ``obj``'s dotted path (a receiver may be any callable object)."""
    if not hasattr(obj, "__qualname__"):
        obj = type(obj)
    return f"{obj.__module__}.{obj.__qualname__}"


def _caches_local() -> bool:
    return all(c.get("BACKEND") in _LOCAL_CACHES for c in settings.CACHES.values())


def _needs_met(need: str) -> bool:
    if need in ("session", "auth"):
        engine = settings.SESSION_ENGINE
        cached = engine.startswith("django.contrib.sessions.backends.cache")
        if not (engine in _DB_SESSIONS or (cached and _caches_local())):
            return False
    if need == "auth":
        backends = settings.AUTHENTICATION_BACKENDS
        return all(b.startswith("django.contrib.auth.backends.") for b in backends)
    return need != "caches" or _caches_local()


#: How to run a sync hook or receiver: Django's thread, a greenlet, or right on the loop.
THREAD, GREEN, DIRECT = "thread", "green", "direct"


def how(obj: Any, known: dict[str, str]) -> str:
    """Return how to run ``obj`` (a class or function): THREAD, GREEN or DIRECT."""
    name = _name(obj)
    need = known.get(name)
    if need is not None and _needs_met(need):
        return DIRECT if need in ("", "caches") else GREEN
    return GREEN if name in database_only() else THREAD


#: Receivers (as a signal lists them) -> how they run together; forgotten when a setting
#: changes (the settings decide it).
_ways: dict[tuple[Any, ...], str] = {}


def _how_all(receivers: list[Any]) -> str:
    """Return how to run these receivers together: the most careful of their ways."""
    key = tuple(receivers)
    way = _ways.get(key)
    if way is None:
        if not _ways:
            from django.core.signals import setting_changed

            setting_changed.connect(_forget, dispatch_uid="django_asyncpool._handler")
        ways = {how(r, RECEIVERS) for r in receivers}
        way = _ways[key] = THREAD if THREAD in ways else GREEN if GREEN in ways else DIRECT
    return way


def _forget(**kwargs: Any) -> None:
    _ways.clear()


def request_path() -> dict[str, Any]:
    """Return how get_asgi_application() runs Django's sync request parts (dbpool_check)."""
    without = [a for a in connections.settings if not _asyncorm.enabled(a)]
    return {
        "greenlet": not without,
        "aliases_without_async_orm": without,
        "database_only": sorted(database_only()),
        "loop_blocked_ms": _watchdog.threshold() * 1e3,
    }


# -- the database in a greenlet ---------------------------------------------------------


class _Lazy(_ormpool.NativeWrapper):
    """An alias's wrapper in a green call: takes a native connection at its first query."""

    _lease: _ormpool.Lease | None = None
    _holder: _ormpool.Holder

    def ensure_connection(self) -> None:
        if self.connection is None:
            lease = self._holder.checkout()
            self._lease = lease
            _ormpool.bind_twin(self, lease.wrapper._twin)

    def release(self) -> list[Any]:
        """Give the connection back (discarded unless clean); return on_commit callbacks."""
        lease, self._lease = self._lease, None
        hooks, self._pending_hooks = self._pending_hooks, []
        if lease is not None:
            twin = lease.wrapper._twin
            clean = (
                not self._discard
                and not self.in_atomic_block
                and twin._autocommit
                and twin.pgconn.transaction_status == pq.TransactionStatus.IDLE
            )
            if not clean:
                lease.wrapper._discard = True
            self.connection = None
            self._discard = False
            lease.holder.checkin(lease)
        return hooks


#: Holder (one alias on one loop) -> its idle _Lazy wrappers.
_idle: dict[int, list[_Lazy]] = {}


def _take(alias: str) -> _Lazy:
    holder = _ormpool.holder(alias)
    idle = _idle.setdefault(id(holder), [])
    if idle:
        lazy = idle.pop()
        if lazy._holder is holder:
            return lazy
    made = _Lazy(connections.settings[alias], alias)
    made._holder = holder
    made._pending_hooks = []
    made.own_queries_log = made.queries_log
    return made


def _bound(lazies: list[_Lazy], hooks: list[Any], fn: Any, args: tuple[Any, ...]) -> Any:
    """Return ``fn(*args)`` with each of ``lazies`` as ``connections[its alias]``."""
    previous = []
    for lazy in lazies:
        before = _asyncorm.bind(lazy.alias, lazy)
        _asyncorm.share_debugging(lazy, before)
        previous.append(before)
    try:
        return fn(*args)
    finally:
        for lazy, before in zip(lazies, previous, strict=True):
            _asyncorm.unbind(lazy.alias, before)
            hooks.extend(lazy.release())


async def green_call(aliases: list[str], fn: Any, *args: Any) -> Any:
    """Return ``fn(*args)`` run in a greenlet on this loop, its ORM native on ``aliases``."""
    for alias in aliases:
        # Under async_to_sync inside atomic() (Django's test client in a TestCase): the
        # caller's connections, in its transaction, as the native ORM does (_asyncorm).
        callers = _asyncorm.callers(alias)
        if callers is _asyncorm.THREAD:
            return await sync_to_async(fn)(*args)
        if callers is not None:
            return _asyncorm.borrowed_call(alias, callers, fn, args, {})
    lazies = [_take(alias) for alias in aliases]
    hooks: list[Any] = []
    try:
        return await spawn(_bound, lazies, hooks, fn, args, _where=fn)
    finally:
        for lazy in lazies:
            _idle[id(lazy._holder)].append(lazy)
        if hooks:  # on_commit callbacks: the application's code, in a thread as Django does
            await sync_to_async(_asyncorm.run_hooks)(hooks)


def _thread_used() -> bool:
    """Return True if this request ran code in Django's thread (its ThreadSensitiveContext's):
    what that code opened (connections) is closed there, by Django's path."""
    context = SyncToAsync.thread_sensitive_context.get(None)
    return context is not None and context in SyncToAsync.context_to_thread_executor


def _thread_touched() -> bool:
    """Return True if the request signal's receivers must run in Django's thread."""
    return _thread_used() or _thread_connections()


def _thread_connections() -> bool:
    """Return True if this request's context holds a connection a thread opened."""
    local = _asyncorm.local()
    for alias in connections.settings:
        wrapper = getattr(local, alias, None)
        if (
            wrapper is not None
            and wrapper.connection is not None
            and not isinstance(wrapper, _ormpool.NativeWrapper)
        ):
            return True
    return False


# -- the handler ------------------------------------------------------------------------


class _Hook:
    """A middleware's sync ``process_view``/``process_template_response``, not in a thread."""

    def __init__(self, handler: GreenMiddleware, method: Any, way: str) -> None:
        self.handler = handler
        self.method = method
        self.way = way
        self.__self__ = method.__self__  # Django names it in its errors

    async def __call__(self, request: Any, *args: Any) -> Any:
        way = _for_body(request, self.way)
        return await self.handler.run(way, self.method, request, *args)


def _for_body(request: Any, way: str) -> str:
    """Return THREAD for a request whose body Django keeps on disk, else ``way``.

    A hook that reads ``request.POST`` (CSRF's) parses the body: past
    FILE_UPLOAD_MAX_MEMORY_SIZE Django spools it, and writes uploads, to files.
    """
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return THREAD
    return THREAD if length > settings.FILE_UPLOAD_MAX_MEMORY_SIZE else way


class GreenMiddleware(BaseHandler):
    """A handler's middleware hooks not in a thread (for ``ASGIHandler``, Django's test
    ``AsyncClientHandler``): how each runs is decided once, when the chain is built."""

    aliases: list[str]
    green = False

    def load_middleware(self, is_async: bool = False) -> None:
        aliases = list(connections.settings)
        self.aliases = aliases
        self.green = is_async and all(_asyncorm.enabled(alias) for alias in aliases)
        if is_async and not self.green:
            logger.info(
                "django_asyncpool: Django's sync middleware and request signals run in a "
                "thread: the greenlet path needs OPTIONS['async_orm'] on every database."
            )
        super().load_middleware(is_async)
        if not self.green:
            return
        # Django keeps no list of the instances: walk the chain each one wraps.
        node: Any = getattr(self, "_middleware_chain", None)
        while isinstance(mw := getattr(node, "__wrapped__", None), MiddlewareMixin):
            cls = type(mw)
            own = cls.__acall__ is MiddlewareMixin.__acall__
            way = how(cls, MIDDLEWARE)
            if mw.async_mode and own and way != THREAD:
                mw.__acall__ = functools.partial(self._acall, mw, way)  # type: ignore[method-assign]
            node = mw.get_response

    def adapt_method_mode(
        self,
        is_async: bool,
        method: Any,
        method_is_async: bool | None = None,
        debug: bool = False,
        name: str | None = None,
    ) -> Any:
        # process_view / process_template_response of the middleware (name is None).
        owner = getattr(method, "__self__", None)
        if (
            self.green
            and is_async
            and name is None
            and method_is_async is None
            and owner is not None
            and not iscoroutinefunction(method)
            and (way := how(type(owner), MIDDLEWARE)) != THREAD
        ):
            return _Hook(self, method, way)
        return super().adapt_method_mode(is_async, method, method_is_async, debug, name)

    async def run(self, way: str, fn: Any, *args: Any) -> Any:
        """Return ``fn(*args)`` run ``way``: right here, in a greenlet, or in Django's thread."""
        if way == DIRECT:
            return _watchdog.call(fn, *args)
        if way == GREEN:
            return await green_call(self.aliases, fn, *args)
        return await sync_to_async(fn)(*args)

    async def _acall(self, mw: Any, way: str, request: Any) -> Any:
        """``MiddlewareMixin.__acall__``, its hooks run ``way`` instead of in a thread."""
        way = _for_body(request, way)
        response = None
        if hasattr(mw, "process_request"):
            response = await self.run(way, mw.process_request, request)
        response = response or await mw.get_response(request)
        if hasattr(mw, "process_response"):
            response = await self.run(way, mw.process_response, request, response)
        return response


class GreenASGIHandler(GreenMiddleware, ASGIHandler):
    """Django's ``ASGIHandler``, its own sync parts not in a thread (module docstring)."""

    @property
    def sender(self) -> type[ASGIHandler]:
        """The request signals' sender: Django's handler sends its class, so ours sends
        ``ASGIHandler`` (a receiver connected for it fires), a subclass its own."""
        cls = type(self)
        return ASGIHandler if cls is GreenASGIHandler else cls

    async def asend(self, signal: Any, **named: Any) -> None:
        """``signal.asend(sender=ASGIHandler, ...)``, its sync receivers not in a thread."""
        if not (self.green and signal.receivers):
            await signal.asend(sender=self.sender, **named)
            return
        if signal.sender_receivers_cache.get(self.sender) is NO_RECEIVERS:
            return
        sync_receivers, async_receivers = signal._live_receivers(self.sender)
        way = THREAD if _thread_touched() else _how_all(sync_receivers)
        if way == THREAD:
            await signal.asend(sender=self.sender, **named)
            return

        def sync_send() -> None:
            for receiver in sync_receivers:
                receiver(signal=signal, sender=self.sender, **named)

        if not async_receivers:
            await self.run(way, sync_send)
            return
        await asyncio.gather(
            self.run(way, sync_send),
            asyncio.gather(
                *(r(signal=signal, sender=self.sender, **named) for r in async_receivers)
            ),
        )

    async def close_response(self, response: Any) -> None:
        """``response.close()`` (sends request_finished), not in a thread when that is safe."""
        await self.run(self._close_way(response), response.close)

    def _close_way(self, response: Any) -> str:
        if not (
            self.green
            and type(response).close is HttpResponseBase.close
            and not response.streaming  # its closers: the content's, the application's code
            and not _thread_touched()
        ):
            return THREAD
        sync_receivers, async_receivers = signals.request_finished._live_receivers(
            response._handler_class
        )
        # An async receiver of a sync send() needs async_to_sync: not on the loop's thread.
        return THREAD if async_receivers else _how_all(sync_receivers)

    async def run_get_response(self, request: Any) -> Any:
        # The middleware and the view in a portal: their native queries and sync hooks
        # run in the request task's own greenlet, not a greenlet each.
        response: Any = await portal(super().run_get_response(request))
        response._handler_class = self.sender  # request_finished's sender
        return response

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # Django's own handle() (each Django version's), its three sync calls through us.
        token = _serving.set(self)
        try:
            await super().__call__(scope, receive, send)
        finally:
            _serving.reset(token)


# -- Django's handle() with its signals and close() through the handler ------------------
#
# ASGIHandler.handle() calls ``signals.request_started/request_finished.asend(...)`` and
# ``sync_to_async(response.close)()`` by their module's names. Rather than keep a copy of
# handle() per Django version, those names in django.core.handlers.asgi are stand-ins
# that, inside a GreenASGIHandler's request (the context variable), go to its methods,
# and otherwise are Django's own.

_serving: ContextVar[GreenASGIHandler | None] = ContextVar("asyncpool_serving", default=None)


class _Signal:
    """Stands in for a request signal in django.core.handlers.asgi."""

    def __init__(self, signal: Any) -> None:
        self.signal = signal

    def __getattr__(self, name: str) -> Any:
        return getattr(self.signal, name)

    async def asend(self, sender: Any, **named: Any) -> Any:
        handler = _serving.get()
        if handler is None:
            return await self.signal.asend(sender, **named)
        await handler.asend(self.signal, **named)
        return None  # Django's handle() ignores what asend() returns


class _Signals:
    """Stands in for django.core.signals in django.core.handlers.asgi."""

    request_started = _Signal(signals.request_started)
    request_finished = _Signal(signals.request_finished)

    def __getattr__(self, name: str) -> Any:
        return getattr(signals, name)


def _sync_to_async(func: Any, *args: Any, **kwargs: Any) -> Any:
    """Stands in for asgiref's sync_to_async in django.core.handlers.asgi."""
    handler = _serving.get()
    owner = getattr(func, "__self__", None)
    if (
        handler is not None
        and not (args or kwargs)
        and isinstance(owner, HttpResponseBase)
        and getattr(func, "__name__", None) == "close"
    ):
        return functools.partial(handler.close_response, owner)
    return sync_to_async(func, *args, **kwargs)


def _install() -> None:
    module: Any = _django_asgi
    if not isinstance(module.signals, _Signals):
        module.signals = _Signals()
        module.sync_to_async = _sync_to_async


_install()
