"""Load the demo's sample data: products and a few orders; running it again adds nothing."""

from __future__ import annotations

import random
from typing import Any

from django.core.management.base import BaseCommand
from django.db import transaction

from testproject.shop.models import Order, OrderLine, Product

ADJECTIVES = ["Red", "Blue", "Tiny", "Large", "Smart", "Quiet", "Rapid", "Solid"]
THINGS = ["Kettle", "Lamp", "Chair", "Backpack", "Mug", "Notebook", "Headphones", "Clock"]


class Command(BaseCommand):
    help = "Create the sample products and orders of the demo unless they exist."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--products", type=int, default=1000)
        parser.add_argument("--orders", type=int, default=50)

    def handle(self, *args: Any, products: int, orders: int, **options: Any) -> None:
        rnd = random.Random(42)  # the same sample every time
        with transaction.atomic(using="default"):
            Product.objects.using("default").bulk_create(
                [
                    Product(
                        sku=f"SKU-{i:05d}",
                        name=f"{rnd.choice(ADJECTIVES)} {rnd.choice(THINGS)} {i}",
                        price_cents=rnd.randint(199, 19999),
                    )
                    for i in range(1, products + 1)
                ],
                ignore_conflicts=True,
            )
            made = 0
            if not Order.objects.using("default").exists():
                prices = dict(
                    Product.objects.using("default")
                    .filter(sku__startswith="SKU-")
                    .values_list("pk", "price_cents")[:100]
                )
                for n in range(orders):
                    order = Order.objects.using("default").create(
                        customer=f"customer{n}@example.com"
                    )
                    OrderLine.objects.using("default").bulk_create(
                        OrderLine(
                            order=order,
                            product_id=pk,
                            quantity=rnd.randint(1, 5),
                            price_cents=prices[pk],
                        )
                        for pk in rnd.sample(sorted(prices), k=min(3, len(prices)))
                    )
                    made += 1
            count = Product.objects.using("default").count()
        self.stdout.write(f"Sample data: {count} products, {made} new orders.")
