"""Views that take a connection from each pool and say which process answered."""

from __future__ import annotations

import os

from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.urls import include, path
from sqlalchemy import text

from django_asyncpool import session_scope


async def ping_async(request: HttpRequest) -> JsonResponse:
    async with session_scope() as session:
        await session.execute(text("select 1"))
    return JsonResponse({"pid": os.getpid()})


def ping_sync(request: HttpRequest) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute("select 1")
    return JsonResponse({"pid": os.getpid()})


urlpatterns = [
    path("ping/async", ping_async),
    path("ping/sync", ping_sync),
    path("", include("django_prometheus.urls")),
]
