"""One statement through each kind of pool of an alias: the tests' shared way to use a side.

``sync``: the ENGINE's pool (``connections[alias]``, closed afterwards, as at the end
of a request); ``async``: ``session_scope()``; ``async_orm``: the native async ORM's
pool (a cursor of the task's native ``connections[alias]``, in its greenlet). Each
connection goes back to its pool afterwards.
"""

from __future__ import annotations

import asyncio

from django.db import connections
from sqlalchemy import text

from django_asyncpool import session_scope
from django_asyncpool.orm import native as _asyncorm

SIDES = ["sync", "async", "async_orm"]


def run_sql(side: str, alias: str, runner: asyncio.Runner, sql: str = "select 1") -> None:
    """Run ``sql`` once on ``alias`` through ``side``'s pool (``runner`` runs the async ones)."""
    if side == "sync":
        wrapper = connections[alias]
        try:
            with wrapper.cursor() as cursor:
                cursor.execute(sql)
        finally:
            wrapper.close()
    elif side == "async":
        runner.run(scope_sql(alias, sql))
    else:
        runner.run(native_sql(alias, sql))


async def scope_sql(alias: str, sql: str) -> None:
    async with session_scope(using=alias) as session:
        await session.execute(text(sql))


async def native_sql(alias: str, sql: str) -> None:
    """Run ``sql`` on the native async ORM's connection of ``alias`` (on the running loop)."""

    def execute() -> None:
        with connections[alias].cursor() as cursor:
            cursor.execute(sql)

    await _asyncorm.run(alias, execute)
