#!/usr/bin/env python3
"""Set up a virtualenv and run the demo or the test suite: the README's two commands.

    python3 scripts/dev.py demo     # the demo on an embedded PostgreSQL (or DATABASE_URL)
    python3 scripts/dev.py test     # the whole test suite (pytest arguments may follow)

Needs only Python >= 3.11. The virtualenv lives in .venv (or $ASYNCPOOL_VENV) and
is rebuilt when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ensure_venv() -> Path:
    """Return the virtualenv's python, creating or updating the virtualenv first."""
    home = Path(os.environ.get("ASYNCPOOL_VENV", ROOT / ".venv"))
    python = home / "bin" / "python"
    stamp = home / ".pyproject.sha256"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python
    if sys.version_info < (3, 11):  # noqa: UP036 - this script may run on an older Python
        sys.exit(f"django-asyncpool needs Python >= 3.11; this is {sys.version.split()[0]}.")
    print(f"Setting up {home} (once; again when pyproject.toml changes)...", flush=True)
    if not python.exists():
        venv.EnvBuilder(with_pip=True).create(home)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[dev]"], check=True)
    stamp.write_text(want)
    return python


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test"}:
        print(__doc__)
        return 2
    python = ensure_venv()
    os.chdir(ROOT)
    if argv[0] == "test":
        return subprocess.call([str(python), "-m", "pytest", *argv[1:]])
    return subprocess.call([str(python), str(ROOT / "scripts" / "demo.py"), *argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
