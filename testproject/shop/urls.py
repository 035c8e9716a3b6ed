"""The shop's URLs; ``<id:pk>`` takes any text: the views' ``api`` decorator turns it
into an id, or answers a JSON 404 that says why it is not one."""

from __future__ import annotations

from django.urls import path, register_converter

from . import views


class IdConverter:
    # Not [0-9]+: "abc", "-1" or a number above a bigint would match no URL, and get
    # Django's 404 page rather than the API's JSON error.
    regex = "[^/]+"

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: int | str) -> str:
        return str(value)


register_converter(IdConverter, "id")

urlpatterns = [
    path("products/", views.products, name="products"),
    path("products/<id:pk>/", views.product, name="product"),
    path("orders/", views.orders, name="orders"),
    path("report/", views.report, name="report"),
    path("fast/products/<id:pk>/", views.fast_product, name="fast-product"),
    path("orm/products/<id:pk>/", views.orm_product, name="orm-product"),
    path("orm/native/products/<id:pk>/", views.native_orm_product, name="native-orm-product"),
    path("sync/products/", views.sync_products, name="sync-products"),
    path("sync/products/<id:pk>/", views.sync_product, name="sync-product"),
    path("sync/orders/<id:pk>/", views.sync_order, name="sync-order"),
    path("pool/", views.pool_metrics, name="pool-metrics"),
]
