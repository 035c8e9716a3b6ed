"""Configuration: ``DATABASES[alias]`` plus the environment, read into frozen objects.

Precedence, highest first: ``DATABASES[alias]["OPTIONS"]`` -> the environment
variables of the usage guide -> the defaults written below. Nothing is read at
import time: :func:`load` reads ``settings.DATABASES`` when it is called, so
``override_settings`` reaches it.

Invalid values never stop :func:`load`: the default is used and a
:class:`Problem` is recorded. The system checks turn problems into errors when
DEBUG is off and warnings when it is on.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from importlib.util import find_spec
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

__all__ = [
    "AliasConfig",
    "AsyncPoolConfig",
    "BreakerConfig",
    "InvalidURL",
    "MetricsConfig",
    "Problem",
    "RetryConfig",
    "database_only",
    "from_settings",
    "load",
    "load_metrics",
    "parse_url",
    "psycopg_keys",
    "psycopg_params",
]

ENGINE = "django_asyncpool"

#: Django's own OPTIONS keys for the postgresql backend (not libpq parameters).
DJANGO_OPTIONS = frozenset(
    {
        "pool",
        "isolation_level",
        "assume_role",
        "server_side_binding",
        "prepare_threshold",
        "cursor_factory",
        "context",
        "service",
        "passfile",
    }
)


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
        where = self.host or "local socket"
        port = f":{self.port}" if self.port else ""
        who = f"{self.user}@" if self.user else ""
        return f"{self.alias!r} ({who}{where}{port}/{self.dbname})"


# -- parsing ------------------------------------------------------------------------------

#: Our OPTIONS sections (and flags), removed before the rest goes to psycopg.
#: AliasConfig's defaults for the top-level OPTIONS keys (``flag()`` reads them here).
_TOP_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in fields(AliasConfig) if not isinstance(f.default, type(MISSING))
}

SECTIONS: dict[str, type] = {
    "async_pool": AsyncPoolConfig,
    "circuit_breaker": BreakerConfig,
    "retry": RetryConfig,
}
FLAGS = frozenset(
    {
        "async_orm",
        "failover_to",
        "leak_threshold",
        "liveness_bypass",
        "metrics",
        "pgbouncer",
        "warmup",
    }
)
OUR_KEYS = frozenset(SECTIONS) | FLAGS

#: Environment variables of the usage guide that fill ``async_pool``.
ENV_ASYNC = {
    "DB_POOL_SIZE": "pool_size",
    "DB_MAX_OVERFLOW": "max_overflow",
    "DB_POOL_RECYCLE": "recycle",
    "DB_POOL_TIMEOUT": "timeout",
    "SQL_ECHO": "echo",
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

# What each numeric knob may be: (kind, smallest allowed value, inclusive?)
_BOUNDS: dict[str, tuple[type, float, bool]] = {
    "pool_size": (int, 1, True),
    "max_overflow": (int, 0, True),
    "recycle": (float, 0, False),
    "timeout": (float, 0, False),
    "fail_max": (int, 1, True),
    "reset_timeout": (float, 0, False),
    "storage_timeout": (float, 0, False),
    "storage_refresh": (float, 0, False),
    "max_tries": (int, 1, True),
    "max_time": (float, 0, False),
    "base_delay": (float, 0, False),
    "max_delay": (float, 0, False),
    "leak_threshold": (float, 0, False),
    "liveness_bypass": (float, 0, True),
    "min_size": (int, 0, True),
    "max_size": (int, 1, True),
    "max_waiting": (int, 0, True),
    "max_lifetime": (float, 0, False),
    "max_idle": (float, 0, False),
    "reconnect_timeout": (float, 0, False),
    "num_workers": (int, 1, True),
    "warmup": (float, 0, False),
    "METRICS_PORT": (int, 1, True),
}
#: Seconds ``OPTIONS["warmup"] = True`` gives the pools to open at start.
WARMUP_DEFAULT = 10.0


class Reader:
    """Coerce and validate values, collecting problems instead of raising."""

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.problems: list[Problem] = []

    def problem(self, id: str, key: str, message: str, hint: str) -> None:
        self.problems.append(Problem(id=id, alias=self.alias, key=key, message=message, hint=hint))

    def value(self, key: str, name: str, raw: Any, default: Any) -> Any:
        """Return ``raw`` coerced to the type of ``default``, or ``default`` if invalid."""
        if isinstance(default, bool):
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
                return raw.strip().lower() in _TRUE
            self.problem(
                "dbpool.E002",
                key,
                f"{key} must be true or false, got {raw!r}.",
                "Use True/False (or true/false in the environment).",
            )
            return default
        if isinstance(default, str):
            if isinstance(raw, str):
                return raw
            self.problem(
                "dbpool.E002",
                key,
                f"{key} must be a string, got {type(raw).__name__}.",
                f"Set {key} to a string (default: {default!r}).",
            )
            return default
        kind, low, inclusive = _BOUNDS.get(name, (type(default), float("-inf"), True))
        try:
            if isinstance(raw, bool) or (kind is int and isinstance(raw, float)):
                raise ValueError
            number = kind(raw)
        except (TypeError, ValueError):
            word = "a whole number" if kind is int else "a number of seconds"
            self.problem(
                "dbpool.E002",
                key,
                f"{key} must be {word}, got {raw!r}.",
                f"Set {key} to {word} (default: {default}).",
            )
            return default
        if number < low or (number == low and not inclusive):
            bound = f">= {low:g}" if inclusive else f"> {low:g}"
            self.problem(
                "dbpool.E003",
                key,
                f"{key} must be {bound}, got {raw!r}.",
                f"Set {key} {bound} (default: {default}).",
            )
            return default
        return number

    def section(self, cls: type, name: str, given: Any, env: Mapping[str, Any]) -> Any:
        """Build the dataclass ``cls`` from OPTIONS[name] over ``env`` over defaults."""
        defaults = cls()
        if given is None:
            given = {}
        if not isinstance(given, Mapping):
            self.problem(
                "dbpool.E001",
                f"OPTIONS[{name!r}]",
                f"OPTIONS[{name!r}] must be a dict, got {type(given).__name__}.",
                f"Write OPTIONS[{name!r}] as a dict of its keys, or leave it out.",
            )
            given = {}
        known = {f.name for f in fields(cls)}
        for key in sorted(set(given) - known):
            self.problem(
                "dbpool.E004",
                f"OPTIONS[{name!r}][{key!r}]",
                f"Unknown key {key!r} in OPTIONS[{name!r}]: it is ignored.",
                f"Use one of {', '.join(sorted(known))}.",
            )
        values = {}
        for f in fields(cls):
            if f.name in given:
                values[f.name] = self.value(
                    f"OPTIONS[{name!r}][{f.name!r}]",
                    f.name,
                    given[f.name],
                    getattr(defaults, f.name),
                )
            elif f.name in env:
                var, raw = env[f.name]
                values[f.name] = self.value(var, f.name, raw, getattr(defaults, f.name))
        return cls(**values)


@functools.cache
def _sync_pool_keys() -> frozenset[str]:
    from psycopg_pool import ConnectionPool

    params = inspect.signature(ConnectionPool.__init__).parameters
    # These are set by the ENGINE itself.
    return frozenset(params) - {"self", "conninfo", "kwargs", "open", "configure", "check"}


@functools.cache
def _psycopg_pool_defaults() -> dict[str, Any]:
    from psycopg_pool import ConnectionPool

    params = inspect.signature(ConnectionPool.__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


@functools.cache
def _libpq_keys() -> frozenset[str]:
    from psycopg import pq

    return frozenset(d.keyword.decode() for d in pq.Conninfo.get_defaults())


#: Keys Django's get_connection_params() adds itself (not user OPTIONS).
_DRIVER_KEYS = frozenset(
    {
        "dbname",
        "user",
        "password",
        "host",
        "port",
        "client_encoding",
        "cursor_factory",
        "context",
        "prepare_threshold",
        "service",
        "passfile",
    }
)


@functools.cache
def psycopg_keys() -> frozenset[str]:
    """Return the connection parameters that go to psycopg: libpq's and Django's own."""
    return (_libpq_keys() - OUR_KEYS - DJANGO_OPTIONS) | _DRIVER_KEYS


def psycopg_params(params: dict[str, Any]) -> dict[str, Any]:
    """Drop from Django's connection parameters (in place) what psycopg must not get:
    django-asyncpool's OPTIONS, and unknown keys (reported by :func:`from_settings`)."""
    passed = psycopg_keys()
    # One pass, on every connect: 0.44 us for Django's ten keys, one of ours among them,
    # against 0.82 us for a subset test and then a set difference.
    for key in [key for key in params if key not in passed]:
        del params[key]
    return params


