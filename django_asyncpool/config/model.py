"""The configuration as objects: frozen, keyword-only, defaults written in their units.

:class:`AliasConfig` is everything django-asyncpool knows about one alias;
:class:`Problem` is one invalid or suspicious setting (:mod:`.rules` names them all).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ENGINE",
    "SYNC_POOL_DEFAULTS",
    "WARMUP_DEFAULT",
    "AliasConfig",
    "AsyncPoolConfig",
    "BreakerConfig",
    "MetricsConfig",
    "Problem",
    "RetryConfig",
]

ENGINE = "django_asyncpool"


@dataclass(frozen=True, kw_only=True, slots=True)
class Problem:
    """One invalid or suspicious setting, with what to do about it."""

    id: str  # "dbpool.E001" ...
    alias: str
    key: str
    message: str
    hint: str


@dataclass(frozen=True, kw_only=True, slots=True)
class AsyncPoolConfig:
    """The SQLAlchemy/asyncpg pool: ``OPTIONS["async_pool"]``."""

    pool_size: int = 10
    max_overflow: int = 5
    recycle: float = 30 * 60.0  # seconds
    timeout: float = 10.0  # seconds to wait for a free connection
    echo: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class BreakerConfig:
    """The circuit breaker: ``OPTIONS["circuit_breaker"]``."""

    fail_max: int = 5  # consecutive connection failures that open it
    reset_timeout: float = 30.0  # seconds open before one trial is let through
    #: redis:// URL where every process keeps this alias's breaker state; "": each its own.
    storage: str = field(default="", repr=False)  # may carry a Redis password
    storage_prefix: str = "django_asyncpool"  # first part of the Redis key names
    storage_timeout: float = 0.25  # seconds a Redis call may take before falling back
    storage_refresh: float = 0.1  # seconds between two reads of the shared state
    #: Count pool timeouts (a full pool: the application's load) as failures too.
    count_pool_timeouts: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryConfig:
    """Retries around getting a connection: ``OPTIONS["retry"]``."""

    max_tries: int = 3
    max_time: float = 10.0  # seconds, all tries together
    base_delay: float = 0.1  # seconds; delays grow 0.1, 0.2, 0.4 ... with full jitter
    max_delay: float = 2.0  # seconds


#: The sync psycopg_pool defaults, used where ``OPTIONS["pool"]`` leaves a key out.
SYNC_POOL_DEFAULTS: dict[str, Any] = {"min_size": 2, "max_size": 10, "timeout": 10.0}


@dataclass(frozen=True, kw_only=True)
class AliasConfig:
    """Everything django-asyncpool needs to know about one database alias."""

    alias: str
    dbname: str
    user: str = ""
    password: str = field(default="", repr=False)
    #: ``OPTIONS["password"]``: asked for the password of each new connection.
    password_source: Callable[[], str] | None = field(default=None, repr=False)
    host: str = ""
    #: A port, or one per host in libpq's comma-separated form (``"5432,5433"``).
    port: int | str | None = None
    #: libpq parameters from OPTIONS (sslmode, application_name, ...).
    params: Mapping[str, Any] = field(default_factory=dict)
    #: psycopg_pool keyword arguments, or None when ``OPTIONS["pool"]`` is False.
    sync_pool: Mapping[str, Any] | None = field(default_factory=lambda: dict(SYNC_POOL_DEFAULTS))
    async_pool: AsyncPoolConfig = AsyncPoolConfig()
    breaker: BreakerConfig = BreakerConfig()
    retry: RetryConfig = RetryConfig()
    #: Seconds a connection may be held before a leak warning; None: off.
    leak_threshold: float | None = None
    #: A connection used less than this many seconds ago is not pinged on checkout.
    liveness_bypass: float = 0.5
    pgbouncer: bool = False
    #: Seconds to open the pools in at start, failing fast otherwise; None: open lazily.
    warmup: float | None = None
    #: Instrument this alias and export its pool metrics (off: no timing on the hot path).
    metrics: bool = True
    #: Aliases that serve this (replica) alias's reads while it is down, in order.
    failover_to: tuple[str, ...] = ()
    #: Run Django's async QuerySet API natively on an async connection (no thread hop).
    async_orm: bool = False
    problems: tuple[Problem, ...] = ()

    def describe(self) -> str:
        """Return ``alias (user@host:port/dbname)``, never the password."""
        if any(problem.id == "dbpool.E006" for problem in self.problems):
            # Nothing of the URL is used: the fields below would name no real server.
            return f"{self.alias!r} (DATABASE_URL cannot be used, dbpool.E006)"
        who = f"{self.user}@" if self.user else ""
        return f"{self.alias!r} ({who}{self._hosts()}/{self.dbname})"

    def _hosts(self) -> str:
        """Return ``host:port``, or each host with its port (``pg1:5432,pg2:5433``)."""
        hosts = self.host.split(",") if self.host else [""]
        ports = str(self.port).split(",") if self.port else [""]
        if len(ports) == 1:
            ports *= len(hosts)
        if len(hosts) != len(ports):  # libpq refuses it; shown as given
            return f"{self.host}:{self.port}"
        return ",".join(
            f"{host.strip() or 'local socket'}{':' + port.strip() if port.strip() else ''}"
            for host, port in zip(hosts, ports, strict=True)
        )


#: Seconds ``OPTIONS["warmup"] = True`` gives the pools to open at start.
WARMUP_DEFAULT = 10.0


@dataclass(frozen=True, kw_only=True, slots=True)
class MetricsConfig:
    """The standalone exporter: ``METRICS_ENABLED`` and ``METRICS_PORT``."""

    enabled: bool = False
    port: int = 9090
    problems: tuple[Problem, ...] = ()
