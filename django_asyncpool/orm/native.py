"""Django's async QuerySet API, native on the event loop: ``OPTIONS["async_orm"] = True``.

Django's ``aget()`` & co. run the sync method in a thread (``sync_to_async``).
For an alias with ``async_orm`` on, the same sync method runs instead in a
greenlet on the loop (:func:`run`): ``connections[alias]`` resolves there to a
:class:`~django_asyncpool.orm.pool.NativeWrapper` whose connection awaits its
I/O, so Django's compiler, converters, ``from_db()``, signals and transactions
run unchanged and only the waiting is async.

What would not be right on the loop falls back to Django's thread path, decided
before anything is done and counted (``db_async_orm_fallbacks_total``): models
with signal receivers (the application's sync code, which may block or be
async) unless ``settings.ASYNCPOOL_DATABASE_ONLY`` lists them, and reads that turn
out to touch an alias without ``async_orm`` (run again in the thread; writes are
never run twice). Related managers' async methods are native too: their classes
are made per relation by Django's factories, which :func:`install` wraps.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from itertools import islice
from threading import get_ident
from typing import Any, TypeVar

from asgiref import local as _asgiref_local
from asgiref.sync import AsyncToSync, sync_to_async
from django.core.exceptions import SynchronousOnlyOperation
from django.db import DEFAULT_DB_ALIAS, connections, models, router, transaction
from django.db.models import Model, signals
from django.db.models import query as _query
from django.db.transaction import TransactionManagementError
from greenlet import getcurrent

from ..config import ENGINE, database_only
from ..core import process as _process
from ..core import registry as _registry
from . import pool as _ormpool
from .watchdog import Portal, direct
from .watchdog import spawn as greenlet_spawn  # timed: the loop-blocking watchdog

__all__ = [
    "THREAD",
    "atomic",
    "bind",
    "borrowed_call",
    "callers",
    "enabled",
    "install",
    "local",
    "run",
    "run_hooks",
    "share_debugging",
    "unbind",
]

logger = logging.getLogger("django_asyncpool")
T = TypeVar("T")


# Django keeps each thread's DatabaseWrappers in an asgiref Local that, on a thread
# running an event loop, is a context variable: each task sees its own. A native call
# puts its wrapper there for the alias, in the task's context (the greenlet shares
# it), so Django's code finds it as ``connections[alias]`` with nothing patched on
# the sync path. An atomic block keeps it there for the whole block.
_MISSING: Any = object()


class _OtherAlias(BaseException):
    """A native read reached an alias it has no connection of: run it in a thread instead."""


_OTHER = "it reads a database without async_orm (run again in a thread)"


_handler: Any = connections  # its _connections: Django's per-thread (per-task) wrappers


def _local() -> Any:
    return _handler._connections


def _current(alias: str) -> Any:
    return getattr(_local(), alias, _MISSING)


# -- the task's wrappers without asgiref's layers (every native query reads and writes them) --
#
# On a thread running a loop, Django's Local(thread_critical=True) keeps this thread's
# _CVar, whose ContextVar holds a _Storage: the thread it belongs to and a dict copied
# on every write. The hot path reads and writes that ContextVar as asgiref does, with
# neither its four calls per access nor the AttributeError it raises for a missing
# alias. With any other layout of asgiref, the hot path goes through the Local.
_Storage: Any = getattr(_asgiref_local, "_Storage", None)


def _layout_known() -> bool:
    cvar = getattr(_asgiref_local, "_CVar", None)
    return (
        _Storage is not None
        and getattr(_Storage, "__slots__", None) == ("thread_id", "data")
        and type(_local()).__name__ == "_ThreadCriticalLocal"
        and "_get_storage" in vars(type(_local()))
        and cvar is not None
        and "_storage" in vars(cvar)
    )


_FAST = _layout_known()


if _FAST:

    class _PortalCVar(_asgiref_local._CVar):
        """The loop thread's storage of ``connections``: in a native call of a
        :class:`~.watchdog.Portal`, the portal's connection of the call's alias.

        A portal keeps its connection of an alias from one native call to the next of
        the same step (:func:`_portal_op`); Django finds it as ``connections[alias]``
        only while such a call runs. Anywhere else, the task's own, as before: the
        view's code between two queries, and the tasks it starts, see nothing of it.
        """

        def __getattr__(self, key: str) -> Any:
            here = getcurrent()
            if type(here) is Portal:
                showing = here.showing
                if showing is not None and showing[0] == key:
                    return showing[1]
            return super().__getattr__(key)  # type: ignore[no-untyped-call]

    def _install() -> Any:
        """Make this loop thread's storage of ``connections`` a :class:`_PortalCVar`."""
        storage = _handler._connections._storage  # the Local's threading.local
        cvar = _PortalCVar()
        old = getattr(storage, "cvar", None)
        if old is not None:
            object.__setattr__(cvar, "_data", old._data)  # the same context variable
        storage.cvar = cvar
        return cvar


