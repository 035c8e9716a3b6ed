"""Writers on the three paths of one alias, each in a thread of its own, until stopped.

``sync``: the sync ORM (``Tag.objects.create``, the connection back to the pool
after each write); ``async``: ``session_scope()`` on its own event loop;
``async_orm``: the native async ORM (``Tag.objects.acreate``) on its own event loop.
Each write inserts a row named ``<path>-<n>`` and is recorded with when it started
and ended and how it failed, so a test can tell which server took each row (by its
name) and how long after a switch each path wrote there.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from django.db import connections
from sqlalchemy import text

from django_asyncpool import session_scope
from testproject.shop.models import Tag

PATHS = ("sync", "async", "async_orm")
#: Seconds between two writes of a path (the machine is shared).
PAUSE = 0.02


@dataclass
class Write:
    name: str
    started: float  # time.monotonic()
    ended: float
    error: BaseException | None = None


@dataclass
class Writer:
    path: str
    alias: str
    writes: list[Write] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    crashed: BaseException | None = None

    def succeeded(self, after: float = 0.0) -> list[Write]:
        return [w for w in self.writes if w.error is None and w.started >= after]

    def errors(self, after: float = 0.0) -> list[BaseException]:
        return [w.error for w in self.writes if w.error is not None and w.started >= after]

    def ended(self, name: str) -> float:
        return next(w.ended for w in self.writes if w.name == name)


class Writers:
    """Start one writer per path on ``alias``; :meth:`stop` joins them."""

    def __init__(self, alias: str, paths: tuple[str, ...] = PATHS) -> None:
        self.by_path = {path: Writer(path, alias) for path in paths}
        self._threads = [
            threading.Thread(target=self._run, args=(w,), name=f"writer-{w.path}", daemon=True)
            for w in self.by_path.values()
        ]
        for thread in self._threads:
            thread.start()

    def __getitem__(self, path: str) -> Writer:
        return self.by_path[path]

    def __iter__(self) -> Any:
        return iter(self.by_path.values())

    def stop(self) -> None:
        for writer in self.by_path.values():
            writer.stop.set()
        for thread in self._threads:
            thread.join(30)
        for writer in self.by_path.values():
            if writer.crashed is not None:
                raise writer.crashed

    def _run(self, writer: Writer) -> None:
        try:
            if writer.path == "sync":
                self._loop(writer, _sync_write)
            else:
                asyncio.run(self._aloop(writer))
        except BaseException as exc:  # reported by stop()
            writer.crashed = exc
        finally:
            connections.close_all()

    @staticmethod
    def _loop(writer: Writer, write: Callable[[str, str], None]) -> None:
        for n in itertools.count():
            if writer.stop.is_set():
                return
            name = f"{writer.path}-{n}"
            started = time.monotonic()
            try:
                write(writer.alias, name)
            except Exception as exc:
                writer.writes.append(Write(name, started, time.monotonic(), exc))
            else:
                writer.writes.append(Write(name, started, time.monotonic()))
            time.sleep(PAUSE)

    @staticmethod
    async def _aloop(writer: Writer) -> None:
        write: Callable[[str, str], Coroutine[Any, Any, None]] = (
            _scope_write if writer.path == "async" else _orm_write
        )
        for n in itertools.count():
            if writer.stop.is_set():
                return
            name = f"{writer.path}-{n}"
            started = time.monotonic()
            try:
                await write(writer.alias, name)
            except Exception as exc:
                writer.writes.append(Write(name, started, time.monotonic(), exc))
            else:
                writer.writes.append(Write(name, started, time.monotonic()))
            await asyncio.sleep(PAUSE)


def _sync_write(alias: str, name: str) -> None:
    try:
        Tag.objects.using(alias).create(name=name)
    finally:
        connections[alias].close()  # back to the pool, as at the end of a request


async def _scope_write(alias: str, name: str) -> None:
    async with session_scope(using=alias) as session:
        await session.execute(text("insert into shop_tag (name) values (:name)"), {"name": name})


async def _orm_write(alias: str, name: str) -> None:
    await Tag.objects.using(alias).acreate(name=name)
