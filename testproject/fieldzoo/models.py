"""A model with every concrete field type of Django's postgresql backend, and a FK chain.

Used by tests/orm/test_conformance.py: the same queries through the sync ORM and
through the native async path must give the same objects and values.
"""

from __future__ import annotations

from django.contrib.postgres.fields import (
    ArrayField,
    BigIntegerRangeField,
    DateRangeField,
    DateTimeRangeField,
    DecimalRangeField,
    IntegerRangeField,
)
from django.db import models


class Country(models.Model):
    """The end of the select_related chain, with the smallest auto pk."""

    id = models.SmallAutoField(primary_key=True)
    code = models.CharField(max_length=2, unique=True)

    def __str__(self) -> str:
        return self.code


class Maker(models.Model):
    """The middle of the chain: Specimen -> Maker -> Country."""

    id = models.AutoField(primary_key=True)
    name = models.CharField(max_length=100)
    country = models.ForeignKey(Country, models.CASCADE, null=True, related_name="makers")

    def __str__(self) -> str:
        return self.name


class Specimen(models.Model):
    """One of each concrete field type (nullable where a NULL is worth comparing).

    No GeneratedField: on Django 6.1 its system check asks the server's version, so
    ``manage.py check`` (and every command) would connect at startup.
    """

    id = models.BigAutoField(primary_key=True)
    char = models.CharField(max_length=100)
    text = models.TextField(blank=True)
    slug = models.SlugField(max_length=50)
    email = models.EmailField(null=True)
    url = models.URLField()
    file = models.FileField(max_length=200, blank=True)
    integer = models.IntegerField(null=True)
    big_integer = models.BigIntegerField()
    small_integer = models.SmallIntegerField()
    positive_integer = models.PositiveIntegerField()
    positive_big_integer = models.PositiveBigIntegerField()
    positive_small_integer = models.PositiveSmallIntegerField()
    float = models.FloatField(null=True)
    decimal = models.DecimalField(max_digits=30, decimal_places=10, null=True)
    boolean = models.BooleanField()
    null_boolean = models.BooleanField(null=True)
    date = models.DateField(null=True)
    time = models.TimeField(null=True)
    datetime = models.DateTimeField(null=True)
    duration = models.DurationField(null=True)
    uuid = models.UUIDField(null=True)
    json = models.JSONField(null=True)
    binary = models.BinaryField(null=True)
    ip = models.GenericIPAddressField(null=True)
    ints = ArrayField(models.IntegerField(null=True), default=list)
    grid = ArrayField(ArrayField(models.CharField(max_length=10)), null=True)
    int_range = IntegerRangeField(null=True)
    big_range = BigIntegerRangeField(null=True)
    decimal_range = DecimalRangeField(null=True)
    date_range = DateRangeField(null=True)
    datetime_range = DateTimeRangeField(null=True)
    maker = models.ForeignKey(Maker, models.SET_NULL, null=True, related_name="specimens")

    def __str__(self) -> str:
        return f"specimen {self.pk} {self.char}"