#: DATABASE_URL's schemes. The driver after ``+`` (asyncpg, psycopg, ...) is not used:
#: the sync side always connects with psycopg, the async side with asyncpg.
URL_SCHEMES = ("postgresql", "postgres")
#: libpq's sslmode values, also what asyncpg (and so SQLAlchemy's URLs) takes as ``ssl=``.
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
URL_FORM = "postgresql://USER:PASSWORD@HOST:PORT/NAME"
#: libpq's connect() keywords -> Django's settings keys.
_URL_FIELDS = {"dbname": "NAME", "user": "USER", "password": "PASSWORD", "host": "HOST"}


class InvalidURL(ImproperlyConfigured):
    """DATABASE_URL cannot be used; the message says why and how to write it, never the password."""

    def __init__(self, why: str, hint: str = "") -> None:
        self.why = why
        self.hint = hint or (
            f"Write it as {URL_FORM}, or postgresql://USER@/NAME?host=/socket/dir for a "
            "unix socket (postgres://, postgresql+asyncpg:// and postgresql+psycopg:// "
            "work too); percent-encode @ / : % in the user or password (%40 %2F %3A %25)."
        )
        super().__init__(f"DATABASE_URL {why} {self.hint}")


def parse_url(url: str) -> dict[str, Any]:
    """Return Django's connection fields (NAME, USER, PASSWORD, HOST, PORT, OPTIONS) of ``url``.

    SQLAlchemy parses it (``make_url``), and its PostgreSQL dialect reads the query
    as it does for its own engines: ``?host=`` is a host name, a unix socket
    directory or several hosts (``host=h1:5432&host=h2:5432``, or
    ``host=h1,h2&port=5432,5433``: HOST and PORT are then libpq's comma-separated
    lists). Every other query parameter goes to OPTIONS, libpq's names as they are
    and asyncpg's ``ssl=`` as ``sslmode``. Raise :class:`InvalidURL` (an
    ImproperlyConfigured) for a URL that is not PostgreSQL's or cannot be read.
    """
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        # Not SQLAlchemy's message: one day it might quote the URL, password and all.
        raise InvalidURL("is not a URL.") from None
    except ValueError:
        raise InvalidURL("has a port that is not a number.") from None
    if parsed.drivername.partition("+")[0] not in URL_SCHEMES:
        raise InvalidURL(
            f"must start with postgresql:// or postgres://, got {parsed.drivername}://."
        )
    if "@" in (parsed.host or ""):
        raise InvalidURL("has an '@' in its user or password.", "Percent-encode it there as %40.")
    try:
        # The psycopg dialect turns the URL into libpq's keywords, several hosts included.
        params = PGDialect_psycopg().create_connect_args(parsed)[1]  # type: ignore[no-untyped-call]
    except ArgumentError as exc:  # "number of hosts and ports don't match" and the like
        why = str(exc).replace(parsed.password, "***") if parsed.password else str(exc)
        raise InvalidURL(f"has hosts or ports that cannot be read: {why}.") from None
    conn: dict[str, Any] = {key: params.pop(name, "") for name, key in _URL_FIELDS.items()}
    port = params.pop("port", None)
    conn["PORT"] = int(port) if isinstance(port, int) or str(port).isdigit() else port or None
    for key, value in params.items():
        if isinstance(value, tuple):
            raise InvalidURL(
                f"gives the query parameter {key!r} {len(value)} times.",
                "Give each query parameter once (several -c settings go in one options=).",
            )
    ssl = params.pop("ssl", None)
    if ssl is not None:
        if ssl not in SSL_MODES:
            raise InvalidURL(
                f"has ssl={ssl}, which is not an SSL mode.",
                "Use sslmode=require (encrypted) or sslmode=verify-full (encrypted, "
                f"server certificate checked); the modes are {', '.join(SSL_MODES)}.",
            )
        if params.setdefault("sslmode", ssl) != ssl:
            raise InvalidURL("has ssl= and sslmode= with different modes.", "Keep only sslmode=.")
    conn["OPTIONS"] = params
    return conn


