"""Read ``DATABASES[alias]`` plus the environment into an :class:`~.model.AliasConfig`.

Precedence, highest first: ``DATABASES[alias]["OPTIONS"]`` -> the environment
variables of the usage guide -> the defaults of :mod:`.model`. Nothing is read at
import time: :func:`load` reads ``settings.DATABASES`` when it is called, so
``override_settings`` reaches it.

Invalid values never stop :func:`load`: the default is used and a
:class:`~.model.Problem` is recorded (its id from :mod:`.rules`). The system checks
turn problems into errors when DEBUG is off and warnings when it is on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields, replace
from importlib.util import find_spec
from typing import Any, cast
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from . import rules
from .keys import (
    DJANGO_OPTIONS,
    ENV_ASYNC,
    OUR_KEYS,
    libpq_keys,
    psycopg_pool_defaults,
    sync_pool_keys,
)
from .model import (
    ENGINE,
    SYNC_POOL_DEFAULTS,
    WARMUP_DEFAULT,
    AliasConfig,
    AsyncPoolConfig,
    BreakerConfig,
    MetricsConfig,
    Problem,
    RetryConfig,
)
from .url import InvalidURL, connection_fields

__all__ = [
    "STORAGE_PREFIX",
    "STORAGE_SCHEMES",
    "Reader",
    "database_only",
    "failover_aliases",
    "from_settings",
    "load",
    "load_metrics",
    "metrics_from",
    "pgbouncer_problems",
    "storage_checked",
    "sync_pool_options",
]

#: AliasConfig's defaults for the top-level OPTIONS keys (``_flag()`` reads them here).
_TOP_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in fields(AliasConfig) if not isinstance(f.default, type(MISSING))
}

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
            if isinstance(raw, str) and raw.strip().lower() in rules.TRUE_WORDS | rules.FALSE_WORDS:
                return raw.strip().lower() in rules.TRUE_WORDS
            self.problem(
                rules.BAD_VALUE,
                key,
                f"{key} must be true or false, got {raw!r}.",
                "Use True/False (or true/false in the environment).",
            )
            return default
        if isinstance(default, str):
            if isinstance(raw, str):
                return raw
            self.problem(
                rules.BAD_VALUE,
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
                rules.BAD_VALUE,
                key,
                f"{key} must be {word}, got {raw!r}.",
                f"Set {key} to {word} (default: {default}).",
            )
            return default
        if number < low or (number == low and not inclusive):
            bound = f">= {low:g}" if inclusive else f"> {low:g}"
            self.problem(
                rules.TOO_SMALL,
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
                rules.NOT_A_DICT,
                f"OPTIONS[{name!r}]",
                f"OPTIONS[{name!r}] must be a dict, got {type(given).__name__}.",
                f"Write OPTIONS[{name!r}] as a dict of its keys, or leave it out.",
            )
            given = {}
        known = {f.name for f in fields(cls)}
        for key in sorted(set(given) - known):
            self.problem(
                rules.UNKNOWN_KEY,
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


def sync_pool_options(reader: Reader, given: Any) -> dict[str, Any] | None:
    """Return psycopg_pool kwargs from Django's ``OPTIONS["pool"]`` (True/False/dict)."""
    if given is False or given is None:
        return None
    if given is True:
        given = {}
    if not isinstance(given, Mapping):
        reader.problem(
            rules.NOT_A_DICT,
            "OPTIONS['pool']",
            f"OPTIONS['pool'] must be True, False or a dict, got {type(given).__name__}.",
            "Use a dict of psycopg_pool options, e.g. {'min_size': 2, 'max_size': 10}.",
        )
        given = {}
    allowed = sync_pool_keys()
    options = dict(SYNC_POOL_DEFAULTS)
    for key, raw in given.items():
        name = f"OPTIONS['pool'][{key!r}]"
        if key == "check":
            continue  # Django >= 6.1's own key: the ENGINE passes it to the pool itself
        if key not in allowed:
            reader.problem(
                rules.UNKNOWN_KEY,
                name,
                f"Unknown key {key!r} in OPTIONS['pool']: it is ignored.",
                "Use psycopg_pool.ConnectionPool's keyword arguments (min_size, max_size, "
                "timeout, max_idle, max_lifetime, ...).",
            )
        elif key in _BOUNDS:
            # An invalid value is reported and replaced by the default (ours, or
            # psycopg_pool's own), never passed on as given.
            default = SYNC_POOL_DEFAULTS.get(key, psycopg_pool_defaults().get(key, raw))
            options[key] = reader.value(name, key, raw, default)
        else:
            options[key] = raw
    if "max_size" not in given and options["min_size"] > options["max_size"]:
        options["max_size"] = options["min_size"]
    if options["min_size"] > options["max_size"]:
        reader.problem(
            rules.MIN_OVER_MAX,
            "OPTIONS['pool']",
            f"min_size ({options['min_size']}) is larger than max_size ({options['max_size']}).",
            "Make min_size <= max_size.",
        )
        options["min_size"] = min(SYNC_POOL_DEFAULTS["min_size"], options["max_size"])
    return options


