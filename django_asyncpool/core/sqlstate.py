"""What a server error means for the pool, from its SQLSTATE: written once, for every driver.

:func:`classify` reads an error of psycopg, asyncpg or SQLAlchemy's wrappers of
them and returns one of four kinds (the table in docs/troubleshooting.md):

* :data:`GONE`: the connection is gone, or could not be made (08xxx, 57P01-57P05, a
  closed socket, a refused or timed-out connect): discard it, count it for the breaker;
* :data:`READ_ONLY`: the server is no longer what the alias needs (25006
  read_only_sql_transaction: a demoted primary); at connect, no host of several was
  what ``target_session_attrs`` asks for, though one answered (a failover under way:
  the standby is not yet promoted). Retried, not counted by the breaker: it would
  stay open long after the promotion;
* :data:`CONFIG`: a configuration fault at connect (authentication, unknown database
  or role, SSL refused): a retry cannot fix it, so it is never retried, and it is not
  counted by the breaker either, since the server answered;
* :data:`APPLICATION`: the statement's own fault (23xxx, 22xxx, 42xxx, 40001 ...):
  never counted, never a reason to discard the connection.

A connect failure of libpq (psycopg) carries no SQLSTATE: its message is read.
:class:`OncePerMinute` is the logging filter that keeps a repeated cause to one line;
:class:`QuietPool` the one on psycopg_pool's logger.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

__all__ = [
    "APPLICATION",
    "CONFIG",
    "GONE",
    "READ_ONLY",
    "OncePerMinute",
    "QuietPool",
    "advice",
    "classify",
    "inferred",
    "server_words",
    "sqlstate",
]

GONE = "gone"
READ_ONLY = "read-only"
CONFIG = "config"
APPLICATION = "application"

#: The server ending the session: admin_shutdown, crash_shutdown, cannot_connect_now,
#: database_dropped, idle_session_timeout.
_GOODBYE = frozenset({"57P01", "57P02", "57P03", "57P04", "57P05"})
#: libpq's words for the configuration faults (its connect errors carry no SQLSTATE),
#: and the SSL refusals of libpq and asyncpg: (words, the server's SQLSTATE, what to do).
_FAULTS: tuple[tuple[re.Pattern[str], str | None, str], ...] = tuple(
    (re.compile(words, re.IGNORECASE), code, advice)
    for words, code, advice in (
        (
            r"password authentication failed|(?:peer|ident|ldap|radius|cert|gss|sspi) "
            r"authentication failed|no password supplied|password is required",
            "28P01",
            "Check USER and PASSWORD (or DATABASE_URL) against the server's roles.",
        ),
        (
            r"role \"[^\"]*\" does not exist|is not permitted to log in",
            "28000",
            "Check USER (or DATABASE_URL), or create the role on the server.",
        ),
        (
            r"database \"[^\"]*\" does not exist",
            "3D000",
            "Check NAME (or DATABASE_URL), or create the database on the server.",
        ),
        (
            r"no pg_hba\.conf entry|pg_hba\.conf rejects connection",
            "28000",
            "The server's pg_hba.conf has no line that admits this user, database and host.",
        ),
        (
            r"permission denied for database",
            "42501",
            "Grant the role CONNECT on the database, or check USER.",
        ),
        (
            r"server does not support SSL|rejected SSL upgrade|SSL was required",
            None,
            "The server does not accept SSL: check OPTIONS['sslmode'] against the server.",
        ),
        (
            r"invalid value for parameter|unrecognized configuration parameter",
            "22023",
            "Check OPTIONS['options'] (the settings sent at connect).",
        ),
    )
)
#: A host answered but is not what target_session_attrs asks for: libpq's words (one
#: line per host tried), asyncpg's, and sqla.engines' when asyncpg said only the
#: refused host's error.
_NOT_TARGET = re.compile(
    r"session is (?:not )?read-only|server is (?:not )?in hot standby mode"
    r"|None of the hosts match the target attribute requirement"
)
#: The server's own sentence in a libpq message: what follows "FATAL:" (or "ERROR:").
_SERVER_SAYS = re.compile(r"(?:FATAL|ERROR):\s+(.*)", re.DOTALL)


def _chain(exc: BaseException) -> list[BaseException]:
    """Return ``exc`` and the errors it wraps (SQLAlchemy's ``orig``, causes), outermost first."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo and len(seen) < 8:
        current = todo.pop(0)
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        orig = getattr(current, "orig", None)
        todo += [orig if isinstance(orig, BaseException) else None, current.__cause__]
    return seen


def sqlstate(exc: BaseException) -> str | None:
    """Return the SQLSTATE of ``exc`` or of an error it wraps, or None."""
    for err in _chain(exc):
        code = getattr(err, "sqlstate", None) or getattr(err, "pgcode", None)
        if isinstance(code, str) and code:
            return code
    return None


def classify(exc: BaseException, *, connecting: bool = False) -> str:
    """Return what ``exc`` means for the pool: GONE, READ_ONLY, CONFIG or APPLICATION.

    ``connecting``: ``exc`` came from making a connection, where an error without a
    SQLSTATE that is no configuration fault means the server could not be reached.
    """
    code = sqlstate(exc)
    if code is not None:
        if code.startswith("08") or code in _GOODBYE:
            return GONE
        if code == "25006":
            return READ_ONLY
        if connecting:
            # Too many connections, out of memory, an internal error: the server's state,
            # which may pass. Anything else refuses what the alias asks for: authentication
            # (28000, 28P01), an unknown database (3D000), an unknown role in the startup
            # options (42704), no CONNECT privilege (42501), a bad startup option (22023).
            return GONE if code.startswith(("53", "58", "XX")) else CONFIG
        return APPLICATION
    text = " ".join(str(err) for err in _chain(exc))
    if connecting:
        if any(words.search(text) for words, _, _ in _FAULTS):
            return CONFIG
        return READ_ONLY if _NOT_TARGET.search(text) else GONE
    if any(isinstance(err, OSError) for err in _chain(exc)) or _lost_words(text):
        return GONE
    return APPLICATION


def _lost_words(text: str) -> bool:
    lowered = text.lower()
    return any(
        words in lowered
        for words in (
            "connection is closed",
            "connection was closed",
            "server closed the connection",
            "connection does not exist",
            "consuming input failed",
            "terminating connection",
        )
    )


def server_words(exc: BaseException) -> str:
    """Return the server's own sentence in ``exc`` ('role "app" does not exist'), else its text.

    libpq wraps it ("connection failed: connection to server at ... failed: FATAL:
    ..."), SQLAlchemy adds its class and a link; the driver's error inside says it plainly.
    """
    for err in reversed(_chain(exc)):  # innermost first: the driver's own error
        text = str(err).strip()
        if not text:
            continue
        said = _SERVER_SAYS.search(text)
        return said.group(1).strip() if said else text
    return type(exc).__name__


def inferred(reason: str) -> str | None:
    """Return the SQLSTATE the server sent with ``reason``, a configuration fault's words."""
    return next((code for words, code, _ in _FAULTS if words.search(reason)), None)


def advice(reason: str) -> str:
    """Return what to do about the configuration fault the server described as ``reason``."""
    return next(
        (advice for words, _, advice in _FAULTS if words.search(reason)),
        "Check NAME, USER, PASSWORD and OPTIONS of the alias against the server.",
    )


class OncePerMinute(logging.Filter):
    """Let a log record through once per ``every`` seconds per key (its message by default).

    Installed on psycopg_pool's logger, which logs each failed connect attempt of its
    reconnection loop; a configuration fault repeats the same line every second.
    """

    def __init__(
        self,
        every: float = 60.0,
        key: Callable[[logging.LogRecord], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.every = every
        self.key = key or (lambda record: _normalised(record.getMessage()))
        self.clock = clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        return self.first(self.key(record))

    def first(self, key: str) -> bool:
        """Return True if ``key`` was not let through in the last ``every`` seconds."""
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.every:
                return False
            if len(self._last) > 1000:  # keys with numbers in them: never grow for good
                self._last.clear()
            self._last[key] = now
            return True


class QuietPool(OncePerMinute):
    """psycopg_pool's log, once a minute per line, without its configuration faults.

    Its reconnection loop logs every failed attempt, several a second; a connect
    failure that is a configuration fault is the guard's to log (once a minute, with
    what to do), so psycopg_pool's own line for it is dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        for arg in args:
            if isinstance(arg, Exception) and classify(arg, connecting=True) == CONFIG:
                return False
        return super().filter(record)


def _normalised(message: str) -> str:
    """Return ``message`` without what changes between two attempts (ports, pids, delays)."""
    return re.sub(r"\d+(\.\d+)?", "#", message)