def _task_wrappers(alias: str) -> tuple[Any, Any]:
    """Return this loop thread's ContextVar of wrappers (None: use the Local) and this
    task's ``connections[alias]`` wrapper, or _MISSING."""
    if not _FAST:
        return None, _current(alias)
    cvar = getattr(_handler._connections._storage, "cvar", None)
    if type(cvar) is not _PortalCVar:
        cvar = _install()  # the thread's first access in async code, or asgiref's own
    var = cvar._data
    storage = var.get(None)
    if storage is None or storage.thread_id != get_ident():
        return var, _MISSING  # none, or another thread's: asgiref's Local sees none either
    return var, storage.data.get(alias, _MISSING)


def _put(var: Any, alias: str, wrapper: Any) -> Any:
    """Make ``wrapper`` (_MISSING: none) this task's ``connections[alias]``.

    Return what undoes it in :func:`_restore` (``var``: from :func:`_task_wrappers`).
    """
    if var is None:
        _unbind(alias, wrapper)  # through the Local: wrapper there, or none
        return None
    ident = get_ident()
    storage = var.get(None)
    data = storage.data.copy() if storage is not None and storage.thread_id == ident else {}
    if wrapper is not _MISSING:
        data[alias] = wrapper
    elif data.pop(alias, _MISSING) is _MISSING:
        raise AttributeError(f"no connection {alias!r} to unbind")  # as asgiref's delattr
    storage = _Storage(ident, data)
    return storage, var.set(storage)


def _restore(var: Any, alias: str, previous: Any, undo: Any) -> None:
    """Make ``previous`` this task's ``connections[alias]`` again, after :func:`_put`."""
    if undo is not None and var.get(None) is undo[0]:
        var.reset(undo[1])  # nothing else changed meanwhile: the storage from before
    else:
        _put(var, alias, previous)


def _bind(alias: str, wrapper: Any) -> Any:
    """Make ``wrapper`` this task's ``connections[alias]``; return what was there."""
    previous = getattr(_local(), alias, _MISSING)
    setattr(_local(), alias, wrapper)
    return previous


def _unbind(alias: str, previous: Any) -> None:
    if previous is _MISSING:
        delattr(_local(), alias)
    else:
        setattr(_local(), alias, previous)


def _pinned(alias: str) -> Any:
    """Return the wrapper of this task's open atomic block on ``alias``, or None."""
    wrapper = getattr(_local(), alias, None)
    return wrapper if isinstance(wrapper, _ormpool.NativeWrapper) else None


def enabled(alias: str) -> bool:
    """Return True when ``alias`` has ``OPTIONS["async_orm"] = True`` (ENGINE django_asyncpool)."""
    # Read each time (three dict lookups): tests and override_settings change it in place.
    settings_dict = connections.settings.get(alias)
    if settings_dict is None:
        return False  # Django's own method raises its error
    return (
        settings_dict.get("ENGINE") == ENGINE
        and (settings_dict.get("OPTIONS") or {}).get("async_orm") is True
        and settings_dict.get("AUTOCOMMIT", True) is not False
    )


# -- running a sync ORM call natively ------------------------------------------------------


def _check_owner(wrapper: Any, alias: str) -> None:
    if wrapper._owner is not asyncio.current_task():
        raise TransactionManagementError(
            f"Database {alias!r} is in a django_asyncpool.atomic() block of another task: a "
            "transaction's connection belongs to the task that opened it, and a task made "
            "inside the block (asyncio.create_task, gather) cannot use it. Await the work in "
            "the task that opened the block, or open atomic() in the new task outside it."
        )


