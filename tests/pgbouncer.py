"""A throwaway PgBouncer in transaction-pooling mode, in front of the test server.

``PgBouncer(pg, pool_size=4)`` starts the ``pgbouncer`` binary (Debian package
``pgbouncer``) on a free port; ``.host``/``.port`` is where clients connect and
``.stop()`` ends it. Its server pool holds ``pool_size`` connections per
database and user, so tests can drive more concurrency than it has servers.
``max_prepared_statements`` stays 0 (the only behaviour of PgBouncer < 1.21):
whatever works here works behind any PgBouncer.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from testproject.pgserver import LocalPostgres, free_port


def binary() -> str | None:
    """Return the path of the pgbouncer binary, or None when it is not installed."""
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/local/bin/pgbouncer") if os.path.exists(p)),
        None,
    )


class PgBouncer:
    """One pgbouncer process, transaction pooling, SCRAM auth with the server's password."""

    def __init__(self, pg: LocalPostgres, *, pool_size: int = 4, max_client_conn: int = 500):
        exe = binary()
        if exe is None:
            raise FileNotFoundError("pgbouncer is not installed (apt-get install pgbouncer)")
        self.host = "127.0.0.1"
        self.port = free_port()
        self.pool_size = pool_size
        self.dir = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
        # Quoted as the auth_file format wants; the password never leaves this file.
        (self.dir / "userlist.txt").write_text(f'"{pg.user}" "{pg.password}"\n')
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={pg.host} port={pg.port}\n"
            "[pgbouncer]\n"
            f"listen_addr = {self.host}\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = scram-sha-256\n"
            f"auth_file = {self.dir / 'userlist.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\n"
            "min_pool_size = 0\n"
            "reserve_pool_size = 0\n"
            f"max_client_conn = {max_client_conn}\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\n"
            "ignore_startup_parameters = extra_float_digits\n"
        )
        command = [exe, str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            # pgbouncer refuses to run as root; the server's own user will do.
            user = pg._run_as or "nobody"
            entry = pwd.getpwnam(user)
            for path in (self.dir, *self.dir.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            command[1:1] = ["-u", user]
        os.chmod(self.dir / "userlist.txt", 0o600)
        # Its log goes to stderr as well as the log file: into a file, never a pipe
        # nobody reads (a full pipe blocks pgbouncer, and every client with it).
        self._stderr = tempfile.TemporaryFile("w+", errors="replace")  # noqa: SIM115 (closed by stop)
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self._stderr)
        self._wait_listening()

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._stderr.seek(0)
                err = self._stderr.read()[-4000:]
                log = self.log()
                self.stop()
                raise RuntimeError(f"pgbouncer exited: {err.strip()}\n{log}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"pgbouncer did not listen within {timeout}s\n{self.log()}")

    def log(self) -> str:
        try:
            return (self.dir / "pgbouncer.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)
