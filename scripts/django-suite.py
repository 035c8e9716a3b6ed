#!/usr/bin/env python3
"""Run Django's own test suite against ENGINE django_asyncpool, the pool on.

    python3 scripts/dev.py django-suite [options] [test labels]
    .venv/bin/python scripts/django-suite.py [options] [test labels]

Takes the Django installed in the running interpreter, fetches that version's
source distribution from PyPI with pip (it holds tests/ and runtests.py) into
.cache/django-suite/, installs the few packages the chosen test modules need,
writes a settings module with the aliases ``default`` and ``other`` on the ENGINE
with its pool on, and runs ``runtests.py --parallel 2`` on the database-heavy
modules (or on the labels given). The database is DATABASE_URL's server, or an
embedded PostgreSQL started for the run and deleted after it.

The ENGINE declares the failures that the test environment causes (not the ENGINE)
only while this runs: see django_asyncpool/features.py.

``--green-asgi`` serves Django's ASGI tests with django_asyncpool's handler (Django's
own sync request parts not in a thread, docs/async-orm.md "The request path"), gives the
test ``AsyncClient`` its middleware hooks, turns ``async_orm`` on, and runs the modules
of GREEN_MODULES.

``--async-orm`` turns ``OPTIONS["async_orm"]`` on for both aliases (Django's async
QuerySet API runs natively, docs/async-orm.md) and runs the modules whose tests use
that API (``tests/async/`` first). Every test process writes how many operations ran
natively, which fell back to the thread path (counted by the package), and which of
Django's ORM functions went to a thread through ``sync_to_async`` all the same; the
script prints the sums and fails when nothing ran natively.

Django's ``TestCase`` keeps a transaction open on the test thread's connection, so a
native call there runs on that connection (counted as "in the caller's transaction").
``--pooled`` (with ``--async-orm``) runs the TestCases that have async tests as Django
runs them on a database without transactions (data set up before each test, tables
flushed after): their native calls then take connections from the async ORM's pool.

The last line reads "django-suite: N passed, N failed, N skipped"; the exit
status is runtests.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "django-suite"

#: The database-heavy test modules of Django's suite (issue 7).
MODULES = [
    "backends",
    "transactions",
    "transaction_hooks",
    "basic",
    "queries",
    "async",
    "db_utils",
    "select_for_update",
    "model_fields",
    "expressions",
    "aggregation",
    "migrations",
    "schema",
    "introspection",
    "inspectdb",
    "bulk_create",
    "get_or_create",
    "update",
    "delete",
    "fixtures",
    "serializers",
    "test_utils",
    "multiple_database",
    "prefetch_related",
    "select_related",
    "raw_query",
    "lookup",
    "ordering",
    "timezones",
    "datetimes",
    "many_to_many",
    "many_to_one",
    "one_to_one",
    "model_inheritance",
    "defer",
    "annotations",
    "handlers",
    "asgi",
]

#: The modules whose ``async def test...`` tests call the async ORM (``--async-orm``):
#: tests/async/ (QuerySets, model methods, related managers, auth, shortcuts), then auth's
#: async API, asave() (basic, update_only_fields: Django 5.2), generic relations, sessions
#: and AsyncPaginator (Django 6). Found by grepping each version's tests for awaited
#: async ORM methods; a label a version lacks tests for runs nothing there.
ASYNC_ORM_MODULES = [
    "async",
    "auth_tests",
    "basic",
    "generic_relations",
    "pagination",
    "sessions_tests",
    "update_only_fields",
]

#: The modules that serve requests through ASGIHandler or the AsyncClient's middleware
#: (``--green-asgi``): django_asyncpool's request path against Django's own tests.
GREEN_MODULES = [
    "handlers",
    "asgi",
    "middleware",
    "csrf_tests",
    "sessions_tests",
    "auth_tests",
    "messages_tests",
]

#: What these modules need beyond Django's own dependencies (names as in
#: tests/requirements/py3.txt): tblib carries tracebacks out of the parallel
#: workers, PyYAML runs the YAML serializer and fixture tests.
REQUIREMENTS = {"tblib": "tblib", "PyYAML": "yaml"}

SETTINGS = '''\
"""Written by django-asyncpool's scripts/django-suite.py: Django's tests on its ENGINE.

