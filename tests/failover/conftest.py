"""Fixtures of the failover tests: throwaway servers (see :mod:`.servers`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .servers import Servers


@pytest.fixture
def servers() -> Iterator[Servers]:
    """Make servers with ``servers.primary(name)`` and ``servers.standby(primary, name)``.

    All of them are stopped and deleted, with their folder, after the test.
    """
    made = Servers()
    try:
        yield made
    finally:
        made.destroy()
