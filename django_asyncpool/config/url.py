"""``DATABASE_URL``: read into Django's connection fields, never echoing the password."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.core.exceptions import ImproperlyConfigured

__all__ = ["SSL_MODES", "URL_FORM", "URL_SCHEMES", "InvalidURL", "connection_fields", "parse_url"]


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
