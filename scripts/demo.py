"""The demo: testproject served by uvicorn on PostgreSQL, with sample data.

    python3 scripts/dev.py demo [--host 127.0.0.1] [--port 8000]

Without DATABASE_URL it starts an embedded PostgreSQL whose data is kept in
.demo/pgdata and reused on the next run; with DATABASE_URL it uses that server.
It migrates, loads sample data (once), serves testproject under uvicorn (ASGI,
one worker) and prints the URLs to open. Ctrl-C, or SIGTERM (docker stop, systemd),
stops the web server, closes the pools and stops the embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        # As uvicorn binds: connections left in TIME_WAIT do not make the port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _database_line() -> str:
    from django_asyncpool.core import registry as _registry
    from testproject import pgserver

    server = pgserver.current()
    where = _registry.config("default").describe()
    if server is None:
        return f"Database: {where}, from DATABASE_URL."
    return (
        f"Database: embedded PostgreSQL {where}, data in {server.datadir} "
        "(kept between runs; delete the folder to start afresh)."
    )


async def _serve(server: object, base: str) -> None:
    import uvicorn

    from testproject.shop.views import CREATE_EXAMPLES, PAGES

    assert isinstance(server, uvicorn.Server)

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.05)
        lines = [f"\nThe demo is running at {base}/ (uvicorn, 1 worker). Open:"]
        lines += [f"  {base}{url:<22} {what}" for url, what in PAGES]
        lines.append("Writes, with curl -X POST -H 'content-type: application/json' -d BODY:")
        lines += [f"  {base}{how.split()[1]:<22} {body}" for how, body in CREATE_EXAMPLES]
        lines.append("Press Ctrl-C to stop.\n")
        print("\n".join(lines), flush=True)

    task = asyncio.create_task(announce())
    try:
        await server.serve()
    finally:
        task.cancel()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=os.environ.get("DEMO_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", "8000")))
    parser.add_argument("--access-log", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    # SIGTERM as Ctrl-C: a KeyboardInterrupt, so the finally below stops the embedded
    # PostgreSQL (SIGTERM's default would end the process and leave the server running).
    # uvicorn handles both while it serves, then raises the signal again.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if not _port_is_free(args.host, args.port):
        print(
            f"Port {args.port} on {args.host} is in use (another demo?). "
            f"Stop it, or pick another port: --port {args.port + 1}",
            file=sys.stderr,
        )
        return 1

    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    if not os.environ.get("DATABASE_URL"):
        os.environ.setdefault("ASYNCPOOL_PGDATA", str(ROOT / ".demo" / "pgdata"))
        Path(os.environ["ASYNCPOOL_PGDATA"]).parent.mkdir(parents=True, exist_ok=True)
        print("Starting the embedded PostgreSQL...", flush=True)

    import django
    import uvicorn

    django.setup()  # starts the embedded server when there is no DATABASE_URL
    from django.core.management import call_command
    from django.db import connections

    from testproject import pgserver

    embedded = pgserver.current()
    try:
        print(_database_line(), flush=True)
        call_command("migrate", verbosity=1)
        call_command("load_sample")
        # As at the end of a request: this thread serves none, and /pool/ would count
        # its connections as in use for as long as the demo runs.
        connections.close_all()
        from testproject.asgi import application

        config = uvicorn.Config(
            application,
            host=args.host,
            port=args.port,
            workers=1,
            lifespan="on",  # django_asyncpool.asgi closes the pools at shutdown
            access_log=args.access_log,
            log_level="info" if args.access_log else "warning",
        )
        server = uvicorn.Server(config)
        # uvicorn shuts down gracefully on Ctrl-C, then raises the signal again.
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(server, f"http://{args.host}:{args.port}"))
        print("Stopping: web server stopped, closing the pools...", flush=True)
        return 0
    finally:
        for conn in connections.all():
            conn.close()
            conn.close_pool()  # before the server goes, so no pool worker tries to reconnect
        if embedded is not None:
            embedded.stop()
            if embedded.is_running():
                print(
                    f"The embedded PostgreSQL did not stop; stop it with: {embedded.bin}/pg_ctl "
                    f"-D {embedded.datadir} stop",
                    file=sys.stderr,
                )
            else:
                shutil.rmtree(embedded.socket_dir, ignore_errors=True)  # made anew each start
                print("Embedded PostgreSQL stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
