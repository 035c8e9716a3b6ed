"""Send the shop's reads to the ``replica`` alias, its writes to ``default``."""

from __future__ import annotations

from typing import Any

from django.db import connections

READ_ALIAS = "replica"
WRITE_ALIAS = "default"
#: The replica with ``OPTIONS["async_orm"]`` on: views choose it with ``using()``.
NATIVE_ALIAS = "replica_native"


class ReplicaRouter:
    """Reads of the shop app go to the replica, except inside a transaction on the primary.

    Inside ``transaction.atomic()`` on ``default`` a read must see the transaction's own
    writes, which the replica (another connection) cannot.
    """

    def db_for_read(self, model: type[Any], **hints: Any) -> str | None:
        if model._meta.app_label != "shop" or connections[WRITE_ALIAS].in_atomic_block:
            return None
        return READ_ALIAS

    def db_for_write(self, model: type[Any], **hints: Any) -> str | None:
        return WRITE_ALIAS if model._meta.app_label == "shop" else None

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool | None:
        return True  # both aliases are the same database

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool | None:
        # The replicas get their schema from the primary.
        return db not in {READ_ALIAS, NATIVE_ALIAS}
