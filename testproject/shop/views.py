"""The demo's views, one per way of reaching the database.

- async views with ``session_scope()``: list, detail, create inside a transaction,
  a read-only report (``session_scope(readonly=True)`` skips BEGIN/COMMIT);
- an async view on the fast path, ``ConnectionPool().connection()`` (raw asyncpg);
- sync views on the Django ORM, and async views on the Django async ORM (``aget``):
  through Django's thread hop, and native (an alias with ``OPTIONS["async_orm"]`` on);
- ``ConnectionPool().metrics`` of every alias as JSON.

Reads use the alias the router picks for the model (``replica``), writes ``default``.
Bad input gets a 4xx with a message that says what is wrong (see :func:`api`).
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any

from django.conf import settings
from django.db import connections, router
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET, require_http_methods
from sqlalchemy import text

from django_asyncpool import ConnectionPool, PoolError, session_scope
from testproject.routers import NATIVE_ALIAS

from .models import Order, Product

PRODUCT_COLUMNS = "id, sku, name, price_cents"
INT4_MAX = 2**31 - 1
BIGINT_MAX = 2**63 - 1  # the largest id a bigserial column holds


class ApiError(Exception):
    """An error the client can fix: rendered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _sqlstate(exc: BaseException) -> tuple[str | None, str | None]:
    """Return (SQLSTATE, constraint name) of a database error from any of the three drivers."""
    state = constraint = None
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:  # Django's, SQLAlchemy's, the driver's
        chain.append(cur)
        found = getattr(cur, "sqlstate", None)
        state = state or (found if isinstance(found, str) else None)
        constraint = (
            constraint
            or getattr(cur, "constraint_name", None)
            or getattr(getattr(cur, "diag", None), "constraint_name", None)
        )
        cur = getattr(cur, "orig", None) or cur.__cause__
    return state, constraint


def _error_response(exc: Exception) -> JsonResponse | None:
    """Return the 4xx/503 response for ``exc``, or None when it is a bug (a 500)."""
    if isinstance(exc, ApiError):
        return JsonResponse({"error": str(exc)}, status=exc.status)
    if isinstance(exc, Product.DoesNotExist | Order.DoesNotExist):
        return JsonResponse({"error": f"{exc} Check the id."}, status=404)
    if isinstance(exc, PoolError):
        # PoolError messages never hold a secret and say what to do.
        response = JsonResponse({"error": str(exc)}, status=503)
        response["Retry-After"] = "5"
        return response
    state, constraint = _sqlstate(exc)
    if state is None:
        return None
    if state == "23505":
        message = f"That already exists (unique constraint {constraint})."
        return JsonResponse({"error": message}, status=409)
    if state.startswith("23"):
        message = f"The data breaks the constraint {constraint}: check the values sent."
        return JsonResponse({"error": message}, status=400)
    if state.startswith("22"):
        return JsonResponse({"error": "A value is out of range or of the wrong type."}, status=400)
    return None


def _id(value: str) -> int:
    """Return the database id a URL gives (``<id:pk>``), or raise a 404 that says why not."""
    if value.isascii() and value.isdigit() and 1 <= int(value) <= BIGINT_MAX:
        return int(value)
    raise ApiError(404, f"{value!r} is not an id: ids are whole numbers from 1 to {BIGINT_MAX}.")


def _answered(response: HttpResponse, request: HttpRequest) -> HttpResponse:
    """Return ``response``, or, for require_http_methods' empty 405, one that says why."""
    if response.status_code == 405 and not response.content:
        allowed = response["Allow"]
        message = f"{request.method} is not allowed here; use {allowed}."
        response = JsonResponse({"error": message}, status=405)
        response["Allow"] = allowed
    return response


