"""The demo shop: products, and orders made of lines."""

from __future__ import annotations

from django.contrib.contenttypes.fields import GenericForeignKey, GenericRelation
from django.contrib.contenttypes.models import ContentType
from django.db import models
from django.db.models.functions import Now


class Product(models.Model):
    sku = models.CharField(max_length=32, unique=True)
    name = models.CharField(max_length=200)
    price_cents = models.PositiveIntegerField()

    def __str__(self) -> str:
        return f"{self.sku} {self.name}"


class Order(models.Model):
    customer = models.CharField(max_length=200)
    # A database default, so orders inserted with plain SQL (session_scope views) get it too.
    created_at = models.DateTimeField(db_default=Now())
    notes = GenericRelation("Note")

    def __str__(self) -> str:
        return f"order {self.pk} for {self.customer}"


class OrderLine(models.Model):
    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="lines")
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="+")
    quantity = models.PositiveIntegerField()
    price_cents = models.PositiveIntegerField()

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=models.Q(quantity__gte=1), name="orderline_quantity_at_least_1"
            ),
            models.UniqueConstraint(fields=["order", "product"], name="orderline_one_per_product"),
        ]

    def __str__(self) -> str:
        return f"{self.quantity} x {self.product_id}"


class Tag(models.Model):
    """A label on products: a many-to-many relation (the async ORM's related managers)."""

    name = models.CharField(max_length=50, unique=True)
    products = models.ManyToManyField(Product, related_name="tags")

    def __str__(self) -> str:
        return self.name


class Note(models.Model):
    """A note on any object: a generic relation (``Order.notes``)."""

    text = models.CharField(max_length=200)
    content_type = models.ForeignKey(ContentType, on_delete=models.CASCADE)
    object_id = models.PositiveBigIntegerField()
    about = GenericForeignKey("content_type", "object_id")

    def __str__(self) -> str:
        return self.text