def connection_fields(
    settings_dict: Mapping[str, Any], environ: Mapping[str, str]
) -> dict[str, Any]:
    """Return the fields DATABASE_URL fills in, when the alias names no database or host.

    OPTIONS given in settings win over the URL's query parameters. Raise
    :class:`InvalidURL` when the URL is needed and cannot be used.
    """
    url = environ.get("DATABASE_URL", "")
    if settings_dict.get("NAME") or settings_dict.get("HOST") or not url:
        return {}
    fields = parse_url(url)
    fields["OPTIONS"] = {**fields["OPTIONS"], **(settings_dict.get("OPTIONS") or {})}
    return fields


def sync_pool_options(reader: Reader, given: Any) -> dict[str, Any] | None:
    """Return psycopg_pool kwargs from Django's ``OPTIONS["pool"]`` (True/False/dict)."""
    if given is False or given is None:
        return None
    if given is True:
        given = {}
    if not isinstance(given, Mapping):
        reader.problem(
            "dbpool.E001",
            "OPTIONS['pool']",
            f"OPTIONS['pool'] must be True, False or a dict, got {type(given).__name__}.",
            "Use a dict of psycopg_pool options, e.g. {'min_size': 2, 'max_size': 10}.",
        )
        given = {}
    allowed = _sync_pool_keys()
    options = dict(SYNC_POOL_DEFAULTS)
    for key, raw in given.items():
        name = f"OPTIONS['pool'][{key!r}]"
        if key == "check":
            continue  # Django >= 6.1's own key: the ENGINE passes it to the pool itself
        if key not in allowed:
            reader.problem(
                "dbpool.E004",
                name,
                f"Unknown key {key!r} in OPTIONS['pool']: it is ignored.",
                "Use psycopg_pool.ConnectionPool's keyword arguments (min_size, max_size, "
                "timeout, max_idle, max_lifetime, ...).",
            )
        elif key in _BOUNDS:
            # An invalid value is reported and replaced by the default (ours, or
            # psycopg_pool's own), never passed on as given.
            default = SYNC_POOL_DEFAULTS.get(key, _psycopg_pool_defaults().get(key, raw))
            options[key] = reader.value(name, key, raw, default)
        else:
            options[key] = raw
    if "max_size" not in given and options["min_size"] > options["max_size"]:
        options["max_size"] = options["min_size"]
    if options["min_size"] > options["max_size"]:
        reader.problem(
            "dbpool.E005",
            "OPTIONS['pool']",
            f"min_size ({options['min_size']}) is larger than max_size ({options['max_size']}).",
            "Make min_size <= max_size.",
        )
        options["min_size"] = min(SYNC_POOL_DEFAULTS["min_size"], options["max_size"])
    return options


