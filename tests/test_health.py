"""The django-health-check plugin, with the real package's view rendering the status."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from django.conf import settings
from django.http import HttpResponse
from django.test import RequestFactory, override_settings
from health_check.views import HealthCheckView

from django_asyncpool.health import PoolCheck, pool_checks
from testproject.pgserver import PASSWORD

from .conftest import closed_port

QUICK = {
    "pool": {"min_size": 0, "max_size": 2, "timeout": 3},
    "async_pool": {"pool_size": 2, "max_overflow": 0, "timeout": 3},
    "retry": {"max_tries": 1},
}
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]


pytestmark = pytest.mark.usefixtures("db_access")


async def get(aliases: list[str], accept: str = "application/json") -> HttpResponse:
    view = HealthCheckView.as_view(checks=pool_checks(aliases))
    request = RequestFactory().get("/health/", headers={"accept": accept})
    response: HttpResponse = await view(request)
    if hasattr(response, "render"):
        response.render()
    return response


async def test_healthy_aliases_are_ok(alias: Callable[..., str]) -> None:
    name = alias()
    response = await get(["default", name])
    assert response.status_code == 200
    assert json.loads(response.content) == {
        "PoolCheck(alias='default')": "OK",
        f"PoolCheck(alias={name!r})": "OK",
    }


async def test_an_unreachable_alias_fails_the_page(alias: Callable[..., str]) -> None:
    down = alias(HOST="127.0.0.1", PORT=closed_port())
    response = await get(["default", down])
    assert response.status_code == 500
    body = json.loads(response.content)
    assert body["PoolCheck(alias='default')"] == "OK"
    assert body[f"PoolCheck(alias={down!r})"] == (
        f"Unavailable: database {down!r}: DatabaseUnavailable (see the log)"
    )
    assert PASSWORD not in response.content.decode()


async def test_an_open_breaker_is_reported(alias: Callable[..., str]) -> None:
    down = alias(
        HOST="127.0.0.1",
        PORT=closed_port(),
        OPTIONS={**QUICK, "circuit_breaker": {"fail_max": 1, "reset_timeout": 60}},
    )
    await get([down])  # the failure opens the breaker
    response = await get([down])
    assert response.status_code == 500
    assert "circuit breaker open" in json.loads(response.content)[f"PoolCheck(alias={down!r})"]


async def test_the_html_page_renders_each_alias(alias: Callable[..., str]) -> None:
    down = alias(HOST="127.0.0.1", PORT=closed_port())
    # Its template comes from the app (the test project may list it already).
    apps = [*dict.fromkeys([*settings.INSTALLED_APPS, "health_check"])]
    with override_settings(INSTALLED_APPS=apps, TEMPLATES=TEMPLATES):
        response = await get(["default", down], accept="text/html")
    page = response.content.decode()
    assert response.status_code == 500
    assert "PoolCheck" in page and "&#x27;default&#x27;" in page and down in page
    assert "DatabaseUnavailable" in page


def test_pool_checks_lists_every_alias_of_the_engine() -> None:
    aliases = ["default", "replica", "replica_native"]
    assert pool_checks() == [(PoolCheck, {"alias": alias}) for alias in aliases]
