"""Every async test of test_native.py twice: in a plain task, and in a portal.

A request of the package's ASGI application runs its view in a portal (the task's own
greenlet, ``watchdog.portal``), where native calls run right there instead of in a
greenlet each: the same behaviour is asserted both ways.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import pytest

from django_asyncpool.orm.watchdog import portal


@pytest.fixture(autouse=True)
def in_portal(request: pytest.FixtureRequest) -> bool:
    """True when the test's coroutine runs in a portal (see pytest_collection_modifyitems)."""
    return bool(getattr(request, "param", False))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.module.__name__.endswith(".test_native") and inspect.iscoroutinefunction(
        metafunc.function
    ):
        metafunc.parametrize("in_portal", [False, True], ids=["task", "portal"], indirect=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("in_portal"):
            item.obj = _in_portal(item.obj)  # type: ignore[attr-defined]


def _in_portal(test: Any) -> Any:
    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> Any:
        return await portal(test(*args, **kwargs))

    return run
