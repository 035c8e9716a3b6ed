"""``manage.py dbpool_check`` against a real server: healthy, stopped, blackholed, misconfigured."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from testproject.pgserver import PASSWORD
from tests.proxy import TcpProxy

from .conftest import closed_port
from .test_docs import samples

ROOT = Path(__file__).resolve().parent.parent
SECRET = "hunter2-never-printed"
# Small pools and few retries: a failing probe gives up quickly on its own.
QUICK = {
    "pool": {"min_size": 0, "max_size": 2, "timeout": 3},
    "async_pool": {"pool_size": 2, "max_overflow": 0, "timeout": 3},
    "retry": {"max_tries": 2, "max_time": 1},
}


pytestmark = pytest.mark.usefixtures("db_access")  # the probe threads connect


def dbpool_check(*args: str) -> tuple[int, str, float]:
    """Run the command in this process; return (exit status, stdout + error, seconds taken).

    The error (what manage.py prints on stderr) follows the output on a line of its own.
    """
    out = io.StringIO()
    started = time.monotonic()
    try:
        call_command("dbpool_check", *args, stdout=out)
        code, error = 0, ""
    except CommandError as exc:  # what manage.py turns into the exit status
        code, error = exc.returncode, str(exc)
    return code, f"{out.getvalue()}\n{error}", time.monotonic() - started


def test_healthy(alias: Callable[..., str]) -> None:
    name = alias()
    code, out, _ = dbpool_check("--database", name)
    assert code == 0, out
    row = {line.split()[1]: line for line in out.splitlines() if line.startswith(name + " ")}
    assert set(row) == {"sync", "async"}
    for line in row.values():
        assert " ok " in line and "closed (0 failures)" in line and " ms " in line
    assert out.strip().splitlines()[-1].startswith("healthy (")


def test_json_output(alias: Callable[..., str]) -> None:
    name = alias()
    code, out, _ = dbpool_check("--database", name, "--format", "json")
    assert code == 0
    assert PASSWORD not in out
    report = json.loads(out.rsplit("\n", 1)[0])
    assert report["healthy"] is True and report["exit_code"] == 0 and report["problems"] == []
    (entry,) = report["aliases"]
    assert entry["alias"] == name and entry["healthy"] is True
    assert entry["breaker"] == {"state": "closed", "failures": 0, "storage": {"storage": "local"}}
    for side in ("sync", "async"):
        probe = entry[side]
        assert probe["ok"] is True and probe["error"] is None
        assert int(probe["server_version"].split(".")[0]) >= 13
        assert probe["connect_ms"] >= 0 and probe["query_ms"] > 0
    assert entry["sync"]["pool"]["max_size"] == 2 and entry["sync"]["pool"]["in_use"] == 0
    assert entry["async"]["pool"]["in_use"] == 0 and entry["async"]["pool"]["idle"] == 1


@pytest.mark.slow
def test_server_stopped(alias: Callable[..., str], server_down: Callable[[], None]) -> None:
    name = alias(PASSWORD=SECRET)
    server_down()
    code, out, took = dbpool_check("--database", name, "--timeout", "5")
    assert code == 1, out
    assert took < 6
    assert "UNHEALTHY" in out and f"{name} (sync): DatabaseUnavailable" in out
    assert f"{name} (async): DatabaseUnavailable" in out
    assert SECRET not in out


@pytest.mark.slow
def test_blackholed_link_never_hangs(alias: Callable[..., str], proxy: TcpProxy) -> None:
    # No connect_timeout anywhere: only the command's own deadlines bound the probes.
    name = alias(HOST=proxy.host, PORT=proxy.port, OPTIONS={**QUICK, "pool": {"timeout": 30}})
    proxy.blackhole()
    try:
        code, out, took = dbpool_check("--database", name, "--timeout", "2", "--format", "json")
    finally:
        proxy.cut()  # ends the hung connections, so nothing is left half-open
    assert code == 1, out
    assert took < 5  # --timeout 2, plus process work on a loaded 2-core machine
    entry = json.loads(out.rsplit("\n", 1)[0])["aliases"][0]
    assert entry["healthy"] is False
    assert "timed out" in entry["sync"]["error"] and "timed out" in entry["async"]["error"]


def test_two_aliases_one_down(alias: Callable[..., str]) -> None:
    up = alias()
    down = alias(HOST="127.0.0.1", PORT=closed_port(), PASSWORD=SECRET)
    code, out, took = dbpool_check("--database", up, "--database", down, "--format", "json")
    assert code == 1
    assert took < 10
    assert SECRET not in out
    entries = {e["alias"]: e for e in json.loads(out.rsplit("\n", 1)[0])["aliases"]}
    assert entries[up]["healthy"] is True
    assert entries[down]["healthy"] is False
    assert "Connection refused" in entries[down]["sync"]["error"]
    assert entries[down]["async"]["ok"] is False


def test_bad_configuration_exits_2(alias: Callable[..., str]) -> None:
    name = alias(OPTIONS={**QUICK, "async_pool": {"pool_size": 0}})
    code, out, _ = dbpool_check("--database", name)
    assert code == 2
    assert "dbpool.E003" in out and f"'{name}' OPTIONS['async_pool']['pool_size']" in out
    assert "CONFIGURATION ERRORS" in out


def test_unknown_alias_exits_2() -> None:
    code, out, _ = dbpool_check("--database", "nope")
    assert code == 2
    assert "nope" in out and "Use one of: default, replica" in out


def manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python manage.py dbpool_check ARGS`` in production mode (DEBUG off)."""
    return subprocess.run(
        [sys.executable, "manage.py", "dbpool_check", *args],
        cwd=ROOT,
        env={**os.environ, "DJANGO_DEBUG": "0", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_real_command_line() -> None:
    """``python manage.py dbpool_check``: the project's aliases, its exit status."""
    done = manage("--timeout", "20")
    assert done.returncode == 0, done.stdout + done.stderr
    # The columns are as wide as the longest alias.
    assert re.search(r"(?m)^default +sync +ok", done.stdout), done.stdout
    assert re.search(r"(?m)^replica +async +ok", done.stdout), done.stdout
    assert re.search(r"(?m)^replica_native +sync +ok", done.stdout), done.stdout

    # DB_POOL_SIZE fills async_pool of 'replica', which sets none itself.
    done = manage("--format", "json", DB_POOL_SIZE="lots")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "CommandError: configuration errors" in done.stderr
    (problem,) = json.loads(done.stdout)["problems"]
    assert problem["id"] == "dbpool.E002" and problem["key"] == "DB_POOL_SIZE"


def test_budget_and_the_servers_room(alias: Callable[..., str]) -> None:
    first, second = alias(), alias()  # QUICK: 2 sync + 2 async each, one server
    code, out, _ = dbpool_check("--database", first, "--database", second, "--format", "json")
    assert code == 0, out
    report = json.loads(out)
    for entry in report["aliases"]:
        assert entry["budget"]["per_process"] == 2 + 2
    (server,) = report["servers"]
    assert server["aliases"] == [first, second] and server["per_process"] == 8
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("select current_setting('max_connections')::int")
        (max_connections,) = cursor.fetchone()
    assert server["max_connections"] == max_connections
    assert 3 <= server["reserved_connections"] < max_connections
    assert server["processes_fit"] == server["available"] // 8
    code, out, _ = dbpool_check("--database", first)
    assert f"{first}: 4 = sync max_size 2 + async 2" in out
    assert re.search(r"server \S+ \(" + first + r"\): max_connections \d+ - \d+ reserved", out)
    assert "WARNING" not in out


def test_warns_when_one_process_alone_does_not_fit(alias: Callable[..., str]) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("select current_setting('max_connections')::int")
        (max_connections,) = cursor.fetchone()
    big = alias(OPTIONS={**QUICK, "async_pool": {"pool_size": max_connections, "max_overflow": 0}})
    code, out, _ = dbpool_check("--database", big)
    assert code == 0, out  # a warning: the probes themselves passed
    assert "0 processes fit" in out
    assert f"WARNING: one process may open {max_connections + 2} connections" in out
    assert "OPTIONS['async_pool']" in out


# -- what the docs show of it ----------------------------------------------------------------

DOCS = ROOT / "docs"
#: A table row of the command's output: ALIAS POOL STATUS ... STATS.
ROW = re.compile(r"^\S+ +(sync|async) +(ok|FAILED) .*  (?P<stats>\S.*)$")
STATS = re.compile(r"size \d+/\d+, idle \d+, in use \d+, waiting \d+|-")


def _console_samples() -> list[tuple[str, str]]:
    """Return (page, output) of every console sample of ``manage.py dbpool_check``."""
    found = []
    for page in [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]:
        for block in samples(page.read_text(), page.name, frozenset({"console", ""})):
            if block.code.startswith("$ python manage.py dbpool_check\n"):
                found.append((page.name, block.code.split("\n", 1)[1]))
    return found


def test_the_docs_show_the_table_as_the_command_prints_it() -> None:
    _, real, _ = dbpool_check("--database", "default")
    header = real.splitlines()[0].split()
    shown = _console_samples()
    assert {page for page, _ in shown} >= {"command.md", "quickstart.md"}
    for page, output in shown:
        lines = output.splitlines()
        assert lines[0].split() == header, page
        rows = [ROW.match(line) for line in lines[1:] if ROW.match(line)]
        assert rows, f"{page}: no row of the table"
        for row in rows:
            assert STATS.fullmatch(row["stats"]), f"{page}: {row.group(0)}"


def _unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys)), f"a key given twice: {keys}"
    return dict(pairs)


def test_the_json_schema_has_the_reports_keys_each_once() -> None:
    (sample,) = samples((DOCS / "command.md").read_text(), "command.md", frozenset({"json"}))
    # The sample's comments and elisions out: "redis://" has no blank before its slashes.
    text = re.sub(r"\s+//.*$", "", sample.code, flags=re.M).replace(", ...}", "}")
    shown = json.loads(text, object_pairs_hook=_unique)
    out = io.StringIO()
    call_command("dbpool_check", "--format", "json", "--database", "default", stdout=out)
    real = json.loads(out.getvalue())
    assert shown.keys() == real.keys()
    (entry,) = real["aliases"]
    assert shown["aliases"][0].keys() == entry.keys()
    for side in ("sync", "async"):
        assert shown["aliases"][0][side].keys() == entry[side].keys()
    assert shown["aliases"][0]["breaker"].keys() == entry["breaker"].keys()


def test_each_thing_reported_is_listed_once() -> None:
    text = (DOCS / "command.md").read_text().split("```")[0]
    bullets = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(bullets) == len({b.split(",")[0].split(":")[0] for b in bullets}), bullets