#: What PgBouncer's transaction pooling cannot carry: session state on a server
#: connection that the next transaction may not get.
PGBOUNCER_CONFLICTS = {
    "prepare_threshold": "psycopg's named prepared statements",
    "assume_role": "a session-level SET ROLE",
    "options": "session settings sent at connect (-c name=value)",
}


def pgbouncer_problems(reader: Reader, conn: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    """Record the settings that cannot work behind PgBouncer in transaction mode (E020)."""
    for key, what in PGBOUNCER_CONFLICTS.items():
        if options.get(key) is not None:
            reader.problem(
                "dbpool.E020",
                f"OPTIONS[{key!r}]",
                f"OPTIONS[{key!r}] needs {what}, which PgBouncer's transaction pooling "
                "loses: each transaction may run on another server connection.",
                f"Remove OPTIONS[{key!r}] (set it on the role or the database instead: "
                "ALTER ROLE ... SET), or turn OPTIONS['pgbouncer'] off.",
            )
    if conn.get("DISABLE_SERVER_SIDE_CURSORS") is False:
        reader.problem(
            "dbpool.E020",
            "DISABLE_SERVER_SIDE_CURSORS",
            "DISABLE_SERVER_SIDE_CURSORS is False, but QuerySet.iterator()'s server-side "
            "cursors do not survive PgBouncer's transaction pooling.",
            "Leave DISABLE_SERVER_SIDE_CURSORS out (OPTIONS['pgbouncer'] sets it to True).",
        )


def pgbouncer_on(options: Mapping[str, Any]) -> bool:
    """Return True when ``OPTIONS["pgbouncer"]`` turns the PgBouncer switch on."""
    value = options.get("pgbouncer")
    return value is True or (isinstance(value, str) and value.strip().lower() in _TRUE)


def refuse_unusable(config: AliasConfig) -> None:
    """Raise ImproperlyConfigured before connecting with a configuration that cannot work.

    That is a DATABASE_URL that cannot be used (E006), or settings PgBouncer's
    transaction pooling cannot carry (E020).
    """
    for problem in config.problems:
        if problem.id == "dbpool.E006":
            raise ImproperlyConfigured(
                f"Database {config.alias!r}: {problem.message} {problem.hint}"
            )
    conflicts = [p for p in config.problems if p.id == "dbpool.E020"]
    if conflicts:
        raise ImproperlyConfigured(
            f"Database {config.describe()} has OPTIONS['pgbouncer'] on, but "
            + " ".join(f"{p.message} {p.hint}" for p in conflicts)
        )


def failover_aliases(reader: Reader, given: Any) -> tuple[str, ...]:
    """Return ``OPTIONS["failover_to"]`` as a tuple of aliases, or () if it is not a list (E040)."""
    if given is None:
        return ()
    if isinstance(given, (list, tuple)) and all(isinstance(a, str) and a for a in given):
        return tuple(given)
    reader.problem(
        "dbpool.E040",
        "OPTIONS['failover_to']",
        f"OPTIONS['failover_to'] must be a list of database aliases, got {given!r}: "
        "this alias does not fail over.",
        "Write it as a list of aliases of settings.DATABASES, e.g. ['replica2', 'default'].",
    )
    return ()


#: What ``OPTIONS["circuit_breaker"]["storage"]`` may be (shared breaker state, _shared).
STORAGE_SCHEMES = frozenset({"redis", "rediss", "unix"})
STORAGE_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_BREAKER_KEY = "OPTIONS['circuit_breaker']"


def storage_checked(reader: Reader, breaker: BreakerConfig) -> BreakerConfig:
    """Record the problems of the ``storage`` keys; return ``breaker`` with defaults for them."""
    storage, prefix = breaker.storage, breaker.storage_prefix
    if storage:
        scheme = urlsplit(storage).scheme  # the URL may carry a password: never echoed
        if scheme not in STORAGE_SCHEMES or not _port_ok(storage):
            reader.problem(
                "dbpool.E030",
                f"{_BREAKER_KEY}['storage']",
                f"{_BREAKER_KEY}['storage'] must be a redis:// URL, got "
                f"{f'a {scheme}:// URL' if scheme else 'no URL scheme'}"
                f"{'' if _port_ok(storage) else ' with a port that is not a number'}.",
                "Write it as redis://HOST:PORT/DB (rediss:// for TLS, unix:///PATH for a "
                "socket), or leave it out to keep the breaker state in each process.",
            )
            storage = ""
        elif find_spec("redis") is None:
            reader.problem(
                "dbpool.E031",
                f"{_BREAKER_KEY}['storage']",
                f"{_BREAKER_KEY}['storage'] needs the redis package, which is not installed: the "
                "breaker state stays in each process.",
                "pip install django-asyncpool[redis]",
            )
            storage = ""
    if not STORAGE_PREFIX.fullmatch(prefix):
        default = BreakerConfig().storage_prefix
        reader.problem(
            "dbpool.E032",
            f"{_BREAKER_KEY}['storage_prefix']",
            f"{_BREAKER_KEY}['storage_prefix'] must be 1 to 64 letters, digits or _ . : -, "
            f"got {prefix!r}.",
            f"Use a short name of your project (default: {default!r}).",
        )
        prefix = default
    if (storage, prefix) == (breaker.storage, breaker.storage_prefix):
        return breaker
    return replace(breaker, storage=storage, storage_prefix=prefix)


def _port_ok(url: str) -> bool:
    try:
        urlsplit(url).port  # noqa: B018 - parsing it is the check
    except ValueError:
        return False
    return True


def from_settings(
    alias: str, settings_dict: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> AliasConfig:
    """Build the :class:`AliasConfig` of one ``DATABASES`` entry."""
    environ = os.environ if environ is None else environ
    reader = Reader(alias)
    try:
        from_url = connection_fields(settings_dict, environ)
    except InvalidURL as exc:
        # Nothing of it is used: connecting is refused (refuse_unusable) with this message.
        reader.problem("dbpool.E006", "DATABASE_URL", f"DATABASE_URL {exc.why}", exc.hint)
        from_url = {}
    conn = {**settings_dict, **from_url}
    options: Mapping[str, Any] = conn.get("OPTIONS") or {}

    env_async = {name: (var, environ[var]) for var, name in ENV_ASYNC.items() if var in environ}
    known_top = OUR_KEYS | DJANGO_OPTIONS | _libpq_keys()
    for key in sorted(set(options) - known_top):
        reader.problem(
            "dbpool.E004",
            f"OPTIONS[{key!r}]",
            f"Unknown key {key!r} in OPTIONS: it is not passed to the driver.",
            "Check the spelling; OPTIONS takes libpq parameters, Django's keys "
            f"and {', '.join(sorted(OUR_KEYS))}.",
        )
    # None means "persistent forever": as wrong with a pool as any positive age.
    if conn.get("CONN_MAX_AGE", 0) != 0 and options.get("pool", True) is not False:
        reader.problem(
            "dbpool.E007",
            "CONN_MAX_AGE",
            f"CONN_MAX_AGE is {conn['CONN_MAX_AGE']!r}, but pooling needs 0.",
            "Set CONN_MAX_AGE to 0 (the pool keeps connections), or OPTIONS['pool'] to False.",
        )

    def flag(key: str) -> Any:
        default = _TOP_DEFAULTS[key]  # written once: AliasConfig's own default
        if options.get(key) is None:
            return default
        return reader.value(
            f"OPTIONS[{key!r}]", key, options[key], default if default is not None else 1.0
        )

    def warmup(raw: Any) -> float | None:
        if raw is None or raw is False:
            return None
        return WARMUP_DEFAULT if raw is True else flag("warmup")

    def async_orm(raw: Any) -> bool:
        if raw is None or isinstance(raw, bool):
            return bool(raw)
        reader.problem(
            "dbpool.E050",
            "OPTIONS['async_orm']",
            f"OPTIONS['async_orm'] must be True or False, got {raw!r}: the native async "
            "ORM stays off.",
            "Set OPTIONS['async_orm'] = True to run Django's async QuerySet API on an async "
            "connection, or leave it out.",
        )
        return False

    port = conn.get("PORT") or None
    if port is not None and not str(port).replace(",", "").isdigit():
        reader.problem(
            "dbpool.E002",
            "PORT",
            f"PORT must be a port number, got {port!r}.",
            "Set PORT to the server's port (one per host, comma-separated, for several "
            "hosts), or leave it out for 5432.",
        )
        port = None
    sync_pool = sync_pool_options(reader, options.get("pool", True))
    async_pool = reader.section(AsyncPoolConfig, "async_pool", options.get("async_pool"), env_async)
    breaker = reader.section(BreakerConfig, "circuit_breaker", options.get("circuit_breaker"), {})
    retry = reader.section(RetryConfig, "retry", options.get("retry"), {})
    scalars = {
        key: flag(key) for key in ("leak_threshold", "liveness_bypass", "pgbouncer", "metrics")
    }
    warmup_after = warmup(options.get("warmup"))
    failover_to = failover_aliases(reader, options.get("failover_to"))
    native = async_orm(options.get("async_orm"))
    if retry.base_delay > retry.max_delay:
        reader.problem(
            "dbpool.E008",
            "OPTIONS['retry']",
            f"base_delay ({retry.base_delay:g}s) is larger than max_delay "
            f"({retry.max_delay:g}s): the delays could never grow.",
            "Make base_delay <= max_delay (defaults: 0.1 and 2.0 seconds).",
        )
        retry = RetryConfig(max_tries=retry.max_tries, max_time=retry.max_time)
    if scalars["pgbouncer"]:
        pgbouncer_problems(reader, conn, options)
    breaker = storage_checked(reader, breaker)
    return AliasConfig(
        alias=alias,
        dbname=conn.get("NAME") or "postgres",
        user=conn.get("USER") or "",
        password=conn.get("PASSWORD") or "",
        host=conn.get("HOST") or "",
        # Several hosts' ports stay libpq's comma-separated list.
        port=port if port is None or "," in str(port) else int(port),
        params={
            k: v
            for k, v in options.items()
            if k not in OUR_KEYS and k not in DJANGO_OPTIONS and k in known_top
        },
        sync_pool=sync_pool,
        async_pool=async_pool,
        breaker=breaker,
        retry=retry,
        warmup=warmup_after,
        failover_to=failover_to,
        async_orm=native,
        problems=tuple(reader.problems),
        **scalars,
    )


def load(alias: str = "default") -> AliasConfig:
    """Return the configuration of ``alias`` from ``settings.DATABASES`` and the environment."""
    from django.conf import settings

    databases = settings.DATABASES
    ours = sorted(a for a, d in databases.items() if d.get("ENGINE") == ENGINE)
    if alias not in databases or databases[alias].get("ENGINE") != ENGINE:
        why = (
            "is not in settings.DATABASES"
            if alias not in databases
            else (f"uses ENGINE {databases[alias].get('ENGINE')!r}")
        )
        raise ImproperlyConfigured(
            f"Database alias {alias!r} {why}; django-asyncpool serves aliases with "
            f"ENGINE {ENGINE!r}: {', '.join(ours) or 'none configured'}."
        )
    return from_settings(alias, databases[alias])


@dataclass(frozen=True, kw_only=True, slots=True)
class MetricsConfig:
    """The standalone exporter: ``METRICS_ENABLED`` and ``METRICS_PORT``."""

    enabled: bool = False
    port: int = 9090
    problems: tuple[Problem, ...] = ()


def metrics_from(values: Mapping[str, Any]) -> MetricsConfig:
    """Build the :class:`MetricsConfig` from ``METRICS_ENABLED`` / ``METRICS_PORT`` values."""
    reader = Reader("")
    enabled, port = False, 9090
    if values.get("METRICS_ENABLED") is not None:
        enabled = reader.value(
            "METRICS_ENABLED", "METRICS_ENABLED", values["METRICS_ENABLED"], False
        )
    if values.get("METRICS_PORT") not in (None, ""):
        port = reader.value("METRICS_PORT", "METRICS_PORT", values["METRICS_PORT"], port)
        if port > 65535:
            reader.problem(
                "dbpool.E003",
                "METRICS_PORT",
                f"METRICS_PORT must be a TCP port (1-65535), got {values['METRICS_PORT']!r}.",
                "Set METRICS_PORT to a free port between 1 and 65535 (default: 9090).",
            )
            port = 9090
    return MetricsConfig(enabled=enabled, port=port, problems=tuple(reader.problems))


def load_metrics(environ: Mapping[str, str] | None = None) -> MetricsConfig:
    """Return the exporter's configuration: Django settings win over the environment."""
    from django.conf import settings

    environ = os.environ if environ is None else environ
    names = ("METRICS_ENABLED", "METRICS_PORT")
    values: dict[str, Any] = {name: environ[name] for name in names if name in environ}
    values.update({name: getattr(settings, name) for name in names if hasattr(settings, name)})
    return metrics_from(values)


def database_only() -> frozenset[str]:
    """Return ``settings.ASYNCPOOL_DATABASE_ONLY``: dotted paths of sync callables
    (signal receivers, middleware) known to block on nothing but the database.

    The native ORM and the request path run those in a greenlet on the loop; whatever
    is not listed keeps Django's thread path. Read at each call, never at import, so
    ``override_settings`` reaches it.
    """
    from django.conf import settings

    return frozenset(getattr(settings, "ASYNCPOOL_DATABASE_ONLY", ()))
