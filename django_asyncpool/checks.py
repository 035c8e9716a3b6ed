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

from . import _failover, _registry
from . import config as _config
from .errors import redact

__all__ = ["check_configuration", "problems", "to_message"]

TAG = "django_asyncpool"
#: Problems where no default replaces the value: an ignored key, a URL used as given,
#: a PgBouncer conflict refused at connect time. (CONN_MAX_AGE: 0 is used in DEBUG.)
NO_DEFAULT = frozenset({"dbpool.E004", "dbpool.E006", "dbpool.E020"})
#: failover_to problems between aliases: the alias is skipped, a loop ends at its start.
NO_DEFAULT |= {"dbpool.E041", "dbpool.E042", "dbpool.E043"}


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
    found.extend((p, "") for p in _failover.problems(databases, environ, wanted))
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
