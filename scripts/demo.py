"""The demo: an embedded PostgreSQL (unless DATABASE_URL is set), migrated, checked.

Run through ``python3 scripts/dev.py demo``, which sets up the virtualenv first.
Data is kept in .demo/pgdata between runs; Ctrl-C stops everything.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    if not os.environ.get("DATABASE_URL"):
        os.environ.setdefault("ASYNCPOOL_PGDATA", str(ROOT / ".demo" / "pgdata"))
        (ROOT / ".demo").mkdir(exist_ok=True)
    import django
    from django.core.management import call_command

    django.setup()
    from testproject import pgserver

    server = pgserver.current()
    try:
        call_command("migrate", verbosity=1)
        from django.db import connections

        for alias in connections:
            with connections[alias].cursor() as cursor:
                cursor.execute("select version(), pg_backend_pid()")
                version, pid = cursor.fetchone()
            pool = connections[alias].pool
            stats = pool.get_stats() if pool else {}
            print(
                f"{alias}: connected through the pool (backend pid {pid}, "
                f"pool size {stats.get('pool_size', 0)}): {version.split(',')[0]}"
            )
        return 0
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
