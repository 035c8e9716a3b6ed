"""The shop's URLs; ``<id:pk>`` takes a database id (1 to 18 digits) or answers 404."""

from __future__ import annotations

from django.urls import path, register_converter

from . import views


class IdConverter:
    regex = "[0-9]{1,18}"  # fits a bigint: a longer number is a 404, not a database error

    def to_python(self, value: str) -> int:
        return int(value)

    def to_url(self, value: int) -> str:
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
