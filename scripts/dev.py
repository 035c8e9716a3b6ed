#!/usr/bin/env python3
"""Set up a virtualenv and run the demo or the test suite: the README's two commands.

    python3 scripts/dev.py demo     # the demo on an embedded PostgreSQL (or DATABASE_URL)
    python3 scripts/dev.py test     # the whole test suite (pytest arguments may follow)
    python3 scripts/dev.py docs     # build the docs site into build/site (strict, offline)
    python3 scripts/dev.py docs serve   # serve it at http://127.0.0.1:8000, live reload

More, for the version matrix CI runs:

    python3 scripts/dev.py django-suite     # Django's own test suite on the ENGINE
    python3 scripts/dev.py venv             # print the virtualenv's path (set it up first)

    --python VERSION|PATH   another interpreter (3.13 is looked up in pyenv and on PATH)
    --django SPEC           another Django, a pip specifier such as '>=6.1,<6.2'

These two options go before the command's own arguments. Without them the
virtualenv is .venv (or $ASYNCPOOL_VENV) made with the Python running this script;
with them it is .venvs/py<VERSION>-django<SPEC>, one per combination. A virtualenv
is rebuilt when pyproject.toml, its Python or its Django specifier changes. When no
interpreter matches --python, the script exits with status 3 and says so.

Needs only Python >= 3.11.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {"demo", "test", "django-suite", "venv", "docs"}
#: The exit status when the interpreter asked for with --python does not exist here.
NO_INTERPRETER = 3


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _version_of(python: str) -> tuple[int, int] | None:
    """Return (major, minor) of an interpreter, or None when it does not run."""
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    major, minor = out.split(".")
    return int(major), int(minor)


def find_python(wanted: str) -> str | None:
    """Return an interpreter for ``wanted`` (a path or a version such as ``3.13``)."""
    if os.sep in wanted:
        return wanted if _version_of(wanted) else None
    if not re.fullmatch(r"3\.\d+", wanted):
        sys.exit(f"--python takes a version such as 3.13 or a path, not {wanted!r}.")
    target = tuple(int(part) for part in wanted.split("."))
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates = sorted(
        glob.glob(os.path.join(pyenv_root, "versions", f"{wanted}.*", "bin", "python3")),
        key=lambda path: [int(n) for n in re.findall(r"\d+", Path(path).parent.parent.name)],
        reverse=True,
    )
    candidates += [shutil.which(f"python{wanted}") or "", sys.executable]
    for candidate in candidates:
        if candidate and _version_of(candidate) == target:
            return candidate
    return None


def _slug(spec: str) -> str:
    """Return a directory-name form of a pip specifier: '>=6.1,<6.2' -> 'ge6.1-lt6.2'."""
    words = {">=": "ge", "<=": "le", "==": "eq", "~=": "compat", "!=": "ne", ">": "gt", "<": "lt"}
    parts = []
    for clause in spec.replace(" ", "").split(","):
        match = re.fullmatch(r"(>=|<=|==|~=|!=|>|<)?([0-9A-Za-z.*]+)", clause)
        if not match:
            sys.exit(f"--django takes a pip specifier such as '>=6.1,<6.2', not {spec!r}.")
        parts.append(words.get(match.group(1) or "==", "") + match.group(2))
    return "-".join(parts)


def ensure_venv(python_wanted: str | None = None, django_spec: str | None = None) -> Path:
    """Return the virtualenv's python, creating or updating the virtualenv first."""
    base = sys.executable
    if python_wanted is not None:
        found = find_python(python_wanted)
        if found is None:
            log(f"No Python {python_wanted} on this machine (looked in pyenv and on PATH).")
            sys.exit(NO_INTERPRETER)
        base = found
    version = _version_of(base)
    if version is None or version < (3, 11):
        sys.exit(f"django-asyncpool needs Python >= 3.11; {base} is {version}.")
    if python_wanted is None and django_spec is None:
        home = Path(os.environ.get("ASYNCPOOL_VENV", ROOT / ".venv"))
    else:
        name = f"py{version[0]}.{version[1]}-django{_slug(django_spec) if django_spec else ''}"
        home = ROOT / ".venvs" / name
    python = home / "bin" / "python"
    stamp = home / ".pyproject.sha256"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    if python_wanted or django_spec:  # the plain .venv keeps the stamp it always had
        digest.update(f"\0{base}\0{django_spec or ''}".encode())
    want = digest.hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python
    log(f"Setting up {home} (once; again when pyproject.toml changes)...")
    if python.exists() and _version_of(str(python)) != version:
        shutil.rmtree(home)
    if not python.exists():
        subprocess.run([base, "-m", "venv", str(home)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # pip's own output goes to stderr: `dev.py venv` prints only the path on stdout.
    subprocess.run([*pip, "--upgrade", "pip"], check=True, stdout=sys.stderr)
    extra = [f"django{django_spec}"] if django_spec else []
    subprocess.run([*pip, "-e", f"{ROOT}[dev]", *extra], check=True, stdout=sys.stderr)
    stamp.write_text(want)
    return python


def _options(argv: list[str]) -> tuple[str | None, str | None, list[str]]:
    """Split ``--python X`` and ``--django SPEC`` off the front of ``argv``."""
    python_wanted = django_spec = None
    while argv and argv[0] in {"--python", "--django"}:
        if len(argv) < 2:
            sys.exit(f"{argv[0]} needs a value.")
        if argv[0] == "--python":
            python_wanted = argv[1]
        else:
            django_spec = argv[1]
        argv = argv[2:]
    return python_wanted, django_spec, argv


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        return 2
    command = argv[0]
    python_wanted, django_spec, rest = _options(argv[1:])
    python = ensure_venv(python_wanted, django_spec)
    os.chdir(ROOT)
    if command == "venv":
        print(python.parent.parent)
        return 0
    if command == "test":
        run([str(python), "-m", "pytest", *rest])
    if command == "docs":
        # mkdocs-material prints a banner about its successor unless told not to.
        env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
        args = rest if rest[:1] in (["serve"], ["build"]) else ["build", "--strict", *rest]
        run([str(python), "-m", "mkdocs", *args], env)
    if command == "django-suite":
        run([str(python), str(ROOT / "scripts" / "django-suite.py"), *rest])
    run([str(python), str(ROOT / "scripts" / "demo.py"), *rest])


def run(args: list[str], env: Mapping[str, str] | None = None) -> NoReturn:
    """Become the program ``args`` (exec): signals sent to this process reach it directly.

    A child would not get them: subprocess.call() kills it 0.25 s after Ctrl-C (before
    the demo has stopped its embedded PostgreSQL), and a SIGTERM (docker stop, systemd)
    would end this process alone. The exit status is the program's own.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(args[0], args, os.environ if env is None else env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
