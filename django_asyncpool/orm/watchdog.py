"""Run sync code in a greenlet on the event loop, and notice when it holds the loop.

:func:`spawn` is SQLAlchemy's ``greenlet_spawn`` (its ``await_`` works inside) that
also times each slice of sync code between two awaits; :func:`call` times sync code
without I/O run directly on the loop. In a :func:`portal` (a request's middleware and
view) the task's coroutine steps in a greenlet of its own, where both run their code
right there, and each of its slices is timed instead. A slice longer than
``settings.ASYNCPOOL_LOOP_BLOCKED_MS`` (default 20 ms; 0 turns the watchdog off)
held every other request of the loop: it is counted by code location
(``db_loop_blocked_total{where}``) and logged once per location with the stack of
the code that held the loop. While a slice runs, one daemon thread per process
(started at the first slice) looks at it every half threshold and, once it is
over, takes the loop thread's stack: the blocking call itself, not where the code
later awaited. A slice counts when it used that much CPU or was seen asleep in a
blocking call; one the OS merely kept waiting (a busy machine) does not.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
import traceback
import types
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

from greenlet import GreenletExit, getcurrent, greenlet

from ..core import process as _process

__all__ = ["Portal", "blocked", "call", "direct", "idle", "portal", "spawn", "threshold"]

logger = logging.getLogger("django_asyncpool")
T = TypeVar("T")
DEFAULT_MS = 20.0

#: where -> slices that held the loop longer than the threshold (for the metric).
blocked: dict[str, int] = {}
_logged: set[tuple[str, int | None]] = set()
#: loop thread id -> its running slice (see _slice)
_running: dict[int, list[Any]] = {}
_monitor: threading.Thread | None = None
_monitor_lock = threading.Lock()
#: Frames of these files are the machinery, not where the loop was held.
_OURS = (
    os.path.dirname(__file__),
    os.path.dirname(threading.__file__) + os.sep + "asyncio",
    "greenlet",
    os.sep + "sqlalchemy" + os.sep,
)


_STDLIB = os.path.dirname(os.__file__) + os.sep


#: What a :class:`_Green` switches to its driver when its call is done.
_DONE: Any = object()
#: At most this many idle greenlets are kept per thread.
IDLE_KEPT = 64


class _Here(threading.local):
    """Per thread (a greenlet only runs in its own thread): its idle greenlets and
    portals kept for reuse, and its id in /proc (a system call: once per thread)."""

    def __init__(self) -> None:
        self.kept: list[_Green] = []
        self.portals: list[Portal] = []
        self.native_id = threading.get_native_id()


_here = _Here()


class _Green(greenlet):  # type: ignore[misc]
    """A greenlet that SQLAlchemy's ``await_`` accepts, running one call after another.

    Reused, not made per call: a new greenlet starts with an empty frame stack, and
    Python allocates (and frees at its end) fresh memory for the frames of Django's
    deep call stack, which costs more than the switches (benchmarks/bench_async_orm.py).
    Each call runs in its driver's context (:func:`spawn` sets it, and drops it after).
    """

    __sqlalchemy_greenlet_provider__ = True
    #: The function to name when no stack shows the code (None: the call's own).
    where: Any = None
    #: The call's result, or the exception it raised (``failed``); read and cleared by spawn.
    value: Any = None
    failed = False

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        while True:
            try:
                self.value = fn(*args, **kwargs)
                self.failed = False
            except GreenletExit:
                raise  # discarded while suspended in a call: end, as a greenlet of its own would
            except BaseException as exc:
                self.value = exc
                self.failed = True
            fn = args = kwargs = None  # type: ignore[assignment]  # nothing kept while idle
            fn, args, kwargs = self.parent.switch(_DONE)


#: What a :class:`Portal` switches to its driver when its coroutine awaits the loop.
_YIELD: Any = object()


class Portal(_Green):
    """The greenlet a task's coroutine steps in, under :func:`portal`.

    Sync code the coroutine calls through :func:`spawn` or :func:`call` runs right
    here, with no greenlet of its own, and what it awaits (SQLAlchemy's ``await_``)
    the portal's driver awaits for it. Kept for reuse, as :class:`_Green` is.
    """

    #: What the coroutine last yielded to the event loop (a future, or None).
    yielded: Any = None
    #: Calls of :func:`spawn` running right here.
    calls = 0
    #: The native ORM's (``alias -> lease``): connections kept for the rest of the step,
    #: given back when its coroutine awaits the loop or ends.
    leases: dict[str, Any]
    #: ``(alias, wrapper)`` while a native call of this alias runs here, else None.
    showing: tuple[str, Any] | None = None

    def __init__(self, run: Any = None, parent: Any = None) -> None:
        super().__init__(run, parent)
        self.leases = {}

    @property
    def __sqlalchemy_greenlet_provider__(self) -> bool:  # type: ignore[override]
        """Only the sync code of a :func:`spawn` call may await the loop (SQLAlchemy's
        ``await_``, so the native ORM's I/O) here. In the coroutine's own code, as in any
        task, sync ORM code raises Django's ``SynchronousOnlyOperation`` and SQLAlchemy's
        ``MissingGreenlet``, rather than doing I/O right there."""
        return self.calls > 0

    def run(self, step: Callable[[Any], Any], arg: Any) -> None:  # type: ignore[override]
        while True:  # one step of the coroutine: its send() or throw()
            try:
                self.yielded = step(arg)
            except StopIteration as stop:
                self.value, self.failed = stop.value, False
            except GreenletExit:
                raise  # discarded while suspended: end, as a greenlet of its own would
            except BaseException as exc:
                self.value, self.failed = exc, True
            else:
                step, arg = self.parent.switch(_YIELD)
                continue
            step = arg = None  # type: ignore[assignment]  # nothing kept while idle
            step, arg = self.parent.switch(_DONE)


_threshold: float | None = None


def threshold() -> float:
    """Return the watchdog's threshold in seconds (0: off)."""
    global _threshold
    if _threshold is None:  # read once, again after a change (override_settings)
        from django.conf import settings
        from django.core.signals import setting_changed

        setting_changed.connect(_forget, dispatch_uid="django_asyncpool._watchdog")
        _threshold = float(getattr(settings, "ASYNCPOOL_LOOP_BLOCKED_MS", DEFAULT_MS)) / 1e3
    return _threshold


def _forget(*, setting: str, **kwargs: Any) -> None:
    global _threshold
    if setting == "ASYNCPOOL_LOOP_BLOCKED_MS":
        _threshold = None


async def spawn(fn: Callable[..., T], *args: Any, _where: Any = None, **kwargs: Any) -> T:
    """Return ``fn(*args, **kwargs)`` run in a greenlet; what it awaits runs on this loop.

    ``_where``: the function to name when no stack shows the code (default ``fn``).
    In a :func:`portal`, right there.
    """
    driver = getcurrent()
    if type(driver) is Portal:
        return direct(driver, _where or fn, True, fn, *args, **kwargs)
    limit = _limit()
    native_id = _here.native_id
    kept = _here.kept  # after a fork in the call, the parent's: what goes back is lost
    child = _take(kept, _Green, driver)
    child.where = _where
    result = _slice(fn, child, limit, child.switch, (fn, args, kwargs), native_id)
    while result is not _DONE:
        if child.dead:  # the call raised GreenletExit: greenlet returns it, as before
            return result  # type: ignore[no-any-return]
        try:
            value = await result
        except BaseException:
            result = _slice(fn, child, limit, child.throw, sys.exc_info(), native_id)
        else:
            result = _slice(fn, child, limit, child.switch, (value,), native_id)
    return _outcome(child, kept)  # type: ignore[no-any-return]


def _limit() -> float:
    """Return the threshold (0: off), the monitor started if it is on."""
    limit = _threshold
    if limit is None:
        limit = threshold()
    if limit and _monitor is None:
        _start_monitor(limit)
    return limit


def _take(kept: list[Any], kind: type[_Green], driver: greenlet) -> Any:
    """Return an idle greenlet of this thread (one of ``kept``, or a new one of ``kind``)
    to run in ``driver``'s context."""
    if kept:
        child = kept.pop()
        if child.parent is not driver:
            child.parent = driver
    else:
        child = kind(None, driver)
    child.gr_context = driver.gr_context
    return child


def _outcome(child: _Green, kept: list[Any]) -> Any:
    """Return what ``child``'s call returned, or raise what it raised; keep it for the
    next call, without the task's context variables, which an idle greenlet must not
    keep alive."""
    value, failed = child.value, child.failed
    child.value = child.where = child.gr_context = None
    if len(kept) < IDLE_KEPT:
        kept.append(child)
    if failed:
        try:
            raise value
        finally:
            del value  # the traceback holds this frame: no cycle through it
    return value


def direct(
    portal: Portal, where: Any, awaits: bool, fn: Callable[..., T], *args: Any, **kwargs: Any
) -> T:
    """Return ``fn(*args, **kwargs)`` called right here in ``portal``, in its slice: a
    call of :func:`spawn` (``awaits``: its sync code may await the loop) or :func:`call`.

    A call longer than the threshold names the slice (``where``) should no stack show
    the code that held the loop: the monitor looks only every half threshold."""
    started = time.perf_counter()
    portal.calls += awaits
    try:
        return fn(*args, **kwargs)
    finally:
        portal.calls -= awaits
        if time.perf_counter() - started > (_threshold or 0.0):
            portal.where = where


async def portal(coro: Awaitable[T]) -> T:
    """Return ``await coro``, each of its steps run in a greenlet of this task: a portal.

    The sync code it runs through :func:`spawn` (the native ORM's queries, the request
    path's hooks) is then called right there, not in a greenlet of its own, and each
    slice between two awaits of the loop is timed as one of :func:`spawn`'s. Nothing
    changes for the code: a task made inside has no portal, and one inside another is
    the same portal.
    """
    if type(getcurrent()) is Portal:
        return await coro
    return await _drive(coro)  # type: ignore[no-any-return]


@types.coroutine
def _drive(coro: Any) -> Generator[Any, Any, Any]:
    """Step ``coro`` in a :class:`Portal`: pass what it yields to the task and back, and
    await for it what its sync code awaits."""
    limit = _limit()
    native_id = _here.native_id
    kept = _here.portals
    child = _take(kept, Portal, getcurrent())
    where = coro  # named by its stack, else by a call over the threshold or its __name__
    request = _slice(where, child, limit, child.switch, (coro.send, None), native_id)
    while request is not _DONE:
        child.where = None  # named by a call in the next slice only
        if request is _YIELD:
            # The coroutine awaits the loop (a future, or a bare yield): the task does.
            if child.leases:
                _step_ends(child)
            future, child.yielded = child.yielded, None
            try:
                sent = yield future
            except BaseException as exc:
                request = _slice(where, child, limit, child.switch, (coro.throw, exc), native_id)
            else:
                request = _slice(where, child, limit, child.switch, (coro.send, sent), native_id)
        elif child.dead:  # the coroutine raised GreenletExit: greenlet returns it
            if child.leases:
                _step_ends(child)
            return request
        else:
            # Its sync code awaits (SQLAlchemy's await_): the task awaits it for it.
            try:
                value = yield from request.__await__()
            except BaseException:
                request = _slice(where, child, limit, child.throw, sys.exc_info(), native_id)
            else:
                request = _slice(where, child, limit, child.switch, (value,), native_id)
    if child.leases:
        _step_ends(child)
    return _outcome(child, kept)


def _step_ends(portal: Portal) -> None:
    """The portal's coroutine awaits the loop or ends: the connections its step kept go
    back to their pools now (not kept for the task: it awaits something else)."""
    leases = portal.leases
    while leases:
        _, lease = leases.popitem()
        lease.holder.give_back(lease)


def call(fn: Callable[..., T], *args: Any) -> T:
    """Return ``fn(*args)`` run right here on the loop, timed as a slice of :func:`spawn`.

    For sync code that does no I/O at all: no greenlet is needed, only the watchdog (in
    a :func:`portal`, the portal's slice times it).
    """
    driver = getcurrent()
    if type(driver) is Portal:
        return direct(driver, fn, False, fn, *args)
    limit = threshold()
    if not limit:
        return fn(*args)
    if _monitor is None:
        _start_monitor(limit)
    return _slice(fn, None, limit, fn, args, _here.native_id)  # type: ignore[no-any-return]


def idle(wait: Callable[[float], T], timeout: float, fd: int = -1) -> T:
    """Return ``wait(timeout)``: a wait while the loop has nothing else to do, which
    holds nothing up (it ends as soon as anything else is ready) and is not counted.

    The slice in progress (if any) excludes its time, and the monitor does not take
    this wait for a blocking call. In a portal, where a slice may hold many queries
    one after another, a ``poll()`` that only socket ``fd`` ended starts the slice
    over: the loop had nothing else to do until now, so nothing was held up before.
    """
    slot = _running.get(threading.get_ident())
    if slot is None:
        return wait(timeout)
    slot[5] = True
    started = time.perf_counter()
    try:
        events: Any = wait(timeout)
    finally:
        now = time.perf_counter()
        slot[0] += now - started
        slot[5] = False
    if fd >= 0 and slot[7] and len(events) == 1 and events[0][0] == fd:
        # The CPU time it used so far is at most the time it ran (the clock without
        # the waits): subtracted at the end instead of a CPU clock read here.
        slot[8] += now - slot[0]
        slot[0] = now
        slot[1], slot[3], slot[6] = None, False, _collecting[1]
    return events  # type: ignore[no-any-return]


def _slice(
    fn: Callable[..., Any],
    child: greenlet | None,
    limit: float,
    step: Any,
    args: tuple[Any, ...],
    native_id: int,
) -> Any:
    """Run the greenlet until it awaits or ends (``step(*args)``: its switch or throw), timed.

    ``native_id``: this thread's id in /proc (:class:`_Here`)."""
    tid = threading.get_ident()
    # [start, stack, CPU time at start, seen blocked, the thread's id in /proc, in idle(),
    #  the garbage collector's time so far, a portal's, the time it ran before idle()
    #  started it over]
    slot: list[Any] = [
        time.perf_counter(),
        None,
        time.thread_time(),
        False,
        native_id,
        False,
        _collecting[1],
        type(child) is Portal,
        0.0,
    ]
    _running[tid] = slot
    try:
        return step(*args)
    finally:
        del _running[tid]
        held = time.perf_counter() - slot[0]
        # Over the threshold on the clock: the code either ran (CPU time) or waited in a
        # blocking call (the monitor saw the thread asleep). Otherwise the OS ran other
        # processes meanwhile (a busy machine): not the code's doing.
        if limit and held > limit and (slot[3] or time.thread_time() - slot[2] - slot[8] > limit):
            _held(fn, child, slot, held)


def _held(fn: Callable[..., Any], child: greenlet | None, slot: list[Any], held: float) -> None:
    """Count and (once per location) log a slice that held the loop ``held`` seconds."""
    collected = _collecting[1] - slot[6]
    if collected >= held / 2:  # mostly the garbage collector's, not the code's
        blocked[GC] = blocked.get(GC, 0) + 1
        if (GC, 0) not in _logged:
            _logged.add((GC, 0))
            logger.warning(
                "Python's garbage collector held the event loop for %.0f ms of %.0f "
                "(ASYNCPOOL_LOOP_BLOCKED_MS is %.0f): every other request of this process "
                "waited. Logged once; db_loop_blocked_total{where=%r} counts them. A full "
                "collection walks every object the process holds: serve through "
                "django_asyncpool.asgi.PoolLifespan (it freezes what the process holds at "
                "startup, unless ASYNCPOOL_GC_FREEZE is False), or call gc.freeze() once "
                "your application is loaded.",
                collected * 1e3,
                held * 1e3,
                threshold() * 1e3,
                GC,
            )
        return
    stack: traceback.StackSummary | None = slot[1]
    if (
        stack is None and child is not None and child.gr_frame is not None
    ):  # the monitor had not looked yet
        stack = traceback.extract_stack(child.gr_frame)
    frame = _culprit(stack) if stack else None
    if frame is not None:
        where, key = f"{_module(frame.filename)}.{frame.name}", (frame.filename, frame.lineno)
    else:
        fn = getattr(child, "where", None) or fn
        # module.function, as a stack's frame names it: one label for one location,
        # whether the monitor took the stack in time or not.
        where = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__name__', repr(fn))}"
        key = (where, 0)
    blocked[where] = blocked.get(where, 0) + 1
    if key in _logged:
        return
    _logged.add(key)
    shown = "".join(traceback.format_list(stack)) if stack else f"  in {where}\n"
    logger.warning(
        "Code held the event loop for %.0f ms (ASYNCPOOL_LOOP_BLOCKED_MS is %.0f): "
        "every other request of this process waited. Logged once per code location; "
        "db_loop_blocked_total{where=%r} counts them. A call that blocks on anything but "
        "the database (files, HTTP, caches, sleep) must not run on the loop: make it "
        "async, call it with sync_to_async, or take its code out of "
        "settings.ASYNCPOOL_DATABASE_ONLY. Stack:\n%s",
        held * 1e3,
        threshold() * 1e3,
        where,
        shown,
    )


def _culprit(stack: traceback.StackSummary) -> traceback.FrameSummary | None:
    """Return the innermost frame of the application or a library (else of the standard
    library: the socket call is less telling than its caller), not of the machinery."""
    frames = [f for f in stack if not any(part in f.filename for part in _OURS)]
    for frame in reversed(frames):
        if not frame.filename.startswith(_STDLIB) or "site-packages" in frame.filename:
            return frame
    return frames[-1] if frames else None


def _module(filename: str) -> str:
    for path in sorted(sys.path, key=len, reverse=True):
        if path and filename.startswith(path + os.sep):
            return filename[len(path) + 1 :].removesuffix(".py").replace(os.sep, ".")
    return os.path.basename(filename).removesuffix(".py")


#: The ``where`` of the slices the garbage collector held (db_loop_blocked_total).
GC = "garbage collection"
#: [perf_counter() when the running collection started, seconds of every collection so far]
_collecting = [0.0, 0.0]


def _on_collection(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _collecting[0] = time.perf_counter()
    else:
        _collecting[1] += time.perf_counter() - _collecting[0]


def _start_monitor(limit: float) -> None:
    global _monitor
    with _monitor_lock:
        if _on_collection not in gc.callbacks:
            gc.callbacks.append(_on_collection)  # a slice's collections are told apart
        if _monitor is None:
            _monitor = threading.Thread(
                target=_watch, args=(limit,), name="django_asyncpool watchdog", daemon=True
            )
            _monitor.start()


def _watch(limit: float) -> None:
    """Look at every loop thread whose current slice is over the threshold: take its
    stack (once), and note whether it is asleep in a blocking call."""
    while True:
        time.sleep(limit / 2)
        limit = threshold() or limit
        now = time.perf_counter()
        for tid, slot in list(_running.items()):
            if now - slot[0] <= limit:
                continue
            # idle() asked again after the /proc read: a wait in poll() begun meanwhile
            # is asleep too, and is not a blocking call.
            if not slot[3] and not slot[5] and _asleep(slot[4]) and not slot[5]:
                slot[3] = True
            if slot[1] is None:
                frame = sys._current_frames().get(tid)
                if frame is not None and _running.get(tid) is slot:
                    slot[1] = traceback.extract_stack(frame)


#: futex(2) by machine: a thread waiting for the GIL (another thread holds it, or the OS
#: runs another process meanwhile) waits in it; that is not the code blocking.
_FUTEX = {"x86_64": b"202", "aarch64": b"98"}.get(os.uname().machine, b"")


def _asleep(native_id: int) -> bool:
    """Return True if the thread is in a blocking call (state S or D, not for the GIL)."""
    task = f"/proc/self/task/{native_id}/"
    try:
        with open(task + "stat", "rb") as f:
            state = f.read().rpartition(b")")[2][1:2]
        if state not in (b"S", b"D"):
            return False
        with open(task + "syscall", "rb") as f:
            return f.read().split(b" ", 1)[0] != _FUTEX
    except OSError:  # not Linux: count what is over the threshold on the clock alone
        return True


def _after_fork_in_child() -> None:
    global _monitor
    _monitor = None  # the thread is not in the child: start another at its first slice
    _running.clear()
    _here.__init__()  # type: ignore[misc]  # the parent's thread and greenlets: not reused


_process.at_fork("watchdog", _after_fork_in_child)