def api(view: Any) -> Any:
    """Turn the client's mistakes raised by ``view`` (sync or async) into 4xx responses.

    A ``pk`` from the URL (``<id:pk>``, any text) reaches ``view`` as an int.
    """
    if inspect.iscoroutinefunction(view):

        @functools.wraps(view)
        async def async_wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            try:
                if "pk" in kwargs:
                    kwargs["pk"] = _id(kwargs["pk"])
                response: HttpResponse = await view(request, *args, **kwargs)
            except Exception as exc:
                error = _error_response(exc)
                if error is None:
                    raise
                return error
            return _answered(response, request)

        return async_wrapper

    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            if "pk" in kwargs:
                kwargs["pk"] = _id(kwargs["pk"])
            response: HttpResponse = view(request, *args, **kwargs)
        except Exception as exc:
            error = _error_response(exc)
            if error is None:
                raise
            return error
        return _answered(response, request)

    return wrapper


# -- input ---------------------------------------------------------------------------------


def _body(request: HttpRequest) -> dict[str, Any]:
    try:
        data = json.loads(request.body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"The body is not valid JSON ({exc}); send a JSON object.") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "The body must be a JSON object.")
    return data


def _field(data: dict[str, Any], name: str, kind: type, where: str = "body") -> Any:
    value = data.get(name)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ApiError(400, f"{where}: {name!r} must be an integer, got {value!r}.")
    if kind is int and not -INT4_MAX <= value <= INT4_MAX:
        raise ApiError(400, f"{where}: {name!r} is out of range.")
    if kind is str and (not isinstance(value, str) or not value.strip()):
        raise ApiError(400, f"{where}: {name!r} must be a non-empty string.")
    return value


def _page(request: HttpRequest) -> tuple[int, int]:
    try:
        limit = int(request.GET.get("limit", 20))
        offset = int(request.GET.get("offset", 0))
    except ValueError as exc:
        raise ApiError(400, "limit and offset must be integers.") from exc
    if not 1 <= limit <= 100:
        raise ApiError(400, f"limit must be within 1..100, got {limit}.")
    if not 0 <= offset <= INT4_MAX:
        raise ApiError(400, f"offset must be within 0..{INT4_MAX}, got {offset}.")
    return limit, offset


def _reads() -> str:
    """Return the alias the router sends the shop's reads to."""
    return router.db_for_read(Product)


def _product(row: Any) -> dict[str, Any]:
    return {"id": row[0], "sku": row[1], "name": row[2], "price_cents": row[3]}


def _missing(pk: int) -> ApiError:
    return ApiError(404, f"No product with id {pk}. GET /products/ lists them.")


# -- async views with session_scope ----------------------------------------------------------


@api
@require_http_methods(["GET", "POST"])
async def products(request: HttpRequest) -> HttpResponse:
    """GET: a page of products (read-only scope). POST: create one (a transaction)."""
    if request.method == "POST":
        data = _body(request)
        values = {
            "sku": _field(data, "sku", str),
            "name": _field(data, "name", str),
            "price_cents": _field(data, "price_cents", int),
        }
        if len(values["sku"]) > 32 or len(values["name"]) > 200:
            raise ApiError(400, "sku is at most 32 characters, name at most 200.")
        async with session_scope() as session:
            row = (
                await session.execute(
                    text(
                        "insert into shop_product (sku, name, price_cents) "
                        f"values (:sku, :name, :price_cents) returning {PRODUCT_COLUMNS}"
                    ),
                    values,
                )
            ).one()
        return JsonResponse(_product(row), status=201)
    limit, offset = _page(request)
    async with session_scope(_reads(), readonly=True) as session:
        rows = (
            await session.execute(
                text(f"select {PRODUCT_COLUMNS} from shop_product order by id limit :l offset :o"),
                {"l": limit, "o": offset},
            )
        ).all()
    return JsonResponse({"products": [_product(r) for r in rows], "limit": limit})


@api
@require_GET
async def product(request: HttpRequest, pk: int) -> HttpResponse:
    """One product, in a read-only ``session_scope`` on the replica."""
    async with session_scope(_reads(), readonly=True) as session:
        row = (
            await session.execute(
                text(f"select {PRODUCT_COLUMNS} from shop_product where id = :pk"), {"pk": pk}
            )
        ).first()
    if row is None:
        raise _missing(pk)
    return JsonResponse(_product(row))


