"""django-asyncpool: a resilient, observable PostgreSQL pool for Django.

Use it as a database ENGINE::

    DATABASES = {"default": {"ENGINE": "django_asyncpool", ...}}

and, in async views, ``async with session_scope() as session: ...``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import AliasConfig
from .core import registry as _registry
from .errors import (
    AsyncConnectionLost,
    CircuitOpenError,
    ConfigurationFault,
    ConnectionLost,
    DatabaseUnavailable,
    PoolClosed,
    PoolError,
    PoolTimeout,
    ReadOnlyError,
)
from .pool import ConnectionPool, drain, session_scope

__all__ = [
    "AliasConfig",
    "AsyncConnectionLost",
    "CircuitOpenError",
    "ConfigurationFault",
    "ConnectionLost",
    "ConnectionPool",
    "DatabaseUnavailable",
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
    "ReadOnlyError",
    "atomic",
    "drain",
    "session_scope",
]
__version__ = "0.1.0.dev0"

if TYPE_CHECKING:
    from .orm.native import atomic


def __getattr__(name: str) -> Any:
    # The native async ORM imports Django's models: not when settings import the package.
    if name == "atomic":
        from .orm.native import atomic

        return atomic
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _install_async_orm(wrapper: Any) -> None:
    """Make Django's async QuerySet methods native when an alias asks (once).

    Called for each DatabaseWrapper built (``_registry.on_wrapper``): so it works with
    the ENGINE alone, and the ENGINE never imports the async ORM, which subclasses it.
    """
    if (wrapper.settings_dict.get("OPTIONS") or {}).get("async_orm") is True:
        from .orm.native import install

        install()


_registry.on_wrapper.append(_install_async_orm)
