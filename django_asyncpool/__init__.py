"""django-asyncpool: a resilient, observable PostgreSQL pool for Django.

Use it as a database ENGINE::

    DATABASES = {"default": {"ENGINE": "django_asyncpool", ...}}
"""

from __future__ import annotations

from .config import AliasConfig
from .errors import CircuitOpenError, DatabaseUnavailable, PoolClosed, PoolError, PoolTimeout

__all__ = [
    "AliasConfig",
    "CircuitOpenError",
    "DatabaseUnavailable",
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
]
__version__ = "0.1.0.dev0"
