"""The public API: each ``__all__`` is sorted and names what its module offers (as httpx's)."""

from __future__ import annotations

import importlib
import inspect

import pytest

import django_asyncpool

PUBLIC_MODULES = ("config", "errors", "pool", "asgi", "health", "routers", "metrics")
#: What ``django_asyncpool/__init__.py`` imports for its own use, not to offer.
OWN_USE = {"annotations", "TYPE_CHECKING", "Any"}


def test_the_package_exports_exactly_its_public_names() -> None:
    public = {
        name
        for name, value in vars(django_asyncpool).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    exported = django_asyncpool.__all__
    assert exported == sorted(exported)
    assert len(set(exported)) == len(exported)
    # Everything public is exported, and what is exported but not yet in vars() is a lazy
    # name of the module's __getattr__ (``atomic`` imports Django's models).
    assert public - OWN_USE == set(exported) - {"atomic"}
    for name in exported:
        assert getattr(django_asyncpool, name) is not None, name


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_each_public_module_exports_names_it_has(name: str) -> None:
    module = importlib.import_module(f"django_asyncpool.{name}")
    exported = module.__all__
    assert exported == sorted(exported)
    assert len(set(exported)) == len(exported)
    missing = [member for member in exported if not hasattr(module, member)]
    assert not missing, f"django_asyncpool.{name}.__all__ lists what it does not have: {missing}"
    private = [member for member in exported if member.startswith("_")]
    assert not private


def test_the_package_re_exports_what_its_modules_export() -> None:
    for name in django_asyncpool.__all__:
        home = getattr(django_asyncpool, name).__module__.rsplit(".", 1)[-1]
        if home in PUBLIC_MODULES:
            module = importlib.import_module(f"django_asyncpool.{home}")
            assert name in module.__all__, f"{name} is not in django_asyncpool.{home}.__all__"


def test_config_exports_what_the_docs_and_testproject_use() -> None:
    from django_asyncpool import config

    assert {"from_settings", "parse_url", "load"} <= set(config.__all__)
