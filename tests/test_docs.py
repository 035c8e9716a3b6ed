"""Every Python sample in docs/ and the README runs here, against the real test database.

The convention, kept small on purpose:

- Each fenced ```` ```python ```` block of a page runs, in page order, in one namespace
  per page: a later block may use what an earlier one defined (a tutorial reads that way).
- A block may ``await`` at top level; it runs on the test's event loop. A block
  without ``await`` runs in a worker thread, where the sync ORM is allowed.
- A block that cannot run (a settings or urls fragment) is marked by the HTML
  comment ``<!-- not-run: why -->`` on the line right above its fence. It must give
  a reason, and it must still compile.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import re
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*$")
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:(?P<why>.*?)-->\s*$")


@dataclass(frozen=True)
class Sample:
    """One fenced Python block of a page."""

    page: str
    line: int  # of the first line of code, 1-based
    code: str
    not_run: str | None  # the reason, when marked <!-- not-run: ... -->
    lang: str = "python"


def samples(
    text: str, page: str = "<text>", langs: frozenset[str] = frozenset({"python", "py"})
) -> list[Sample]:
    """Return the ```python blocks (or those of ``langs``) of a Markdown text, with their
    not-run marks."""
    lines = text.splitlines()
    found: list[Sample] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent = opening["indent"]
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"{page}:{i + 1}: the code fence is never closed")
        if opening["lang"] in langs:
            mark = NOT_RUN.match(lines[i - 1]) if i else None
            body = [line.removeprefix(indent) for line in lines[i + 1 : end]]
            found.append(
                Sample(
                    page=page,
                    line=i + 2,
                    code="\n".join(body) + "\n",
                    not_run=mark["why"].strip() if mark else None,
                    lang=opening["lang"],
                )
            )
        i = end + 1
    return found


def compile_sample(sample: Sample) -> types.CodeType:
    """Compile ``sample`` with top-level await allowed, its line numbers those of the page."""
    tree = ast.parse(sample.code, filename=sample.page)
    ast.increment_lineno(tree, sample.line - 1)
    return compile(tree, str(DOCS / sample.page), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


async def run_page(page_samples: list[Sample]) -> dict[str, object]:
    """Run the runnable samples of one page in order, in one namespace; return it."""
    namespace: dict[str, object] = {"__name__": "docs_sample"}
    for sample in page_samples:
        code = compile_sample(sample)
        if sample.not_run is not None:
            continue
        if code.co_flags & inspect.CO_COROUTINE:
            await eval(code, namespace)
        else:
            await asyncio.to_thread(_run_in_thread, code, namespace)
    return namespace


def _run_in_thread(code: types.CodeType, namespace: dict[str, object]) -> None:
    from django.db import connections

    try:
        exec(code, namespace)
    finally:
        connections.close_all()  # as at the end of a request: back to the pool


# -- the convention itself ----------------------------------------------------------------

CONVENTION = """\
Intro.

```python
x = 1
```

<!-- not-run: settings fragment -->
```python
DATABASES = {"default": {...}}
```

```console
$ python manage.py check
```

<!-- not-run: only marks the next fence -->

```python
y = x + 1
```

1. A list item:

    ```python
    z = y * 10
    ```
"""


def test_samples_finds_python_blocks_and_their_marks() -> None:
    found = samples(CONVENTION)
    assert [s.code for s in found] == [
        "x = 1\n",
        'DATABASES = {"default": {...}}\n',
        "y = x + 1\n",
        "z = y * 10\n",
    ]
    assert [s.not_run for s in found] == [None, "settings fragment", None, None]
    assert found[0].line == 4


async def test_run_page_shares_one_namespace_and_skips_not_run_blocks() -> None:
    namespace = await run_page(samples(CONVENTION))
    assert namespace["z"] == 20
    assert "DATABASES" not in namespace


async def test_a_failing_sample_names_its_page_line() -> None:
    broken = samples("Text.\n\n```python\nok = 1\nraise RuntimeError('boom')\n```\n", "x.md")
    with pytest.raises(RuntimeError) as info:
        await run_page(broken)
    assert info.traceback[-1].lineno + 1 == 5  # pytest counts from 0
    assert str(info.traceback[-1].path) == str(DOCS / "x.md")


def test_an_unclosed_fence_is_reported() -> None:
    with pytest.raises(AssertionError, match=r"x\.md:1: the code fence is never closed"):
        samples("```python\nx = 1\n", "x.md")


# -- the docs -------------------------------------------------------------------------------

PAGES = sorted(p.name for p in DOCS.glob("*.md"))
#: The pages with at least one sample to run.
RUNNABLE = [
    page
    for page in PAGES
    if any(s.not_run is None for s in samples((DOCS / page).read_text(), page))
]


def test_docs_have_samples_and_every_not_run_mark_says_why() -> None:
    every = [s for page in PAGES for s in samples((DOCS / page).read_text(), page)]
    assert sum(s.not_run is None for s in every) >= 10, "the docs lost their runnable samples"
    for sample in every:
        assert sample.not_run != "", f"{sample.page}:{sample.line}: say why it is not run"
        compile_sample(sample)  # a fragment must still be valid Python


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("page", RUNNABLE)
async def test_page_samples_run(page: str) -> None:
    from django_asyncpool import ConnectionPool

    try:
        await run_page(samples((DOCS / page).read_text(), page))
    finally:
        # A sample may leave connections of this loop's engine behind: close them here,
        # on this loop, not at the loop's shutdown.
        for pool in list(ConnectionPool._instances.values()):
            await pool.close()


README = DOCS.parent / "README.md"


@pytest.mark.django_db(transaction=True)
async def test_readme_samples_run_and_its_view_answers() -> None:
    from django.test import AsyncRequestFactory

    from django_asyncpool import ConnectionPool

    readme = samples(README.read_text(), "../README.md")
    assert all(s.not_run != "" for s in readme), "say why a README sample is not run"
    try:
        namespace = await run_page(readme)
        view = namespace["product_count"]
        response = await view(AsyncRequestFactory().get("/products/count"))  # type: ignore[operator]
        assert response.status_code == 200
        assert json.loads(response.content)["products"] >= 0
    finally:
        for pool in list(ConnectionPool._instances.values()):
            await pool.close()


def test_the_install_commands_install_from_a_clone_or_a_wheel() -> None:
    """Not published yet: a newcomer's ``pip install NAME`` would fail (or get another)."""
    for page in [README, DOCS / "quickstart.md"]:
        consoles = samples(page.read_text(), page.name, frozenset({"console"}))
        installs = [
            line.split("#")[0].split()[3:]
            for block in consoles
            for line in block.code.splitlines()
            if line.startswith("$ pip install ")
        ]
        assert installs, f"{page.name} says how to install"
        for args in installs:
            ours = [a.strip("\"'") for a in args if "asyncpool" in a or a.strip("\"'") == "."]
            assert ours, (page.name, args)
            for target in ours:
                assert target.startswith((".", "/")) or target.endswith(".whl"), (page.name, args)
