"""The minimal project that benchmarks/http_matrix.py serves: settings, URLs, views, apps.

One module is the settings (``DJANGO_SETTINGS_MODULE=http_site``), the URLconf and
the views; the applications are made on first access (module ``__getattr__``), so
that a server imports them after Django is set up:

- ``http_site:wsgi``        Django's WSGI application (gunicorn)
- ``http_site:django_asgi`` Django's ``ASGIHandler`` (uvicorn)
- ``http_site:ours``        ``django_asyncpool.asgi.get_asgi_application()`` (uvicorn)

Environment: ``HTTP_MATRIX_DB`` (a database URL), ``HTTP_MATRIX_ASYNC_ORM=1`` to turn
``OPTIONS["async_orm"]`` on. Each view runs the same three queries on ``shop.Product``:
``get(pk=...)``, a ``filter().count()`` and ten rows as ``values()``; ``plain/`` and
``aplain/`` (sync and async) run none.
"""

from __future__ import annotations

import os
from typing import Any

from django_asyncpool.config import parse_url

_db = parse_url(os.environ["HTTP_MATRIX_DB"])
SECRET_KEY = "http-matrix-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
DATABASES = {
    "default": {
        "ENGINE": "django_asyncpool",
        **{k: _db[k] for k in ("NAME", "USER", "PASSWORD", "HOST", "PORT")},
        "CONN_MAX_AGE": 0,
        "OPTIONS": {
            **_db["OPTIONS"],
            # The same budget for every variant: ten connections.
            "pool": {"min_size": 1, "max_size": 10, "timeout": 10},
            "async_pool": {"pool_size": 10, "max_overflow": 0, "timeout": 10},
            "async_orm": os.environ.get("HTTP_MATRIX_ASYNC_ORM") == "1",
        },
    }
}
INSTALLED_APPS = ["django.contrib.contenttypes", "django_asyncpool", "testproject.shop"]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "http_site"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_SQL = (
    "select id, sku, name, price_cents from shop_product where id = :pk",
    "select count(*) from shop_product where price_cents < :pk",
    "select id, name, price_cents from shop_product where id >= :pk order by id limit 10",
)


def _payload(product: Any, count: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": product.id, "name": product.name, "count": count, "rows": rows}


def sync_view(request: Any, pk: int) -> Any:
    from django.http import JsonResponse

    from testproject.shop.models import Product

    product = Product.objects.get(pk=pk)
    count = Product.objects.filter(price_cents__lt=pk).count()
    rows = list(
        Product.objects.filter(pk__gte=pk).order_by("pk").values("id", "name", "price_cents")[:10]
    )
    return JsonResponse(_payload(product, count, rows))


async def async_view(request: Any, pk: int) -> Any:
    from django.http import JsonResponse

    from testproject.shop.models import Product

    product = await Product.objects.aget(pk=pk)
    count = await Product.objects.filter(price_cents__lt=pk).acount()
    rows = [
        row
        async for row in Product.objects.filter(pk__gte=pk)
        .order_by("pk")
        .values("id", "name", "price_cents")[:10]
    ]
    return JsonResponse(_payload(product, count, rows))


async def sqla_view(request: Any, pk: int) -> Any:
    from django.http import JsonResponse
    from sqlalchemy import text

    from django_asyncpool import session_scope

    async with session_scope(readonly=True) as session:
        product = (await session.execute(text(_SQL[0]), {"pk": pk})).one()
        count = (await session.execute(text(_SQL[1]), {"pk": pk})).scalar_one()
        rows = [dict(r) for r in (await session.execute(text(_SQL[2]), {"pk": pk})).mappings()]
    return JsonResponse(_payload(product, count, rows))


def plain_view(request: Any, pk: int) -> Any:
    from django.http import HttpResponse

    return HttpResponse("plain")


async def async_plain_view(request: Any, pk: int) -> Any:
    from django.http import HttpResponse

    return HttpResponse("plain")


def __getattr__(name: str) -> Any:
    if name == "urlpatterns":
        from django.urls import path

        return [
            path("sync/<int:pk>/", sync_view),
            path("async/<int:pk>/", async_view),
            path("sqla/<int:pk>/", sqla_view),
            path("plain/<int:pk>/", plain_view),
            path("aplain/<int:pk>/", async_plain_view),
        ]
    if name == "wsgi":
        from django.core.wsgi import get_wsgi_application

        return get_wsgi_application()
    if name == "django_asgi":
        from django.core.asgi import get_asgi_application

        return get_asgi_application()
    if name in ("ours", "ours_noportal"):
        from django_asyncpool.asgi import get_asgi_application as ours
        from django_asyncpool.orm import handler

        if name == "ours_noportal":  # the view outside a portal: a greenlet per native call
            handler.portal = lambda coro: coro  # type: ignore[assignment]
        return ours()
    raise AttributeError(name)
