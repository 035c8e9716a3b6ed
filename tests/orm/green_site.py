"""The URLconf of tests/test_handler.py: views that use Django's whole middleware stack."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.middleware.csrf import get_token
from django.urls import path

from testproject.shop.models import Product


async def page(request: Any) -> Any:
    visits = await request.session.aget("visits", 0) + 1
    await request.session.aset("visits", visits)
    messages.info(request, f"visit {visits}")
    user = await request.auser()
    token = get_token(request)
    count = await Product.objects.acount()
    return JsonResponse(
        {"visits": visits, "user": str(user), "count": count, "token_len": len(token)}
    )


async def form(request: Any) -> Any:
    return HttpResponse(f"posted {sorted(request.POST)}")


def sync_view(request: Any) -> Any:
    return JsonResponse({"count": Product.objects.count(), "visits": request.session.get("visits")})


async def stream(request: Any) -> Any:
    async def parts() -> Any:
        for n in range(3):
            yield f"part {n}\n"

    return StreamingHttpResponse(parts())


async def plain(request: Any) -> Any:
    return HttpResponse("plain")


async def fails(request: Any) -> Any:
    raise ValueError("the view failed")


urlpatterns = [
    path("page/", page),
    path("form/", form),
    path("sync/", sync_view),
    path("stream/", stream),
    path("plain/", plain),
    path("fails/", fails),
]
