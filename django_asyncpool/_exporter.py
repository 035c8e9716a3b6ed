"""The standalone exporter: ``/metrics`` on ``METRICS_PORT`` for processes without a URL.

``METRICS_ENABLED=true`` (a Django setting, or the environment) starts it when the
app is ready: Celery workers, scripts, management commands. One per process, in a
daemon thread. A port already taken (another worker, another command got there
first) never raises: it is logged once and the process goes on without it. With
PROMETHEUS_MULTIPROC_DIR, the one process that got the port serves every
process's metrics.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

import prometheus_client
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from . import metrics

__all__ = ["start", "start_from_settings", "stop"]

logger = logging.getLogger("django_asyncpool")

_lock = threading.Lock()
_server: Any = None
_server_pid = 0
_port = 0
_warned: set[int] = set()


def scrape_registry() -> CollectorRegistry:
    """Return what a scrape should read: every process's files, or this process's REGISTRY."""
    if metrics.multiprocess():
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


def start(port: int, addr: str = "0.0.0.0") -> int | None:
    """Serve /metrics on ``addr:port``; return the port, or None when it could not be opened.

    Idempotent within a process: a second call returns the port already served.
    """
    global _server, _server_pid, _port
    metrics.install()
    with _lock:
        if _server is not None and _server_pid == os.getpid():
            return _port
        try:
            result = prometheus_client.start_http_server(
                port, addr=addr, registry=scrape_registry()
            )
        except OSError as exc:
            if port not in _warned:
                _warned.add(port)
                logger.warning(
                    "METRICS_PORT %d could not be opened (%s), so this process (pid %d) "
                    "serves no metrics there; it carries on. Another process probably "
                    "serves them already. Give each process its own METRICS_PORT, or set "
                    "PROMETHEUS_MULTIPROC_DIR so that the one serving includes them all.",
                    port,
                    exc.strerror or exc,
                    os.getpid(),
                )
            return None
        _server = result[0] if isinstance(result, tuple) else None
        _server_pid = os.getpid()
        _port = _server.server_port if _server is not None else port
    logger.info("Serving the pool metrics at http://%s:%d/metrics", addr, _port)
    return _port


def stop() -> None:
    """Stop this process's exporter (tests; it is a daemon thread otherwise)."""
    global _server
    with _lock:
        server, _server = _server, None
    if server is not None:
        server.shutdown()
        server.server_close()


def start_from_settings() -> int | None:
    """Start the exporter when METRICS_ENABLED says so; return its port, or None."""
    from .config import load_metrics

    conf = load_metrics()
    if not conf.enabled or _autoreloader_parent():
        return None
    return start(conf.port)


def _autoreloader_parent() -> bool:
    """Return True in runserver's autoreloader: it serves nothing, its child does."""
    return (
        os.environ.get("RUN_MAIN") != "true"
        and len(sys.argv) > 1
        and sys.argv[1] == "runserver"
        and "--noreload" not in sys.argv
    )