def pgbouncer_problems(reader: Reader, conn: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    """Record the settings that cannot work behind PgBouncer in transaction mode (E020)."""
    for key, what in rules.PGBOUNCER_CONFLICTS.items():
        if options.get(key) is not None:
            reader.problem(
                rules.PGBOUNCER,
                f"OPTIONS[{key!r}]",
                f"OPTIONS[{key!r}] needs {what}, which PgBouncer's transaction pooling "
                "loses: each transaction may run on another server connection.",
                f"Remove OPTIONS[{key!r}] (set it on the role or the database instead: "
                "ALTER ROLE ... SET), or turn OPTIONS['pgbouncer'] off.",
            )
    if conn.get("DISABLE_SERVER_SIDE_CURSORS") is False:
        reader.problem(
            rules.PGBOUNCER,
            "DISABLE_SERVER_SIDE_CURSORS",
            "DISABLE_SERVER_SIDE_CURSORS is False, but QuerySet.iterator()'s server-side "
            "cursors do not survive PgBouncer's transaction pooling.",
            "Leave DISABLE_SERVER_SIDE_CURSORS out (OPTIONS['pgbouncer'] sets it to True).",
        )


def failover_aliases(reader: Reader, given: Any) -> tuple[str, ...]:
    """Return ``OPTIONS["failover_to"]`` as a tuple of aliases, or () if it is not a list (E040)."""
    if given is None:
        return ()
    if isinstance(given, (list, tuple)) and all(isinstance(a, str) and a for a in given):
        return tuple(given)
    reader.problem(
        rules.BAD_FAILOVER,
        "OPTIONS['failover_to']",
        f"OPTIONS['failover_to'] must be a list of database aliases, got {given!r}: "
        "this alias does not fail over.",
        "Write it as a list of aliases of settings.DATABASES, e.g. ['replica2', 'default'].",
    )
    return ()


#: What ``OPTIONS["circuit_breaker"]["storage"]`` may be (the breaker state in Redis).
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
                rules.BAD_STORAGE,
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
                rules.NO_REDIS,
                f"{_BREAKER_KEY}['storage']",
                f"{_BREAKER_KEY}['storage'] needs the redis package, which is not installed: the "
                "breaker state stays in each process.",
                "pip install django-asyncpool[redis]",
            )
            storage = ""
    if not STORAGE_PREFIX.fullmatch(prefix):
        default = BreakerConfig().storage_prefix
        reader.problem(
            rules.BAD_PREFIX,
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
    conn = _with_url(reader, settings_dict, environ)
    options: Mapping[str, Any] = conn.get("OPTIONS") or {}
    known_top = OUR_KEYS | DJANGO_OPTIONS | libpq_keys()
    _unknown_keys(reader, options, known_top)
    _persistent(reader, conn, options)
    env_async = {name: (var, environ[var]) for var, name in ENV_ASYNC.items() if var in environ}
    port = _port(reader, conn)
    _hosts(reader, conn, port, options.get("target_session_attrs"))
    sync_pool = sync_pool_options(reader, options.get("pool", True))
    async_pool = reader.section(AsyncPoolConfig, "async_pool", options.get("async_pool"), env_async)
    breaker = reader.section(BreakerConfig, "circuit_breaker", options.get("circuit_breaker"), {})
    retry = _retry(reader, reader.section(RetryConfig, "retry", options.get("retry"), {}))
    scalars = {
        key: _flag(reader, options, key)
        for key in ("leak_threshold", "liveness_bypass", "pgbouncer", "metrics")
    }
    warmup = _warmup(reader, options)
    failover_to = failover_aliases(reader, options.get("failover_to"))
    native = _async_orm(reader, options.get("async_orm"))
    password_source = _password_source(reader, options.get("password"))
    if scalars["pgbouncer"]:
        pgbouncer_problems(reader, conn, options)
    return AliasConfig(
        alias=alias,
        dbname=conn.get("NAME") or "postgres",
        user=conn.get("USER") or "",
        password=conn.get("PASSWORD") or "",
        password_source=password_source,
        host=conn.get("HOST") or "",
        # Several hosts' ports stay libpq's comma-separated list.
        port=port if port is None or "," in str(port) else int(port),
        params={
            k: v
            for k, v in options.items()
            if k not in OUR_KEYS and k not in DJANGO_OPTIONS and k in known_top and k != "password"
        },
        sync_pool=sync_pool,
        async_pool=async_pool,
        breaker=storage_checked(reader, breaker),
        retry=retry,
        warmup=warmup,
        failover_to=failover_to,
        async_orm=native,
        problems=tuple(reader.problems),
        **scalars,
    )


def _with_url(
    reader: Reader, settings_dict: Mapping[str, Any], environ: Mapping[str, str]
) -> dict[str, Any]:
    """Return the settings, filled from DATABASE_URL when they name no database or host."""
    try:
        from_url = connection_fields(settings_dict, environ)
    except InvalidURL as exc:
        # Nothing of it is used: connecting is refused (refuse_unusable) with this message.
        reader.problem(rules.BAD_URL, "DATABASE_URL", f"DATABASE_URL {exc.why}", exc.hint)
        from_url = {}
    return {**settings_dict, **from_url}


def _unknown_keys(reader: Reader, options: Mapping[str, Any], known: frozenset[str]) -> None:
    for key in sorted(set(options) - known):
        reader.problem(
            rules.UNKNOWN_KEY,
            f"OPTIONS[{key!r}]",
            f"Unknown key {key!r} in OPTIONS: it is not passed to the driver.",
            "Check the spelling; OPTIONS takes libpq parameters, Django's keys "
            f"and {', '.join(sorted(OUR_KEYS))}.",
        )


def _persistent(reader: Reader, conn: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    # None means "persistent forever": as wrong with a pool as any positive age.
    if conn.get("CONN_MAX_AGE", 0) != 0 and options.get("pool", True) is not False:
        reader.problem(
            rules.PERSISTENT,
            "CONN_MAX_AGE",
            f"CONN_MAX_AGE is {conn['CONN_MAX_AGE']!r}, but pooling needs 0.",
            "Set CONN_MAX_AGE to 0 (the pool keeps connections), or OPTIONS['pool'] to False.",
        )


def _port(reader: Reader, conn: Mapping[str, Any]) -> Any:
    port = conn.get("PORT") or None
    if port is not None and not str(port).replace(",", "").isdigit():
        reader.problem(
            rules.BAD_VALUE,
            "PORT",
            f"PORT must be a port number, got {port!r}.",
            "Set PORT to the server's port (one per host, comma-separated, for several "
            "hosts), or leave it out for 5432.",
        )
        port = None
    return port


#: libpq's and asyncpg's values alike (libpq >= 14, asyncpg >= 0.25).
SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")


def _hosts(reader: Reader, conn: Mapping[str, Any], port: Any, attrs: Any) -> None:
    """Check what every driver needs of several hosts: one port, or one per host; a known
    ``target_session_attrs``. libpq and asyncpg would each refuse it in their own words."""
    hosts = str(conn.get("HOST") or "").split(",")
    ports = str(port).split(",") if port is not None else []
    if len(ports) > 1 and len(ports) != len(hosts):
        reader.problem(
            rules.BAD_HOSTS,
            "PORT",
            f"PORT lists {len(ports)} ports for {len(hosts)} hosts in HOST: connecting is refused.",
            "Give one PORT for every host, or one port per host in HOST's order "
            "(HOST 'pg1,pg2', PORT '5432,5433').",
        )
    if attrs is not None and attrs not in SESSION_ATTRS:
        reader.problem(
            rules.BAD_HOSTS,
            "OPTIONS['target_session_attrs']",
            f"OPTIONS['target_session_attrs'] is {attrs!r}, which no driver knows: "
            "connecting is refused.",
            f"Use one of {', '.join(map(repr, SESSION_ATTRS))} ('read-write' follows the "
            "primary after a failover).",
        )


def _flag(reader: Reader, options: Mapping[str, Any], key: str) -> Any:
    default = _TOP_DEFAULTS[key]  # written once: AliasConfig's own default
    if options.get(key) is None:
        return default
    return reader.value(
        f"OPTIONS[{key!r}]", key, options[key], default if default is not None else 1.0
    )


def _warmup(reader: Reader, options: Mapping[str, Any]) -> float | None:
    raw = options.get("warmup")
    if raw is None or raw is False:
        return None
    return WARMUP_DEFAULT if raw is True else _flag(reader, options, "warmup")


def _async_orm(reader: Reader, raw: Any) -> bool:
    if raw is None or isinstance(raw, bool):
        return bool(raw)
    reader.problem(
        rules.BAD_ASYNC_ORM,
        "OPTIONS['async_orm']",
        f"OPTIONS['async_orm'] must be True or False, got {raw!r}: the native async ORM stays off.",
        "Set OPTIONS['async_orm'] = True to run Django's async QuerySet API on an async "
        "connection, or leave it out.",
    )
    return False


def _password_source(reader: Reader, raw: Any) -> Callable[[], str] | None:
    """Return ``OPTIONS["password"]``'s callable, imported from its dotted path if need be."""
    if raw is None or callable(raw):
        return cast("Callable[[], str] | None", raw)
    problem = "is not a string"
    if isinstance(raw, str):
        try:
            source = import_string(raw)
        except ImportError as exc:  # never the value: it could be a password itself
            problem = f"cannot be imported ({type(exc).__name__})"
        else:
            if callable(source):
                return cast("Callable[[], str]", source)
            problem = "names something that is not callable"
    reader.problem(
        rules.BAD_PASSWORD_SOURCE,
        "OPTIONS['password']",
        f"OPTIONS['password'] must be a callable returning the password, or its dotted "
        f"path; it {problem}: connecting is refused.",
        "Name a function such as 'myproject.db.iam_token' (called for each new connection); "
        "a fixed password goes in PASSWORD.",
    )
    return None


def _retry(reader: Reader, retry: RetryConfig) -> RetryConfig:
    if retry.base_delay > retry.max_delay:
        reader.problem(
            rules.DELAYS,
            "OPTIONS['retry']",
            f"base_delay ({retry.base_delay:g}s) is larger than max_delay "
            f"({retry.max_delay:g}s): the delays could never grow.",
            "Make base_delay <= max_delay (defaults: 0.1 and 2.0 seconds).",
        )
        return RetryConfig(max_tries=retry.max_tries, max_time=retry.max_time)
    return retry


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
                rules.TOO_SMALL,
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
