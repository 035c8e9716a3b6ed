"""Connections that renew well: a password asked for at each connect, lifetimes that spread.

* ``OPTIONS["password"]`` may be a callable (or the dotted path of one) returning the
  password: a cloud IAM token, a Vault lease. Every pool asks it for each new
  connection (:func:`password`), and asks once more when the server rejects the
  password it gave (:func:`rejected`): the token may have expired in between.
* A pool's connections opened together would all reach ``max_lifetime`` (``recycle``)
  in the same second and reconnect at once; :func:`lifetime` spreads them by +-10 %.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from ..config import AliasConfig
from .sqlstate import inferred, server_words, sqlstate

__all__ = ["JITTER", "lifetime", "password", "rejected"]

#: How far a connection's lifetime may stray from the configured one, either way.
JITTER = 0.1

#: SQLSTATE invalid_password: the server rejected the password it was given.
_INVALID_PASSWORD = "28P01"


def password(config: AliasConfig) -> str | None:
    """Return the password for a new connection of ``config``: the source's, or PASSWORD."""
    source: Callable[[], str] | None = config.password_source
    if source is not None:
        return str(source())
    return config.password or None


def rejected(exc: BaseException) -> bool:
    """Return True if the server refused ``exc``'s connect for its password.

    Callers with a password source ask it once more: a fixed PASSWORD would be refused again.
    """
    # libpq's connect errors carry no SQLSTATE: the one its words stand for.
    return (sqlstate(exc) or inferred(server_words(exc))) == _INVALID_PASSWORD


def lifetime(seconds: float) -> float:
    """Return ``seconds`` spread by up to +-:data:`JITTER` (a negative lifetime stays: off)."""
    if seconds <= 0:
        return seconds
    return seconds * random.uniform(1 - JITTER, 1 + JITTER)