@api
@require_http_methods(["POST"])
async def orders(request: HttpRequest) -> HttpResponse:
    """Create an order and its lines in one transaction: all of it or nothing.

    Body: ``{"customer": "a@example.com", "lines": [{"product": 1, "quantity": 2}]}``.
    """
    data = _body(request)
    customer = _field(data, "customer", str)
    lines = data.get("lines")
    if not isinstance(lines, list) or not lines or not all(isinstance(x, dict) for x in lines):
        raise ApiError(400, "'lines' must be a non-empty list of {product, quantity} objects.")
    wanted = [
        (_field(x, "product", int, f"lines[{i}]"), _field(x, "quantity", int, f"lines[{i}]"))
        for i, x in enumerate(lines)
    ]
    async with session_scope() as session:
        order_id, created = (
            await session.execute(
                text("insert into shop_order (customer) values (:c) returning id, created_at"),
                {"c": customer},
            )
        ).one()
        total = 0
        for pk, quantity in wanted:
            price = (
                await session.execute(
                    text("select price_cents from shop_product where id = :pk"), {"pk": pk}
                )
            ).scalar()
            if price is None:
                raise _missing(pk)  # the scope rolls the order back
            await session.execute(
                text(
                    "insert into shop_orderline (order_id, product_id, quantity, price_cents) "
                    "values (:o, :p, :q, :c)"
                ),
                {"o": order_id, "p": pk, "q": quantity, "c": price},
            )
            total += price * quantity
    body = {"id": order_id, "customer": customer, "created_at": created, "total_cents": total}
    return JsonResponse(body, status=201)


@api
@require_GET
async def report(request: HttpRequest) -> HttpResponse:
    """Sales per product, best first: a read-only scope (no BEGIN/COMMIT) on the replica."""
    async with session_scope(_reads(), readonly=True) as session:
        totals = (
            await session.execute(
                text(
                    "select count(*), coalesce(sum(quantity * price_cents), 0) from shop_orderline"
                )
            )
        ).one()
        top = (
            await session.execute(
                text(
                    "select p.id, p.sku, p.name, sum(l.quantity), sum(l.quantity * l.price_cents) "
                    "from shop_orderline l join shop_product p on p.id = l.product_id "
                    "group by p.id order by 5 desc, p.id limit 10"
                )
            )
        ).all()
        orders = (await session.execute(text("select count(*) from shop_order"))).scalar()
    return JsonResponse(
        {
            "orders": orders,
            "lines": totals[0],
            "revenue_cents": totals[1],
            "top_products": [
                {"id": r[0], "sku": r[1], "name": r[2], "units": r[3], "revenue_cents": r[4]}
                for r in top
            ],
        }
    )


# -- the fast path: a raw asyncpg connection -------------------------------------------------


@api
@require_GET
async def fast_product(request: HttpRequest, pk: int) -> HttpResponse:
    """One product through ``ConnectionPool().connection()``: no session, no transaction."""
    async with ConnectionPool(_reads()).connection() as conn:
        row = await conn.fetchrow(f"select {PRODUCT_COLUMNS} from shop_product where id = $1", pk)
    if row is None:
        raise _missing(pk)
    return JsonResponse(_product(row))


# -- the Django ORM --------------------------------------------------------------------------


def _orm_product(p: Product) -> dict[str, Any]:
    return {"id": p.pk, "sku": p.sku, "name": p.name, "price_cents": p.price_cents}


@api
@require_GET
def sync_products(request: HttpRequest) -> HttpResponse:
    """A page of products with the sync ORM (the router sends it to the replica)."""
    limit, offset = _page(request)
    page = Product.objects.order_by("pk")[offset : offset + limit]
    return JsonResponse({"products": [_orm_product(p) for p in page], "limit": limit})


