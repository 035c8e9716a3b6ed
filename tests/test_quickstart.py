"""docs/quickstart.md, followed as a newcomer would, in an empty temporary folder.

Its files are written from its own blocks (a block's first line names the file; "add at
the end" appends), its commands run as shown (``$ ...`` lines of its console blocks,
in a shell whose ``python`` and ``uvicorn`` are this virtualenv's), and what a console
block shows after a command must be in what the command printed. Only the lines that
set up the folder and the virtualenv are skipped: this virtualenv has the package.
The database is the page's own (user ``app``, database ``app``) on the embedded server.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from testproject import pgserver

from .conftest import wait_until
from .test_docs import DOCS, samples

pytestmark = pytest.mark.slow

PAGE = DOCS / "quickstart.md"
#: Commands that make the folder and the virtualenv: done already.
SETUP = re.compile(r"^(mkdir|cd|python3 -m venv|\. |source|pip install)")
#: The first line of a block that is a file: "# shop/views.py" or "# x.py: add at the end".
FILE = re.compile(r"^# (?P<path>[\w/]+\.py)(?P<append>: add at the end)?$")


@pytest.fixture
def database(pg: pgserver.LocalPostgres) -> Iterator[None]:
    """The page's user and database, as `docker run ... POSTGRES_USER=app` makes them."""
    pg.psql("create role app login password 'secret'")
    pg.psql("create database app owner app")
    try:
        yield
    finally:
        pg.psql("drop database app with (force)")
        pg.psql("drop role app")


def _pattern(shown: str) -> re.Pattern[str]:
    """Return a regex for a line a console block shows: any number, any run of blanks."""
    parts = re.split(r"(\.\.\.|\d+(?:\.\d+)?| +)", shown)
    return re.compile(
        "".join(
            ".*"
            if part == "..."
            else r"\d+(?:\.\d+)?"
            if part[:1].isdigit()
            else " +"
            if part.startswith(" ")
            else re.escape(part)
            for part in parts
        )
    )


def _steps(text: str) -> Iterator[tuple[str, str, str]]:
    """Yield ("file", path, code), ("append", path, code) or ("run", command, shown)."""
    blocks = samples(text, PAGE.name, frozenset({"python", "console"}))
    for block in blocks:
        if block.lang == "python":
            first = FILE.match(block.code.splitlines()[0])
            if first:
                yield ("append" if first["append"] else "file"), first["path"], block.code
            continue
        command = None
        shown: list[str] = []
        for line in [*block.code.splitlines(), "$ "]:
            if line.startswith("$ "):
                if command is not None:
                    yield "run", command, "\n".join(shown)
                command, shown = line[2:], []
            else:
                shown.append(line)


@pytest.mark.usefixtures("database")
def test_the_quickstart_from_an_empty_folder(pg: pgserver.LocalPostgres) -> None:
    if not shutil.which("curl"):
        pytest.skip("needs curl (apt-get install curl), as the page does")
    folder = Path(tempfile.mkdtemp(prefix="quickstart-"))
    port = pgserver.free_port()
    env = {
        k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "DJANGO_SETTINGS_MODULE"}
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONUNBUFFERED"] = "1"
    server: subprocess.Popen[str] | None = None
    ran: list[str] = []
    try:
        for kind, what, body in _steps(PAGE.read_text()):
            if kind == "file":
                (folder / what).write_text(body)
                continue
            if kind == "append":
                with (folder / what).open("a") as file:
                    file.write("\n" + body)
                continue
            command = what.replace("5432", str(pg.port)).replace("8000", str(port))
            if SETUP.match(command):
                continue
            ran.append(what)
            if command.startswith("export "):
                name, value = command.removeprefix("export ").split("=", 1)
                env[name] = value
                continue
            if command.startswith("uvicorn "):
                server = proc = subprocess.Popen(
                    command.split(),
                    cwd=folder,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                assert _listening(proc, port), proc.communicate()[0]
                continue
            done = subprocess.run(
                ["bash", "-c", command],
                cwd=folder,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            printed = done.stdout + done.stderr
            assert done.returncode == 0, f"$ {command}\n{printed}"
            assert pgserver.PASSWORD not in printed and "secret" not in printed
            lines = [line.rstrip() for line in printed.splitlines()]
            for shown in body.splitlines():
                if shown.strip() and shown.strip() != "...":
                    pattern = _pattern(shown.rstrip())
                    assert any(pattern.fullmatch(line) for line in lines), (
                        f"$ {command}\nthe page shows:\n{shown}\nit printed:\n{printed}"
                    )
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            out, _ = server.communicate(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
    assert server is not None and server.returncode == 0, out
    assert "lifespan" not in out and "Traceback" not in out, out
    # The page's path, in order: from an empty folder to a served async view, its
    # /metrics and the health check.
    assert [c.split(" http")[0] for c in ran] == [
        "django-admin startproject mysite .",
        "python manage.py startapp shop",
        "export DATABASE_URL=postgresql://app:secret@127.0.0.1:5432/app",
        "python manage.py check",
        "python manage.py makemigrations shop",
        "python manage.py migrate",
        "uvicorn mysite.asgi:application --port 8000",
        "curl -s -X POST -d sku=QS-1 -d name=teapot -d price_cents=1250",
        "curl -s",
        "curl -s",
        "curl -s",
        "python manage.py dbpool_check",
    ], ran


def _listening(proc: subprocess.Popen[str], port: int) -> bool:
    """Wait until ``proc`` listens on ``port``; return False if it exits first."""

    def answered() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(lambda: proc.poll() is not None or answered(), 60)
    return proc.poll() is None and answered()
