"""The test project's settings, with the URLs of :mod:`tests.metrics_site.urls`."""

from testproject.settings import *  # noqa: F403

ROOT_URLCONF = "tests.metrics_site.urls"