@api
@require_GET
def sync_product(request: HttpRequest, pk: int) -> HttpResponse:
    """One product with the sync ORM: ``Product.objects.get(pk=pk)``."""
    return JsonResponse(_orm_product(Product.objects.get(pk=pk)))


@api
@require_GET
def sync_order(request: HttpRequest, pk: int) -> HttpResponse:
    """An order and its lines with the sync ORM."""
    order = Order.objects.prefetch_related("lines").get(pk=pk)
    lines = [
        {"product": line.product_id, "quantity": line.quantity, "price_cents": line.price_cents}
        for line in order.lines.all()
    ]
    return JsonResponse(
        {"id": order.pk, "customer": order.customer, "created_at": order.created_at, "lines": lines}
    )


@api
@require_GET
async def orm_product(request: HttpRequest, pk: int) -> HttpResponse:
    """One product with Django's async ORM, ``aget()`` (a hop to Django's sync thread)."""
    return JsonResponse(_orm_product(await Product.objects.aget(pk=pk)))


@api
@require_GET
async def native_orm_product(request: HttpRequest, pk: int) -> HttpResponse:
    """The same ``aget()`` on the replica alias with ``async_orm`` on: no thread hop."""
    return JsonResponse(_orm_product(await Product.objects.using(NATIVE_ALIAS).aget(pk=pk)))


# -- what the pools are doing ----------------------------------------------------------------


@require_GET
async def pool_metrics(request: HttpRequest) -> HttpResponse:
    """Both pools' snapshots (``ConnectionPool(alias).metrics``, the sync pool's), per alias."""
    body: dict[str, Any] = {}
    for alias in settings.DATABASES:
        sync = connections[alias].pool  # built, not opened, if no request used it yet
        pool = ConnectionPool(alias)
        body[alias] = {
            "async": pool.metrics,
            "async_loops": pool.loops,
            "sync": sync.snapshot() if sync is not None else None,
        }
    return JsonResponse(body)


#: What the demo shows, for the index page and the demo's banner: (path, what it is).
PAGES = [
    ("/products/", "async view, session_scope(readonly=True): a page of products"),
    ("/products/1/", "async view, session_scope(readonly=True): one product"),
    ("/fast/products/1/", "async view, ConnectionPool().connection(): raw asyncpg, fast path"),
    ("/orm/products/1/", "async view, Django async ORM: Product.objects.aget() (thread hop)"),
    ("/orm/native/products/1/", "async view, the same aget() with async_orm on: native"),
    ("/sync/products/1/", "sync view, Django ORM: Product.objects.get()"),
    ("/sync/products/", "sync view, Django ORM: a page of products"),
    ("/sync/orders/1/", "sync view, Django ORM: an order and its lines"),
    ("/report/", "async view, session_scope(readonly=True): sales per product"),
    ("/pool/", "ConnectionPool(alias).metrics of every alias, as JSON"),
    ("/health/", "django-health-check page: both pools of every alias"),
    ("/metrics", "Prometheus metrics (django-prometheus)"),
]
CREATE_EXAMPLES = [
    ("POST /products/", '{"sku": "NEW-1", "name": "New thing", "price_cents": 990}'),
    ("POST /orders/", '{"customer": "a@example.com", "lines": [{"product": 1, "quantity": 2}]}'),
]


@require_GET
def index(request: HttpRequest) -> HttpResponse:
    """List what the demo serves, with links."""
    items = "".join(f'<li><a href="{url}">{url}</a>: {what}</li>' for url, what in PAGES)
    posts = "".join(f"<li><code>{how} {body}</code></li>" for how, body in CREATE_EXAMPLES)
    return HttpResponse(
        "<!doctype html><title>django-asyncpool demo</title>"
        "<h1>django-asyncpool demo</h1>"
        f"<ul>{items}</ul><p>Writes (JSON body, in a session_scope transaction):</p>"
        f"<ul>{posts}</ul>"
    )
