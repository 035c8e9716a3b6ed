"""System checks: the configuration problems of every alias, shown by ``manage.py check``.

The problems come from :mod:`django_asyncpool.config`, the same code that reads
the configuration at run time, so a check and the pool never disagree. With
``DEBUG = False`` each problem is an error (``dbpool.E00x``): ``runserver``,
``migrate`` and ``check --deploy`` refuse to go on. With ``DEBUG = True`` the same
problem is a warning (``dbpool.W00x``) and the pool uses the default instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from django.conf import settings
from django.core import checks

from . import config as _config
from .config import ENGINE, rules
from .core import registry as _registry
from .errors import redact

__all__ = ["check_configuration", "failover_problems", "problems", "to_message"]

TAG = "django_asyncpool"
#: Problems where no default replaces the value (:data:`~.config.rules.PROBLEMS` says which).
NO_DEFAULT = rules.NO_DEFAULT


def problems(
    databases: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
    aliases: Iterable[str] | None = None,
) -> list[tuple[_config.Problem, str]]:
    """Return every configuration problem with the password of its alias (for redaction).

    The caller shows them: no log line repeats them.
    """
    databases = settings.DATABASES if databases is None else databases
    environ = os.environ if environ is None else environ
    found: list[tuple[_config.Problem, str]] = []
    wanted = set(databases) if aliases is None else set(aliases)
    for alias, settings_dict in databases.items():
        if settings_dict.get("ENGINE") != _config.ENGINE or alias not in wanted:
            continue
        conf = _config.from_settings(alias, settings_dict, environ)
        found.extend((problem, conf.password) for problem in conf.problems)
    found.extend((p, "") for p in failover_problems(databases, environ, wanted))
    if aliases is None:
        found.extend((p, "") for p in _config.load_metrics(environ).problems)
    _registry.mark_reported(p for p, _ in found)
    return found


def to_message(problem: _config.Problem, password: str = "", *, debug: bool) -> checks.CheckMessage:
    """Return the Django check message of ``problem``: an error, or a warning when ``debug``."""
    where = f"Database {problem.alias!r}, {problem.key}" if problem.alias else problem.key
    text = redact(f"{where}: {problem.message}", password)
    hint = redact(problem.hint, password)
    if debug:
        used = "" if problem.id in NO_DEFAULT else " The default is used"
        return checks.Warning(
            f"{text}{used} (DEBUG is on; this is an error in production).",
            hint=hint,
            id=problem.id.replace(".E", ".W"),
        )
    return checks.Error(text, hint=hint, id=problem.id)


@checks.register(TAG)
def check_configuration(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Report invalid django-asyncpool settings: errors in production, warnings with DEBUG."""
    debug = bool(settings.DEBUG)
    return [to_message(problem, password, debug=debug) for problem, password in problems()]


# -- failover_to across aliases -------------------------------------------------------------


def failover_problems(
    databases: Mapping[str, Mapping[str, Any]],
    environ: Mapping[str, str],
    aliases: Iterable[str] | None = None,
) -> list[_config.Problem]:
    """Return the problems of ``failover_to`` across aliases: unknown, foreign, a cycle."""
    ours = {a: d for a, d in databases.items() if d.get("ENGINE") == ENGINE}
    targets = {a: _config.from_settings(a, d, environ).failover_to for a, d in ours.items()}
    wanted = set(ours) if aliases is None else set(aliases) & set(ours)
    found = []
    key = "OPTIONS['failover_to']"
    for alias in sorted(wanted):
        for target in targets[alias]:
            if target not in databases:
                found.append(
                    _config.Problem(
                        id=rules.FAILOVER_UNKNOWN,
                        alias=alias,
                        key=key,
                        message=f"{key} names {target!r}, which is not in settings.DATABASES: "
                        "reads never fail over to it.",
                        hint=f"Use aliases of settings.DATABASES: {', '.join(sorted(ours))}.",
                    )
                )
            elif target not in ours:
                found.append(
                    _config.Problem(
                        id=rules.FAILOVER_FOREIGN,
                        alias=alias,
                        key=key,
                        message=f"{key} names {target!r}, whose ENGINE is "
                        f"{databases[target].get('ENGINE')!r}: reads fail over only to aliases "
                        f"of ENGINE {ENGINE!r} (their breaker says when they are healthy).",
                        hint=f"Remove {target!r} from {key}, or give it ENGINE {ENGINE!r}.",
                    )
                )
        loop = _cycle(alias, targets)
        if loop:
            found.append(
                _config.Problem(
                    id=rules.FAILOVER_LOOP,
                    alias=alias,
                    key=key,
                    message=f"{key} leads back to {alias!r}: {' -> '.join(loop)}. A read "
                    "would be sent round the loop while the aliases are down.",
                    hint="Let the chain end at the primary, which fails over to nothing.",
                )
            )
    return found


def _cycle(alias: str, targets: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Return a path from ``alias`` back to itself through ``failover_to``, or []."""
    path = [alias]
    seen: set[str] = set()

    def walk(node: str) -> bool:
        for nxt in targets.get(node, ()):
            if nxt == alias:
                path.append(nxt)
                return True
            if nxt in seen or nxt not in targets:
                continue
            seen.add(nxt)
            path.append(nxt)
            if walk(nxt):
                return True
            path.pop()
        return False

    return path if walk(alias) else []