Django's own test settings of this version (test_sqlite.py), with both aliases on
the ENGINE, its pool on.
"""

import os

from django_asyncpool.config import parse_url
from test_sqlite import *  # noqa: F403

_db = parse_url(os.environ["ASYNCPOOL_SUITE_DATABASE_URL"])


def _alias(name):
    return {{
        "ENGINE": {engine!r},
        "NAME": name,
        "USER": _db["USER"],
        "PASSWORD": _db["PASSWORD"],
        "HOST": _db["HOST"],
        "PORT": _db["PORT"],
        "CONN_MAX_AGE": 0,
        "OPTIONS": {{**_db["OPTIONS"], **{options!r}}},
    }}


DATABASES = {{"default": _alias("django_default"), "other": _alias("django_other")}}

if {green!r}:
    # --green-asgi: Django's ASGI handler is django_asyncpool's (its own sync parts not in
    # a thread), and so are the middleware hooks of the test AsyncClient's handler.
    import django.core.asgi
    import django.core.handlers.asgi
    import django.test.client

    from django_asyncpool.orm.handler import GreenASGIHandler, GreenMiddleware

    def _get_asgi_application():
        import django

        django.setup(set_prefix=False)
        return GreenASGIHandler()

    django.core.asgi.get_asgi_application = _get_asgi_application
    django.core.handlers.asgi.ASGIHandler = GreenASGIHandler
    django.test.client.AsyncClientHandler = type(
        "AsyncClientHandler", (GreenMiddleware, django.test.client.AsyncClientHandler), {{}}
    )

if {async_orm!r}:
    import atexit
    import collections
    import json
    import multiprocessing.util

    from asgiref.sync import SyncToAsync

    #: The ORM's own functions that still went to a thread (sync_to_async), by name.
    _hops = collections.Counter()
    _call = SyncToAsync.__call__

    async def _counted(self, *args, **kwargs):
        module = getattr(self.func, "__module__", "") or ""
        if module.startswith({hop_modules!r}):
            _hops[getattr(self.func, "__qualname__", "?")] += 1
        return await _call(self, *args, **kwargs)

    SyncToAsync.__call__ = _counted

    def _report():
        """Write this process's native operations and fallbacks (scripts/django-suite.py)."""
        from django_asyncpool.orm import native as _asyncorm
        from django_asyncpool.core import registry as _registry

        sides = [stats for alias, side, stats in _registry.all_stats() if side == "async_orm"]
        fallbacks = {{}}
        for stats in sides:
            for method, count in stats.fallbacks.items():
                fallbacks[method] = fallbacks.get(method, 0) + count
        report = {{
            # Pooled checkouts, and calls run on the caller's connection (its transaction).
            "native": sum(s.checkouts for s in sides) + sum(_asyncorm.borrowed.values()),
            "borrowed": sum(_asyncorm.borrowed.values()),
            "fallbacks": fallbacks,
            "hops": dict(_hops),
        }}
        path = os.path.join(os.environ["ASYNCPOOL_SUITE_REPORTS"], f"{{os.getpid()}}.json")
        with open(path, "w") as file:
            json.dump(report, file)

    class _Worker:
        """A worker of the parallel runner leaves through os._exit(), after the finalizers
        of multiprocessing: the report is one, registered once the worker has cleared the
        ones it inherited."""

        def __call__(self):
            multiprocessing.util.Finalize(None, _report, exitpriority=100)

    _worker = _Worker()
    atexit.register(_report)
    multiprocessing.util.register_after_fork(_worker, _Worker.__call__)

if {pooled!r}:
    import inspect
    import unittest

    from django.test import TestCase

    _supports_transactions = TestCase._databases_support_transactions.__func__

    def _transactions(cls):
        """False for a TestCase with async tests: Django then runs it as it does on a
        database without transactions (setUpTestData before each test, a flush after),
        so the native calls take pooled connections instead of the test's own. Its sync
        tests are skipped: the run without --pooled runs them (some count the queries
        of a transaction, which BEGIN and COMMIT join without the test's own)."""
        tests = {{name: getattr(cls, name) for name in dir(cls) if name.startswith("test")}}
        if not any(inspect.iscoroutinefunction(test) for test in tests.values()):
            return _supports_transactions(cls)
        for name, test in tests.items():
            if callable(test) and not inspect.iscoroutinefunction(test):
                setattr(cls, name, unittest.skip("a sync test (--pooled)")(test))
        return False

    TestCase._databases_support_transactions = classmethod(_transactions)
    _teardown = TestCase._fixture_teardown

    def _fixture_teardown(self):
        """Flush with CASCADE: the test settings swap the user model, and tables of models
        not in the app registry of this run still reference auth's tables."""
        if _transactions(type(self)):
            return _teardown(self)
        from django.core.management import call_command

        for db_name in self._databases_names(include_mirrors=False):
            call_command(
                "flush", verbosity=0, interactive=False, database=db_name, allow_cascade=True
            )

    TestCase._fixture_teardown = _fixture_teardown
