#!/usr/bin/env python
"""Django's command-line utility for the testproject (the demo).

Without DATABASE_URL it uses the demo's embedded PostgreSQL when the demo runs
(``.demo/pgdata``, or ``ASYNCPOOL_PGDATA``), otherwise a throwaway one; it says which.
"""

import os
import sys
from pathlib import Path


def _which_database() -> None:
    """Point the settings at the running demo's server, and say which server is used."""
    if (
        os.environ.get("DATABASE_URL")
        or os.environ["DJANGO_SETTINGS_MODULE"] != "testproject.settings"
        or os.environ.get("RUN_MAIN")  # runserver's autoreloaded child: said once already
    ):
        return
    from testproject import pgserver

    pgdata = os.environ.get("ASYNCPOOL_PGDATA")
    demo = Path(pgdata or Path(__file__).resolve().parent / ".demo" / "pgdata")
    if pgdata or ((demo / "postmaster.pid").exists() and pgserver.LocalPostgres(demo).is_running()):
        os.environ["ASYNCPOOL_PGDATA"] = str(demo)
        print(f"Database: the embedded PostgreSQL with its data in {demo}.", file=sys.stderr)
    else:
        print(
            "Database: a throwaway embedded PostgreSQL, deleted when this command ends "
            f"(no DATABASE_URL, and no demo running in {demo}). Start the demo "
            "(python3 scripts/dev.py demo) or set DATABASE_URL to use another server.",
            file=sys.stderr,
        )


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    _which_database()
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
