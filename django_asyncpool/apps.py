from __future__ import annotations

from django.apps import AppConfig


class DjangoAsyncpoolConfig(AppConfig):
    """The django-asyncpool app: system checks, metrics and shutdown wiring."""

    name = "django_asyncpool"
    verbose_name = "django-asyncpool"
