"""The package's shape: no import cycle, pools that import only the core and the config,
no private name across modules, one fork/exit hook, docstrings.

Read from the source with ``ast``: a lazy import (inside a function) counts as an
import, one under ``if TYPE_CHECKING:`` does not (it never runs).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

import django_asyncpool

PACKAGE = Path(django_asyncpool.__file__).resolve().parent


class Module(NamedTuple):
    tree: ast.Module
    package: list[str]  # what a relative import with one dot starts from


def _modules() -> dict[str, Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        tree = ast.parse(path.read_text(), str(path))
        found[name] = Module(tree, parts[:-1])
    return found


MODULES = _modules()


class Import(NamedTuple):
    module: str  # the module imported from (or imported)
    name: str  # the name imported from it, "" for a module
    line: int
    bound: str  # the name it is bound to in the importing module


def _imports(module: Module) -> list[Import]:
    """Return every package-internal import of ``module`` that runs (lazy ones too)."""
    skipped: set[int] = set()
    for node in ast.walk(module.tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(sub) for sub in ast.walk(node))
    found = []
    for node in ast.walk(module.tree):
        if id(node) in skipped or not isinstance(node, ast.ImportFrom) or not node.level:
            continue
        base = module.package[: len(module.package) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
        for alias in node.names:
            full = f"{target}.{alias.name}"
            bound = alias.asname or alias.name
            found.append(
                Import(full, "", node.lineno, bound)
                if full in MODULES
                else Import(target, alias.name, node.lineno, bound)
            )
    return found


def test_no_import_cycle() -> None:
    graph = {
        name: {i.module for i in _imports(module) if i.module != name}
        for name, module in MODULES.items()
    }
    cycles: list[list[str]] = []

    def visit(path: list[str]) -> None:
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt in path:
                cycles.append([*path[path.index(nxt) :], nxt])
            else:
                visit([*path, nxt])

    for name in graph:
        visit([name])
    assert cycles == [], cycles[:3]


def test_no_private_name_is_used_across_modules() -> None:
    crossings = []
    for name, module in MODULES.items():
        imported = _imports(module)
        crossings += [
            f"{name}:{i.line}: from {i.module} import {i.name}"
            for i in imported
            if i.name.startswith("_") and not i.name.startswith("__")
        ]
        # module._private, on a module of the package bound by ``from . import module``
        # (or ``from .core import registry as _registry``)
        siblings = {i.bound for i in imported if not i.name}
        crossings += [
            f"{name}:{node.lineno}: {node.value.id}.{node.attr}"
            for node in ast.walk(module.tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in siblings
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ]
    assert crossings == []


def test_every_module_says_what_it_holds() -> None:
    silent = [name for name, module in MODULES.items() if not ast.get_docstring(module.tree)]
    assert set(silent) <= {"django_asyncpool.management", "django_asyncpool.management.commands"}


#: The packages of one kind of pool each.
POOLS = ("sync", "sqla", "orm")
#: What a pool package may import besides itself.
BELOW_THE_POOLS = ("core", "config", "errors")
#: Imports across the rule, each with its reason: the native ORM's connections carry the
#: ENGINE's own DatabaseWrapper, and its Holder installs the metrics collector.
EXCEPTIONS = {
    ("django_asyncpool.orm.pool", "django_asyncpool.base"),
    ("django_asyncpool.orm.pool", "django_asyncpool.metrics"),
}


def _top(module: str) -> str:
    """Return the first part of ``module`` under the package ("core", "pool", ...)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_a_pool_package_imports_only_the_core_and_the_config() -> None:
    crossings = []
    for name, module in MODULES.items():
        own = _top(name)
        if own not in POOLS:
            continue
        for i in _imports(module):
            target = i.module if i.module in MODULES else i.module.rsplit(".", 1)[0]
            if _top(target) in (own, *BELOW_THE_POOLS) or (name, target) in EXCEPTIONS:
                continue
            crossings.append(f"{name}:{i.line} imports {i.module} {i.name}".rstrip())
    assert crossings == []


def test_the_core_imports_no_pool_and_nothing_above_it() -> None:
    above = [
        f"{name}:{i.line} imports {i.module}"
        for name, module in MODULES.items()
        if _top(name) == "core"
        for i in _imports(module)
        if _top(i.module) not in ("core", "config", "errors")
    ]
    assert above == []


def test_only_core_process_hooks_fork_and_exit() -> None:
    hooks = sorted(
        f"{name}:{node.lineno}"
        for name, module in MODULES.items()
        for node in ast.walk(module.tree)
        if isinstance(node, ast.Call)
        and ast.unparse(node.func) in ("os.register_at_fork", "atexit.register")
    )
    assert [h.split(":")[0] for h in hooks] == ["django_asyncpool.core.process"] * 2, hooks