async def run(alias: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Return ``fn(*args, **kwargs)`` run in a greenlet with a native connection of ``alias``.

    ``_retryable=True`` (a read): if it reaches an alias without a native connection,
    raise :class:`_OtherAlias` so that the caller runs it again in a thread.
    """
    retryable = kwargs.pop("_retryable", False)
    hooks: list[Any] = []
    try:
        var, current = _task_wrappers(alias)
        if isinstance(current, _ormpool.NativeWrapper):
            pinned = current  # an open atomic block's
            _check_owner(pinned, alias)
            try:
                return await greenlet_spawn(fn, *args, **kwargs)
            finally:
                hooks, pinned._pending_hooks = pinned._pending_hooks, []
        callers = _callers(alias)
        if callers is not None:
            return _borrowed_call(alias, callers, fn, args, kwargs)
        portal = getcurrent()
        try:
            if type(portal) is Portal and var is not None:
                # Right here, on the portal's connection: no greenlet, checkout or binding.
                op = (portal, alias, current, hooks, fn, args, kwargs)
                result: T = direct(portal, fn, True, _portal_op, *op)
                return result
            holder = _ormpool.holder(alias)
            return await greenlet_spawn(_op, holder, alias, var, current, hooks, fn, args, kwargs)
        except SynchronousOnlyOperation as exc:
            # Another alias's own (thread) wrapper refused to do I/O on the loop: before any.
            if retryable:
                raise _OtherAlias(str(exc)) from exc
            raise
    finally:
        if hooks:
            await sync_to_async(_run_hooks)(hooks)


def _portal_op(
    portal: Portal,
    alias: str,
    own: Any,
    hooks: list[Any],
    fn: Callable[..., T],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> T:
    """Run ``fn`` on ``portal``'s connection of ``alias``: taken at the step's first native
    call, kept for the next ones, given back when the step ends (``Portal.leases``).

    It is ``connections[alias]`` only while ``fn`` runs (:class:`_PortalCVar`), as a
    call's own connection is elsewhere (:func:`_op`), without a checkout and a binding
    in the task's context per call. Given back right after the call when anyone waits
    for one, as a task's kept one is (Holder.checkin).
    """
    lease = portal.leases.get(alias)
    if lease is not None and not lease.holder.keeps(lease):
        _let_go(portal, alias)
        lease = None
    if lease is None:
        lease = _ormpool.holder(alias).checkout()
        portal.leases[alias] = lease
    wrapper = lease.wrapper
    _share_debugging(wrapper, own)
    portal.showing = (alias, wrapper)
    try:
        return fn(*args, **kwargs)
    finally:
        portal.showing = None
        if wrapper._pending_hooks:
            hooks.extend(wrapper._pending_hooks)
            wrapper._pending_hooks = []
        if not wrapper.clean() or lease.holder.pool.slots.budget.queue:
            _let_go(portal, alias)  # discarded or reset, or the oldest waiter has it now


def _let_go(portal: Portal, alias: str) -> None:
    """Give back ``portal``'s connection of ``alias``, if it keeps one."""
    lease = portal.leases.pop(alias, None)
    if lease is not None:
        lease.holder.checkin(lease)


def _let_go_here(alias: str) -> None:
    """Give back this portal's connection of ``alias`` (if any) before a checkout of the
    task's own: the checkout takes it again, as a task's kept one (Holder.checkin)."""
    portal = getcurrent()
    if type(portal) is Portal and portal.leases:
        _let_go(portal, alias)


def _op(
    holder: _ormpool.Holder,
    alias: str,
    var: Any,
    previous: Any,
    hooks: list[Any],
    fn: Callable[..., T],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> T:
    """Run ``fn`` on a pooled connection bound as ``connections[alias]`` (``var``:
    :func:`_task_wrappers`; ``previous`` is what is there now: the greenlet starts at once, in
    the caller's context)."""
    lease = holder.checkout()
    wrapper = lease.wrapper
    undo = _put(var, alias, wrapper)
    _share_debugging(wrapper, previous)
    try:
        return fn(*args, **kwargs)
    finally:
        _restore(var, alias, previous, undo)
        hooks.extend(wrapper._pending_hooks)
        holder.checkin(lease)


def _share_debugging(wrapper: Any, own: Any) -> None:
    """Let the task's own wrapper see the queries: execute_wrapper(), DEBUG, assertNumQueries."""
    if own is _MISSING:
        wrapper.execute_wrappers = []
        wrapper.queries_log = wrapper.own_queries_log
        wrapper.force_debug_cursor = False
        return
    wrapper.execute_wrappers = own.execute_wrappers
    wrapper.queries_log = own.queries_log
    wrapper.force_debug_cursor = own.force_debug_cursor


def _bound_call(alias: str, wrapper: Any, fn: Callable[..., T], *args: Any) -> T:
    previous = _bind(alias, wrapper)
    try:
        return fn(*args)
    finally:
        _unbind(alias, previous)


_hooks_logger = logging.getLogger("django.db.backends.base")


def _run_hooks(hooks: list[Any]) -> None:
    """Run on_commit callbacks as Django does after a commit."""
    for _, func, robust in hooks:
        if robust:
            try:
                func()
            except Exception as e:
                _hooks_logger.error(
                    f"Error calling {func.__qualname__} in on_commit() during transaction (%s).",
                    e,
                    exc_info=True,
                )
        else:
            func()


# -- the caller's transaction: async_to_sync() inside atomic() in a thread ----------------
#
# Under async_to_sync, Django's sync_to_async(thread_sensitive=True) goes back to the
# blocked caller thread (AsyncToSync.executors.current), so its queries run in that
# thread's transaction. A pooled connection would not see the transaction's rows, would
# wait on its locks, and would commit outside it. So when the caller's connection is in
# a transaction, the call runs on that very connection: on the loop thread when the loop
# is the private one async_to_sync made for that thread (it serves nothing else, and the
# owner is blocked until the call returns), else in the caller's thread, as Django does.

_THREAD: Any = object()
_CALLERS = "the caller's transaction (async_to_sync in a thread inside atomic())"

#: Native calls run on the caller's connection (its transaction), by alias.
borrowed: dict[str, int] = {}


def _callers(alias: str) -> Any:
    """Return None, the blocked caller thread's wrappers (``alias``'s in a transaction), or
    ``_THREAD`` (the call must run in that thread)."""
    # The common case costs a set's truth test: no sync connection in a transaction (the
    # lookup in asgiref's Local below raises and catches an AttributeError). The
    # WeakSet's own set: its len() is Python code; a dead entry only costs the lookup.
    if not _process.transactions.data:  # type: ignore[attr-defined]
        return None
    executor = getattr(AsyncToSync.executors, "current", None)
    if executor is None:
        return None
    thread = executor._work_thread
    ident = thread.ident
    found: dict[str, Any] = {}
    every: list[Any] = list(_process.wrappers)  # Django's wrappers have _thread_ident
    for wrapper in every:
        if (
            wrapper._thread_ident == ident
            and not isinstance(wrapper, _ormpool.NativeWrapper)
            and (wrapper.in_atomic_block or not (wrapper.connection is None or wrapper.autocommit))
        ):
            # Two of one alias in a transaction (a stale one?): only Django's path knows.
            found[wrapper.alias] = _THREAD if wrapper.alias in found else wrapper
    own = found.get(alias)
    if own is None or own is _THREAD:
        return own  # None: autocommit there, and a pooled connection does the same
    loop_executor = AsyncToSync.loop_thread_executors.get(asyncio.get_running_loop())
    if loop_executor is None or loop_executor._work_thread is not thread:
        return _THREAD  # a loop that serves others too: no blocking I/O on it
    return [wrapper for wrapper in found.values() if wrapper is not _THREAD]


def _borrowed_call(
    alias: str,
    wrappers: list[Any],
    fn: Callable[..., T],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> T:
    """Return ``fn(*args, **kwargs)`` run here on the blocked caller thread's connections."""
    borrowed[alias] = borrowed.get(alias, 0) + 1
    loop = asyncio.get_running_loop()
    # Django's async_unsafe refuses I/O in a thread with a running loop. This loop is
    # the caller's own (see _callers), and nothing else runs on it until fn returns.
    # Without it, connections[...] is this thread's sync (thread-local) storage, which
    # nothing else uses meanwhile: the caller's wrappers go there, as in its thread.
    asyncio._set_running_loop(None)
    try:
        previous = [(wrapper, _bind(wrapper.alias, wrapper)) for wrapper in wrappers]
        for wrapper in wrappers:
            wrapper.inc_thread_sharing()  # its owner thread waits for this call to return
        try:
            return fn(*args, **kwargs)
        finally:
            for wrapper, before in reversed(previous):
                wrapper.dec_thread_sharing()
                _unbind(wrapper.alias, before)
    finally:
        asyncio._set_running_loop(loop)


# -- deciding: native, or Django's thread path -----------------------------------------------

_INIT = (signals.pre_init, signals.post_init)
_SAVE = (signals.pre_save, signals.post_save, *_INIT)
_DELETE = (signals.pre_delete, signals.post_delete, signals.m2m_changed, *_INIT)


def _receivers(sigs: tuple[Any, ...], model: Any = None) -> bool:
    """Return True if any of ``sigs`` has receivers (for ``model``, or for any sender) that
    are not listed in ``settings.ASYNCPOOL_DATABASE_ONLY``."""
    for sig in sigs:  # a loop, not any(): every native read asks
        if sig.receivers and (model is None or sig.has_listeners(model)) and _unlisted(sig, model):
            return True
    return False


#: Django's own receivers that do no I/O at all (a process-local cache entry dropped).
_HARMLESS = frozenset({"django.contrib.sites.models.clear_site_cache"})


def _unlisted(sig: Any, model: Any) -> bool:
    """Return True if a receiver of ``sig`` (for ``model``, or any) may block on more than
    the database: an async one (Django's send() would need async_to_sync, which cannot
    run on the loop's thread) or a sync one not listed as database-only."""
    listed = database_only() | _HARMLESS
    if model is not None:
        sync, asynchronous = sig._live_receivers(model)
    else:
        sync, asynchronous = [], []
        # Django 5.2: (key, receiver, is_async); 6.x: (key, receiver, sender_ref, is_async).
        for entry in list(sig.receivers):
            receiver = entry[1]
            if isinstance(receiver, weakref.ReferenceType):
                receiver = receiver()
            if receiver is not None:
                (asynchronous if entry[-1] else sync).append(receiver)
    return bool(asynchronous) or any(_dotted(receiver) not in listed for receiver in sync)


def _dotted(obj: Any) -> str:
    """Return ``module.qualname`` of a function or a bound method (its function's)."""
    obj = getattr(obj, "__func__", obj)
    if not hasattr(obj, "__qualname__"):
        obj = type(obj)  # a callable instance: its class
    return f"{obj.__module__}.{obj.__qualname__}"


def _fallback(alias: str, method: str, reason: str) -> None:
    stats = _registry.stats(alias, _ormpool.SIDE)
    stats.fallbacks[method] = stats.fallbacks.get(method, 0) + 1
    logger.debug("async ORM: %s() on %r runs in a thread: %s", method, alias, reason)


def _native(alias: str, method: str, why_not: Callable[..., str | None], *args: Any) -> bool:
    """Return True to run ``method`` natively on ``alias``; count it when it falls back
    (``why_not(*args)`` says why it cannot)."""
    if not enabled(alias):
        return False
    # why_not() and _callers() only read: asked first, as the task's wrapper costs a
    # lookup in asgiref's Local (an AttributeError raised and caught when it has none).
    reason = why_not(*args)
    if reason is None and _callers(alias) is _THREAD:
        reason = _CALLERS
    if reason is not None:
        if _pinned(alias) is not None:
            return True  # in a transaction: the thread path would run outside it
        _fallback(alias, method, reason)
        return False
    return True


def _read_reason(qs: Any, instances: bool) -> str | None:
    if instances and _receivers(_INIT, qs.model):
        return f"{qs.model.__name__} has pre_init/post_init receivers"
    if instances and qs.query.select_related and _receivers(_INIT):
        return "pre_init/post_init receivers (select_related)"
    return None


def _model_reads(qs: Any) -> bool:
    return qs._iterable_class is _query.ModelIterable or bool(qs._prefetch_related_lookups)


def _write_alias(qs: Any) -> str:
    return str(qs._db or router.db_for_write(qs.model, **qs._hints))


#: QuerySet async method -> (sync method, writes?, signals whose receivers mean the thread).
_QUERYSET: dict[str, tuple[str, bool, tuple[Any, ...] | None]] = {
    "aget": ("get", False, _INIT),
    "afirst": ("first", False, _INIT),
    "alast": ("last", False, _INIT),
    "aearliest": ("earliest", False, _INIT),
    "alatest": ("latest", False, _INIT),
    "ain_bulk": ("in_bulk", False, _INIT),
    "aexists": ("exists", False, None),
    "acount": ("count", False, None),
    "acontains": ("contains", False, None),
    "aaggregate": ("aggregate", False, None),
    "aexplain": ("explain", False, None),
    "acreate": ("create", True, _SAVE),
    "aget_or_create": ("get_or_create", True, _SAVE),
    "aupdate_or_create": ("update_or_create", True, _SAVE),
    "abulk_create": ("bulk_create", True, None),
    "abulk_update": ("bulk_update", True, None),
    "aupdate": ("update", True, None),
    "adelete": ("delete", True, _DELETE),
}


def _queryset_method(name: str, sync: str, writes: bool, sigs: tuple[Any, ...] | None) -> Any:
    original = getattr(_query.QuerySet, name)

    def why_not(qs: Any) -> str | None:
        if sigs is None:
            return None
        for sig in sigs:  # every native call asks: nobody listens, nothing more to ask
            if sig.receivers:
                break
        else:
            return None
        if sigs is _DELETE:
            return "delete signal receivers" if _receivers(sigs) else None
        if writes:
            found = _receivers(sigs, qs.model)
            return f"{qs.model.__name__} has signal receivers" if found else None
        return _read_reason(qs, _model_reads(qs))

    @functools.wraps(original)
    async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        alias = _write_alias(self) if writes else self.db
        if _native(alias, name, why_not, self):
            if writes:
                return await run(alias, getattr(self, sync), *args, **kwargs)
            try:
                return await run(alias, getattr(self, sync), *args, _retryable=True, **kwargs)
            except _OtherAlias:
                _fallback(alias, name, _OTHER)
        return await original(self, *args, **kwargs)

    return method


def _queryset_aiter(self: Any) -> AsyncIterator[Any]:
    alias = self.db
    if not _native(alias, "__aiter__", lambda: _read_reason(self, _model_reads(self))):
        return _ORIGINALS["__aiter__"](self)  # type: ignore[no-any-return]

    async def generator() -> AsyncIterator[Any]:
        done = self._result_cache is not None and (
            self._prefetch_done or not self._prefetch_related_lookups
        )
        try:
            if not done:  # no connection for a queryset evaluated already
                await run(alias, self._fetch_all, _retryable=True)
        except _OtherAlias:
            _fallback(alias, "__aiter__", _OTHER)
            await sync_to_async(self._fetch_all)()
        for item in self._result_cache:
            yield item

    return generator()


def _raw_aiter(self: Any) -> AsyncIterator[Any]:
    """``async for`` over ``Model.objects.raw(...)``."""
    alias = self.db
    method = "RawQuerySet.__aiter__"
    reason = f"{self.model.__name__} has pre_init/post_init receivers"
    if not _native(alias, method, lambda: reason if _receivers(_INIT, self.model) else None):
        return _ORIGINALS[method](self)  # type: ignore[no-any-return]

    async def generator() -> AsyncIterator[Any]:
        try:
            if self._result_cache is None or (
                self._prefetch_related_lookups and not self._prefetch_done
            ):  # no connection for a raw query evaluated already
                await run(alias, self._fetch_all, _retryable=True)
        except _OtherAlias:
            _fallback(alias, method, _OTHER)
            await sync_to_async(self._fetch_all)()
        for item in self._result_cache:
            yield item

    return generator()


def _next_slice(gen: Iterator[Any], size: int) -> list[Any]:
    return list(islice(gen, size))


async def _iterable_async_generator(self: Any) -> AsyncIterator[Any]:
    qs = self.queryset
    alias = qs.db
    native = _native(alias, "aiterator", lambda: _read_reason(qs, _model_reads(qs)))
    if native and _pinned(alias) is None and _callers(alias) is not None:
        _fallback(alias, "aiterator", _CALLERS)  # a server-side cursor: Django's path
        native = False
    if not native:
        async for item in _ORIGINALS["_async_generator"](self):
            yield item
        return
    # One connection for the whole iteration: a server-side cursor lives on it.
    wrapper = _pinned(alias)
    lease = None
    if wrapper is not None:
        _check_owner(wrapper, alias)
    else:
        holder = _ormpool.holder(alias)
        _let_go_here(alias)
        lease = await greenlet_spawn(holder.checkout)
        wrapper = lease.wrapper
        _share_debugging(wrapper, _current(alias))
    sync_generator = self.__iter__()
    try:
        while True:
            chunk = await greenlet_spawn(
                _bound_call, alias, wrapper, _next_slice, sync_generator, self.chunk_size
            )
            for item in chunk:
                yield item
            if len(chunk) < self.chunk_size:
                break
    finally:
        try:
            await greenlet_spawn(_bound_call, alias, wrapper, sync_generator.close)
        finally:
            if lease is not None:
                lease.holder.checkin(lease)


# -- Model methods --------------------------------------------------------------------------


async def _asave(self: Any, *args: Any, **kwargs: Any) -> None:
    model = type(self)
    alias = kwargs.get("using") or router.db_for_write(model, instance=self)

    if args:
        parse = getattr(self, "_parse_save_params", None)
        if parse is None:  # Django 6: no positional arguments, its own TypeError
            return await _ORIGINALS["asave"](self, *args, **kwargs)  # type: ignore[no-any-return]
        # Parsed here, not in Django's asave(): its deprecation warning (stacklevel=3)
        # then names the caller's line, not this module's.
        given = {name: kwargs.pop(name, default) for name, default in _SAVE_DEFAULTS}
        kwargs.update(zip(given, parse(*args, method_name="asave", **given), strict=True))
        alias = kwargs["using"] or router.db_for_write(model, instance=self)

    def why_not() -> str | None:
        return f"{model.__name__} has signal receivers" if _receivers(_SAVE, model) else None

    if _native(alias, "asave", why_not):
        return await run(alias, self.save, **kwargs)
    return await _ORIGINALS["asave"](self, **kwargs)  # type: ignore[no-any-return]


#: Model.save()'s keyword arguments and their defaults, in its positional order.
_SAVE_DEFAULTS = (
    ("force_insert", False),
    ("force_update", False),
    ("using", None),
    ("update_fields", None),
)


async def _adelete(self: Any, using: str | None = None, keep_parents: bool = False) -> Any:
    alias = using or router.db_for_write(type(self), instance=self)
    reason = "delete signal receivers"
    if _native(alias, "adelete", lambda: reason if _receivers(_DELETE) else None):
        return await run(alias, self.delete, using=using, keep_parents=keep_parents)
    return await _ORIGINALS["adelete"](self, using=using, keep_parents=keep_parents)


async def _arefresh_from_db(
    self: Any, using: str | None = None, fields: Any = None, from_queryset: Any = None
) -> None:
    model = type(self)
    if from_queryset is None:
        alias = model._base_manager.db_manager(using, hints={"instance": self}).db
    else:
        alias = (from_queryset.using(using) if using is not None else from_queryset).db
    reason = f"{model.__name__} has pre_init/post_init receivers"
    kwargs = {"using": using, "fields": fields, "from_queryset": from_queryset}
    if _native(alias, "arefresh_from_db", lambda: reason if _receivers(_INIT, model) else None):
        try:
            return await run(alias, self.refresh_from_db, _retryable=True, **kwargs)
        except _OtherAlias:
            _fallback(alias, "arefresh_from_db", _OTHER)
    return await _ORIGINALS["arefresh_from_db"](self, **kwargs)  # type: ignore[no-any-return]


async def _aprefetch_related_objects(model_instances: Any, *related_lookups: Any) -> None:
    dbs = {obj._state.db for obj in model_instances}
    alias = dbs.pop() if len(dbs) == 1 else None
    if alias is not None and _native(
        alias,
        "aprefetch_related_objects",
        lambda: "pre_init/post_init receivers" if _receivers(_INIT) else None,
    ):
        try:
            return await run(
                alias,
                _query.prefetch_related_objects,
                model_instances,
                *related_lookups,
                _retryable=True,
            )
        except _OtherAlias:
            _fallback(alias, "aprefetch_related_objects", _OTHER)
    return await _ORIGINALS["aprefetch_related_objects"](  # type: ignore[no-any-return]
        model_instances, *related_lookups
    )


# -- related managers: reverse foreign keys, many-to-many, generic relations ------------------

#: A related manager's async method -> its sync method (Django's runs that in a thread).
_RELATED = {
    "aadd": "add",
    "aremove": "remove",
    "aclear": "clear",
    "aset": "set",
    "acreate": "create",
    "aget_or_create": "get_or_create",
    "aupdate_or_create": "update_or_create",
}
#: Those that may delete rows (a many-to-many's through rows, a generic relation's objects):
#: a cascade reaches other models, so any delete receiver means the thread path.
_RELATED_DELETES = frozenset({"aremove", "aclear", "aset"})
_MODEL_SIGNALS = (*_SAVE, signals.pre_delete, signals.post_delete, signals.m2m_changed)


def _manager_alias(manager: Any) -> tuple[str, bool]:
    """Return the alias of ``manager``'s call, and whether its parts may go to others.

    Django picks the write alias per part (the model's, the through model's, the
    instance's class's) and reads there: all must be one alias with a native connection.
    """
    instance = manager.instance
    through = getattr(manager, "through", None)
    alias = str(router.db_for_write(manager.model, instance=instance))
    found = {router.db_for_write(m, instance=instance) for m in (type(instance), through) if m}
    if manager._db:
        found.add(manager._db)
    return alias, bool(found - {alias})


def _related_reason(manager: Any, name: str) -> str | None:
    for model in (manager.model, getattr(manager, "through", None)):
        if model is not None and _receivers(_MODEL_SIGNALS, model):
            return f"{model.__name__} has signal receivers"
    if name in _RELATED_DELETES and _receivers(_DELETE):
        return "delete signal receivers"
    return None


def _related_method(name: str, sync: str, original: Callable[..., Any]) -> Any:
    @functools.wraps(original)
    async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        alias, spread = _manager_alias(self)

        def why_not() -> str | None:
            if spread:
                return "the router sends its parts to other databases"
            return _related_reason(self, name)

        if _native(alias, name, why_not):
            return await run(alias, getattr(self, sync), *args, **kwargs)
        return await original(self, *args, **kwargs)

    return method


def _natively(factory: Callable[..., Any]) -> Callable[..., Any]:
    """Return ``factory`` (Django's, making a related manager class) whose classes have
    native async methods."""

    @functools.wraps(factory)
    def make(*args: Any, **kwargs: Any) -> Any:
        cls = factory(*args, **kwargs)
        for name, sync in _RELATED.items():
            original = cls.__dict__.get(name)
            if original is not None:
                setattr(cls, name, _related_method(name, sync, original))
        return cls

    return make


def _install_related() -> None:
    """Patch the factories of related manager classes (the classes are made on first use)."""
    from django.db.models.fields import related_descriptors

    for name in ("create_reverse_many_to_one_manager", "create_forward_many_to_many_manager"):
        _ORIGINALS[name] = getattr(related_descriptors, name)
        setattr(related_descriptors, name, _natively(_ORIGINALS[name]))


def _install_generic() -> None:
    """Patch generic relations' manager factory, once its module is imported.

    Not imported here: that needs the app registry ready and contenttypes installed.
    Models with a GenericRelation import it before apps.ready(), which installs again.
    """
    name = "create_generic_related_manager"
    fields = sys.modules.get("django.contrib.contenttypes.fields")
    if fields is not None and name not in _ORIGINALS:
        _ORIGINALS[name] = getattr(fields, name)
        setattr(fields, name, _natively(_ORIGINALS[name]))


# -- installing ---------------------------------------------------------------------------

_ORIGINALS: dict[str, Callable[..., Any]] = {}


def install() -> None:
    """Patch Django's async ORM methods (once): native for aliases with ``async_orm`` on.

    For every other alias each patched method is Django's own, after one settings lookup.
    """
    _install_generic()
    if "asave" in _ORIGINALS:
        return
    _install_related()
    qs_cls = _query.QuerySet
    for name, (sync, writes, sigs) in _QUERYSET.items():
        _ORIGINALS[name] = getattr(qs_cls, name)
        setattr(qs_cls, name, _queryset_method(name, sync, writes, sigs))
    _ORIGINALS["__aiter__"] = qs_cls.__aiter__
    qs_cls.__aiter__ = _queryset_aiter  # type: ignore[method-assign]
    _ORIGINALS["RawQuerySet.__aiter__"] = _query.RawQuerySet.__aiter__
    _query.RawQuerySet.__aiter__ = _raw_aiter  # type: ignore[method-assign]
    iterable: Any = _query.BaseIterable
    _ORIGINALS["_async_generator"] = iterable._async_generator
    iterable._async_generator = _iterable_async_generator
    for name, method in (
        ("asave", _asave),
        ("adelete", _adelete),
        ("arefresh_from_db", _arefresh_from_db),
    ):
        _ORIGINALS[name] = getattr(Model, name)
        functools.update_wrapper(method, _ORIGINALS[name])
        setattr(Model, name, method)
    _ORIGINALS["aprefetch_related_objects"] = _query.aprefetch_related_objects
    functools.update_wrapper(_aprefetch_related_objects, _query.aprefetch_related_objects)
    # Both names: Django's aiterator() calls the first, applications import the second
    # (a reference taken before the app is ready stays Django's own).
    _query.aprefetch_related_objects = _aprefetch_related_objects
    models.aprefetch_related_objects = _aprefetch_related_objects


# -- transactions -----------------------------------------------------------------------------


class _AsyncAtomic:
    """``async with atomic(using=...)``: Django's ``Atomic`` on the task's own connection."""

    def __init__(self, using: str | None, savepoint: bool, durable: bool) -> None:
        self.using = using
        self.savepoint = savepoint
        self.durable = durable

    async def __aenter__(self) -> None:
        alias = self.using or DEFAULT_DB_ALIAS
        if not enabled(alias):
            from django.core.exceptions import ImproperlyConfigured

            raise ImproperlyConfigured(
                f"django_asyncpool.atomic(using={alias!r}) needs OPTIONS['async_orm'] = True "
                f"on database {alias!r}. Turn it on, or run the transaction in a thread: "
                "sync_to_async(a function decorated with transaction.atomic)."
            )
        self._alias = alias
        self._lease: _ormpool.Lease | None = None
        wrapper = _pinned(alias)
        if wrapper is not None:
            _check_owner(wrapper, alias)  # nested: a savepoint on the task's connection
        else:
            holder = _ormpool.holder(alias)
            _let_go_here(alias)
            lease = await greenlet_spawn(holder.checkout)
            wrapper = lease.wrapper
            wrapper._owner = asyncio.current_task()
            self._lease = lease
            self._previous = _bind(alias, wrapper)
            _share_debugging(wrapper, self._previous)
        self._wrapper = wrapper
        self._atomic = transaction.Atomic(alias, self.savepoint, self.durable)
        try:
            await greenlet_spawn(self._atomic.__enter__)
        except BaseException:
            await self._release()
            raise

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            await greenlet_spawn(self._atomic.__exit__, exc_type, exc, tb)
        finally:
            hooks = self._wrapper._pending_hooks
            self._wrapper._pending_hooks = []
            await self._release()
            if hooks:
                await sync_to_async(_run_hooks)(hooks)

    async def _release(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            _unbind(self._alias, self._previous)
            lease.wrapper._owner = None
            lease.holder.checkin(lease)

    def __call__(self, func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        async def inner(*args: Any, **kwargs: Any) -> Any:
            async with _AsyncAtomic(self.using, self.savepoint, self.durable):
                return await func(*args, **kwargs)

        return inner


def atomic(using: Any = None, savepoint: bool = True, durable: bool = False) -> Any:
    """Return an async context manager (or decorator): a transaction on the native path.

    As Django's ``transaction.atomic``: nesting makes savepoints, an exception rolls
    back, ``transaction.on_commit`` callbacks run after the commit. The connection is
    the task's for the whole block: queries in it run natively on that connection, and
    another task (or a thread) using it gets a clear error.
    """
    if callable(using):
        return _AsyncAtomic(DEFAULT_DB_ALIAS, savepoint, durable)(using)
    return _AsyncAtomic(using, savepoint, durable)


# -- for the request path (_handler): a greenlet of a request binds and borrows the same way

bind = _bind
unbind = _unbind
share_debugging = _share_debugging
local = _local
callers = _callers
borrowed_call = _borrowed_call
run_hooks = _run_hooks
THREAD = _THREAD
