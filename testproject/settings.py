"""Settings of the demo and test project: ENGINE django_asyncpool on two aliases.

The database comes from DATABASE_URL, or from an embedded PostgreSQL server
(testproject/pgserver.py) when DATABASE_URL is not set.
"""

from __future__ import annotations

import os
from pathlib import Path

from django_asyncpool.config import parse_url

BASE_DIR = Path(__file__).resolve().parent
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "demo-only-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["*"]

if not os.environ.get("DATABASE_URL"):
    from testproject import pgserver

    os.environ["DATABASE_URL"] = pgserver.embedded_url()

_db = parse_url(os.environ["DATABASE_URL"])
_connection = {k: _db[k] for k in ("NAME", "USER", "PASSWORD", "HOST", "PORT")}
#: The URL's query options (sslmode, application_name, ...), under each alias's own.
_url_options = _db["OPTIONS"]

DATABASES = {
    "default": {
        "ENGINE": "django_asyncpool",
        **_connection,
        "CONN_MAX_AGE": 0,
        "OPTIONS": {
            **_url_options,
            "pool": {"min_size": 1, "max_size": 10, "timeout": 5},
            "async_pool": {"pool_size": 10, "max_overflow": 5, "timeout": 5},
            "circuit_breaker": {"fail_max": 5, "reset_timeout": 5},
            "retry": {"max_tries": 3, "max_time": 5},
        },
    },
    "replica": {
        "ENGINE": "django_asyncpool",
        **_connection,
        "CONN_MAX_AGE": 0,
        "OPTIONS": {**_url_options, "pool": {"min_size": 1, "max_size": 5, "timeout": 5}},
        "TEST": {"MIRROR": "default"},
    },
    # The replica again, with Django's async QuerySet API native on it (docs/async-orm.md):
    # the demo's /orm/native/ view runs the same aget() as /orm/ without the thread hop.
    "replica_native": {
        "ENGINE": "django_asyncpool",
        **_connection,
        "CONN_MAX_AGE": 0,
        "OPTIONS": {
            "pool": {"min_size": 0, "max_size": 5, "timeout": 5},
            # The native ORM's connections: as many as wrk's connections in load_demo.py.
            "async_pool": {"pool_size": 10, "max_overflow": 5, "timeout": 5},
            "async_orm": True,
        },
        "TEST": {"MIRROR": "default"},
    },
}

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    # Django's middleware stack runs over them in tests/test_handler.py.
    "django.contrib.sessions",
    "django.contrib.messages",
    "django_prometheus",
    "django_asyncpool",
    "health_check",
    "testproject.shop",
    # Every field type of the postgresql backend, for the async ORM's differential test.
    "testproject.fieldzoo",
]
# Django 6 wants django.contrib.postgres installed for ArrayField and the range fields
# (postgres.E005). The zoo needs none of what the app adds (hstore/citext type handlers,
# unaccent/trigram lookups; tests/orm/test_conformance.py runs every query on both
# versions without it), and the app's connection_created handler looks every connection
# up in `connections`, which the tests' own wrappers (conftest.make_wrapper) are not in.
SILENCED_SYSTEM_CHECKS = ["postgres.E005"]
# For the health page's HTML (health_check/templates).
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "testproject.urls"
ASGI_APPLICATION = "testproject.asgi.application"
WSGI_APPLICATION = "testproject.wsgi.application"
# The shop's reads go to "replica" (same server, its own pools), its writes to "default".
DATABASE_ROUTERS = ["testproject.routers.ReplicaRouter"]
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_asyncpool": {"handlers": ["console"], "level": "WARNING"}},
}