'''


def log(message: str) -> None:
    print(f"django-suite: {message}", flush=True)


def fetch_tests(version: str) -> Path:
    """Return Django ``version``'s tests/ directory, downloading its sdist once."""
    tests = CACHE / f"django-{version}" / "tests"
    if (tests / "runtests.py").exists():
        return tests
    CACHE.mkdir(parents=True, exist_ok=True)
    log(f"fetching the source distribution of Django {version} from PyPI...")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dest",
                tmp,
                f"django=={version}",
            ],
            check=True,
        )
        (sdist,) = Path(tmp).glob("*.tar.gz")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.split("/")[1:2] == ["tests"]]
            tar.extractall(unpacked, members=members, filter="data")
        (top,) = unpacked.iterdir()
        shutil.rmtree(tests.parent, ignore_errors=True)
        tests.parent.mkdir(parents=True)
        (top / "tests").rename(tests)
    return tests


def install_requirements(tests: Path) -> None:
    """Install the packages of REQUIREMENTS that are missing, as this Django pins them."""
    import importlib.util

    wanted = {}
    for line in (tests / "requirements" / "py3.txt").read_text().splitlines():
        name = re.split(r"[\s<>=!~;\[]", line.strip(), maxsplit=1)[0]
        if name in REQUIREMENTS:
            wanted[name] = line.split(";")[0].strip()
    missing = [
        wanted.get(name, name)
        for name, module in REQUIREMENTS.items()
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        log(f"installing {', '.join(missing)}...")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                *missing,
            ],
            check=True,
        )


def has_icu(url: str) -> bool:
    """Return whether the server at ``url`` has ICU collations (built --with-icu)."""
    import psycopg

    with psycopg.connect(url, connect_timeout=10) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_collation WHERE collprovider = 'i' AND collname LIKE %s",
            ["%-x-icu"],
        ).fetchone()
    return bool(row and row[0])


def summarize(output: str) -> tuple[int, int, int]:
    """Return (passed, failed, skipped) from unittest's closing lines."""
    ran = re.findall(r"^Ran (\d+) tests? in", output, re.MULTILINE)
    result = re.findall(r"^(OK|FAILED)(?: \((.*)\))?$", output, re.MULTILINE)
    if not ran or not result:
        return 0, 0, 0
    counts = {
        key.strip(): int(value)
        for key, value in re.findall(r"([a-z ]+)=(\d+)", result[-1][1] or "")
    }
    failed = counts.get("failures", 0) + counts.get("errors", 0)
    failed += counts.get("unexpected successes", 0)
    skipped = counts.get("skipped", 0) + counts.get("expected failures", 0)
    return int(ran[-1]) - failed - skipped, failed, skipped


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("labels", nargs="*", help="test labels (default: the modules of issue 7)")
    parser.add_argument("--parallel", default="2", help="runtests.py --parallel (default: 2)")
    parser.add_argument(
        "--async-orm",
        action="store_true",
        help="OPTIONS['async_orm'] on; default labels: the modules of ASYNC_ORM_MODULES",
    )
    parser.add_argument(
        "--green-asgi",
        action="store_true",
        help="Django's ASGIHandler and the AsyncClient's middleware hooks are "
        "django_asyncpool's (no thread for Django's own sync parts); async_orm on; "
        "default labels: GREEN_MODULES",
    )
    parser.add_argument(
        "--pooled",
        action="store_true",
        help="with --async-orm: TestCases with async tests run without their transaction, "
        "so the native calls use the pool, not the test's connection",
    )
    parser.add_argument("-v", "--verbosity", default="1", help="runtests.py --verbosity")
    parser.add_argument(
        "--engine",
        default="django_asyncpool",
        help="ENGINE of both aliases, to compare with django.db.backends.postgresql",
    )
    parser.add_argument("--no-pool", action="store_true", help="run with OPTIONS['pool'] False")
    parser.add_argument("--failfast", action="store_true")
    args = parser.parse_args(argv)
    green_labels = args.green_asgi and not args.async_orm
    args.async_orm = args.async_orm or args.green_asgi  # the greenlet path needs it
    if args.pooled and not args.async_orm:
        parser.error("--pooled goes with --async-orm")

    import django

    version = django.get_version()
    py = ".".join(map(str, sys.version_info[:3]))
    tests = fetch_tests(version)
    install_requirements(tests)

    pool: object = False if args.no_pool else {"min_size": 1, "max_size": 10, "timeout": 10}
    (tests / "asyncpool_suite_settings.py").write_text(
        SETTINGS.format(
            engine=args.engine,
            options={"pool": pool, **({"async_orm": True} if args.async_orm else {})},
            async_orm=args.async_orm,
            green=args.green_asgi,
            # With --green-asgi: every function of Django's that still went to a thread.
            hop_modules=("django.",)
            if args.green_asgi
            else ("django.db", "django.contrib.contenttypes"),
            pooled=args.pooled,
        )
    )

    env = dict(os.environ)
    env["DJANGO_ASYNCPOOL_DJANGO_SUITE"] = "1"  # django_asyncpool.features.SUITE_ENV
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    default = GREEN_MODULES if green_labels else ASYNC_ORM_MODULES if args.async_orm else MODULES
    labels = args.labels or default
    reports = Path(tempfile.mkdtemp(prefix="django-suite-reports-"))
    env["ASYNCPOOL_SUITE_REPORTS"] = str(reports)
    if args.async_orm:
        # A native call runs on a connection of its own: one that waits for a lock held by
        # the transaction Django's TestCase keeps open on the test thread's connection would
        # wait forever (that thread waits for the test). libpq reads PGOPTIONS: a failure
        # after 10 s instead of a run that never ends.
        env["PGOPTIONS"] = f"{env.get('PGOPTIONS', '')} -c lock_timeout=10000".strip()
    command = [
        sys.executable,
        "-u",
        "runtests.py",
        "--settings=asyncpool_suite_settings",
        "--noinput",
        f"--parallel={args.parallel}",
        f"--verbosity={args.verbosity}",
        *(["--failfast"] if args.failfast else []),
        *labels,
    ]
    started = time.monotonic()
    with database(env.pop("DATABASE_URL", "")) as (url, where):
        env["ASYNCPOOL_SUITE_DATABASE_URL"] = url
        if not has_icu(url):
            log("the server has no ICU collations: libc's POSIX stands in for sv-x-icu")
            env["DJANGO_ASYNCPOOL_SUITE_NO_ICU"] = "1"  # features.NO_ICU_ENV
        log(
            f"Django {version} on Python {py}, ENGINE {args.engine}, pool "
            f"{'off' if args.no_pool else 'on'}, async_orm {'on' if args.async_orm else 'off'}"
            f"{' (pooled)' if args.pooled else ''}, "
            f"ASGI handler {'django_asyncpool' if args.green_asgi else 'Django'}, "
            f"--parallel {args.parallel}, {where}, "
            f"{len(labels)} label(s)"
        )
        returncode, output = run(command, tests, env)
    (CACHE / f"last-django-{version}.log").write_text(output)
    passed, failed, skipped = summarize(output)
    log(f"Django {version}, Python {py}: {time.monotonic() - started:.0f}s, exit {returncode}")
    print(f"django-suite: {passed} passed, {failed} failed, {skipped} skipped", flush=True)
    if returncode == 0 and passed == 0:
        log("no test ran")
        return 1
    native = native_report(reports) if args.async_orm else None
    shutil.rmtree(reports, ignore_errors=True)
    if native == 0:
        log("async_orm is on, but no operation ran natively")
        return 1
    return returncode


def native_report(reports: Path) -> int:
    """Print what the test processes ran natively and what fell back; return the native count."""
    native, borrowed, fallbacks, hops = 0, 0, Counter[str](), Counter[str]()
    for path in reports.glob("*.json"):
        report = json.loads(path.read_text())
        native += report["native"]
        borrowed += report["borrowed"]
        fallbacks.update(report["fallbacks"])
        hops.update(report["hops"])
    print(
        f"django-suite: async_orm: {native} native operations ({borrowed} of them in the "
        "caller's transaction, on its connection), "
        f"{fallbacks.total()} counted fallbacks to the thread path ({listed(fallbacks)}); "
        f"the ORM's functions in a thread (sync_to_async): {listed(hops)}",
        flush=True,
    )
    return native


def listed(counts: Counter[str]) -> str:
    """Return ``name n, name n`` (most first), or "none"."""
    return ", ".join(f"{name} {n}" for name, n in counts.most_common()) or "none"


@contextlib.contextmanager
def database(url: str) -> Iterator[tuple[str, str]]:
    """Yield (url, description): DATABASE_URL's server, or an embedded one made for the run."""
    if url:
        yield url, "DATABASE_URL's server"
        return
    sys.path.insert(0, str(ROOT))
    from testproject.pgserver import LocalPostgres

    tmp = Path(tempfile.mkdtemp(prefix="django-suite-pg-"))
    server = LocalPostgres(tmp / "data")
    # A CI time-out (SIGTERM) unwinds through finally: the server is stopped and deleted.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        server.init()
        server.start()
        yield server.url("postgres"), f"an embedded PostgreSQL on {server.host}:{server.port}"
    finally:
        server.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


def run(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run ``command``, echoing its output; return its exit status and output."""
    lines: list[str] = []
    with subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                lines.append(line)
        except BaseException:
            proc.kill()
            raise
    return proc.returncode, "".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
