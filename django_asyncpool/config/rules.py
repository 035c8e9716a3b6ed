"""The rules a configuration is held to: every problem id in one table, and what is refused.

Each :class:`~.model.Problem` carries one of the ids below; the system checks show
it as an error (``dbpool.E0xx``) or, with DEBUG, a warning (``dbpool.W0xx``). Where
the table says no default replaces the value, the setting is ignored, used as
given, or refused at connect time (:func:`refuse_unusable`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from django.core.exceptions import ImproperlyConfigured

from .model import AliasConfig

__all__ = [
    "FALSE_WORDS",
    "NO_DEFAULT",
    "PGBOUNCER_CONFLICTS",
    "PROBLEMS",
    "TRUE_WORDS",
    "Rule",
    "pgbouncer_on",
    "refuse_unusable",
]


class Rule(NamedTuple):
    """One kind of problem: what it says, and whether the default replaces the value."""

    what: str
    default_used: bool = True


NOT_A_DICT = "dbpool.E001"
BAD_VALUE = "dbpool.E002"
TOO_SMALL = "dbpool.E003"
UNKNOWN_KEY = "dbpool.E004"
MIN_OVER_MAX = "dbpool.E005"
BAD_URL = "dbpool.E006"
PERSISTENT = "dbpool.E007"
DELAYS = "dbpool.E008"
BAD_PASSWORD_SOURCE = "dbpool.E009"
BAD_HOSTS = "dbpool.E010"
PGBOUNCER = "dbpool.E020"
BAD_STORAGE = "dbpool.E030"
NO_REDIS = "dbpool.E031"
BAD_PREFIX = "dbpool.E032"
BAD_FAILOVER = "dbpool.E040"
FAILOVER_UNKNOWN = "dbpool.E041"
FAILOVER_FOREIGN = "dbpool.E042"
FAILOVER_LOOP = "dbpool.E043"
BAD_ASYNC_ORM = "dbpool.E050"

#: Every problem id, in order.
PROBLEMS: dict[str, Rule] = {
    NOT_A_DICT: Rule("a section of OPTIONS (or OPTIONS['pool']) is not a dict"),
    BAD_VALUE: Rule("a value of the wrong type (a number, a flag, a string, PORT)"),
    TOO_SMALL: Rule("a number below its bound (or METRICS_PORT out of range)"),
    UNKNOWN_KEY: Rule("an unknown key: ignored", default_used=False),
    MIN_OVER_MAX: Rule("OPTIONS['pool'] min_size larger than max_size"),
    BAD_URL: Rule("DATABASE_URL cannot be used: connecting is refused", default_used=False),
    PERSISTENT: Rule("CONN_MAX_AGE is not 0 with the pool on (0 is used in DEBUG)"),
    DELAYS: Rule("retry base_delay larger than max_delay"),
    BAD_PASSWORD_SOURCE: Rule(
        "OPTIONS['password'] names no callable: connecting is refused", default_used=False
    ),
    BAD_HOSTS: Rule(
        "HOST, PORT or target_session_attrs no driver can use: connecting is refused",
        default_used=False,
    ),
    PGBOUNCER: Rule("a setting PgBouncer's transaction pooling loses: refused", False),
    BAD_STORAGE: Rule("circuit_breaker storage is not a redis:// URL"),
    NO_REDIS: Rule("circuit_breaker storage without the redis package"),
    BAD_PREFIX: Rule("circuit_breaker storage_prefix is not a short name"),
    BAD_FAILOVER: Rule("failover_to is not a list of aliases"),
    FAILOVER_UNKNOWN: Rule("failover_to names an alias not in DATABASES", False),
    FAILOVER_FOREIGN: Rule("failover_to names an alias of another ENGINE", False),
    FAILOVER_LOOP: Rule("failover_to leads back to the alias", default_used=False),
    BAD_ASYNC_ORM: Rule("async_orm is not True or False"),
}
#: The problems where no default replaces the value.
NO_DEFAULT = frozenset(id for id, rule in PROBLEMS.items() if not rule.default_used)

#: What PgBouncer's transaction pooling cannot carry: session state on a server
#: connection that the next transaction may not get.
PGBOUNCER_CONFLICTS = {
    "prepare_threshold": "psycopg's named prepared statements",
    "assume_role": "a session-level SET ROLE",
    "options": "session settings sent at connect (-c name=value)",
}

#: How a flag is written in the environment (or as a string in OPTIONS).
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})


def pgbouncer_on(options: Mapping[str, Any]) -> bool:
    """Return True when ``OPTIONS["pgbouncer"]`` turns the PgBouncer switch on."""
    value = options.get("pgbouncer")
    return value is True or (isinstance(value, str) and value.strip().lower() in TRUE_WORDS)


def refuse_unusable(config: AliasConfig) -> None:
    """Raise ImproperlyConfigured before connecting with a configuration that cannot work.

    That is a DATABASE_URL that cannot be used (E006), an ``OPTIONS["password"]``
    that names no callable (E009), hosts, ports or ``target_session_attrs`` the
    drivers cannot use (E010), or settings PgBouncer's
    transaction pooling cannot carry (E020).
    """
    for problem in config.problems:
        if problem.id in (BAD_URL, BAD_PASSWORD_SOURCE, BAD_HOSTS):
            raise ImproperlyConfigured(
                f"Database {config.alias!r}: {problem.message} {problem.hint}"
            )
    conflicts = [p for p in config.problems if p.id == PGBOUNCER]
    if conflicts:
        raise ImproperlyConfigured(
            f"Database {config.describe()} has OPTIONS['pgbouncer'] on, but "
            + " ".join(f"{p.message} {p.hint}" for p in conflicts)
        )
