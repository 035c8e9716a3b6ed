"""Database features: Django's PostgreSQL features, unchanged for users.

Only while Django's own test suite runs against the ENGINE (``scripts/django-suite``
sets :data:`SUITE_ENV`), the tests that fail or cannot run because of the test
*environment*, never because of the ENGINE, are declared here, each with its reason.
"""

from __future__ import annotations

import os

from django.db.backends.postgresql import features as postgresql
from django.utils.functional import cached_property

__all__ = ["NO_ICU_ENV", "SUITE_ENV", "DatabaseFeatures"]

#: Set to "1" by scripts/django-suite while Django's test suite runs.
SUITE_ENV = "DJANGO_ASYNCPOOL_DJANGO_SUITE"
#: Set to "1" by scripts/django-suite.py when the server has no ICU collations.
NO_ICU_ENV = "DJANGO_ASYNCPOOL_SUITE_NO_ICU"

#: Tests that cannot pass in this test environment: {reason: {test label, ...}}.
ENVIRONMENT_SKIPS: dict[str, set[str]] = {}

#: Tests that fail in this test environment, reasons in comments.
ENVIRONMENT_EXPECTED_FAILURES: set[str] = set()


def _in_django_suite() -> bool:
    return os.environ.get(SUITE_ENV) == "1"


class DatabaseFeatures(postgresql.DatabaseFeatures):
    """Django's PostgreSQL features, plus the test environment's known failures."""

    @cached_property
    def test_collations(self) -> dict[str, str | None]:  # type: ignore[override]
        """Return the collations Django's tests use, stand-ins where ICU is missing.

        Django's tests create tables with the ICU collation ``sv-x-icu``; a server
        built without ICU (the embedded one) has none, and the test database could
        not even be set up. The tests that use it only need *a* collation other than
        the database's default, so the libc collation ``POSIX`` stands in for it.
        """
        collations: dict[str, str | None] = dict(super().test_collations)
        if not (_in_django_suite() and os.environ.get(NO_ICU_ENV) == "1"):
            return collations
        return {
            key: "POSIX" if name and name.endswith("-x-icu") else name
            for key, name in collations.items()
        }

    @cached_property
    def django_test_skips(self) -> dict[str, set[str]]:  # type: ignore[override]
        skips: dict[str, set[str]] = {
            reason: set(tests) for reason, tests in super().django_test_skips.items()
        }
        if _in_django_suite():
            for reason, tests in ENVIRONMENT_SKIPS.items():
                skips.setdefault(reason, set()).update(tests)
        return skips

    @cached_property
    def django_test_expected_failures(self) -> set[str]:  # type: ignore[override]
        failures = set(super().django_test_expected_failures)
        if _in_django_suite():
            failures |= ENVIRONMENT_EXPECTED_FAILURES
        return failures
