"""Exposition: the ``/metrics`` (and ``/healthz``, ``/readyz``) HTTP server and the
multi-process plumbing (every worker of a service's tree writes files, the one server merges
them)."""

from __future__ import annotations

import glob
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Gauge,
    generate_latest,
)
from prometheus_client import multiprocess as _mp
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from shared.metrics.catalog import (
    MULTIPROC_ENV,
    _ensure_value_class,
    built_metric_attrs,
    metric,
)
from shared.metrics.collectors import ProcessTreeCollector

log = logging.getLogger("shared.metrics")


def prepare_multiproc_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (or empty it of the previous run's ``*.db`` files) and point
    ``PROMETHEUS_MULTIPROC_DIR`` at it. Call once at service start, before any worker
    process forks and before any metric is used. Returns the absolute path."""
    p = Path(path).resolve()
    if built := built_metric_attrs():
        raise RuntimeError(
            f"prepare_multiproc_dir() called after metrics were used: {sorted(built)}"
        )
    p.mkdir(parents=True, exist_ok=True)
    for f in p.glob("*.db"):
        f.unlink(missing_ok=True)
    os.environ[MULTIPROC_ENV] = str(p)
    _ensure_value_class()
    return p


def multiproc_dir() -> Path | None:
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def mark_process_dead(pid: int) -> None:
    """Bookkeeping when a worker process exits (removes its live-gauge files). No-op
    outside multi-process mode. Counters/histograms of dead processes are kept, as they
    must be: they are part of the service's totals."""
    d = multiproc_dir()
    if d is not None:
        _mp.mark_process_dead(pid, str(d))



class _Delegate(Collector):
    """Exposes another registry's collectors through a new registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self._registry.collect()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aftersales")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class MetricsServer:
    """Handle of a running metrics server (``port`` is the bound port: pass 0 in tests)."""

    service: str
    port: int
    registry: CollectorRegistry
    httpd: ThreadingHTTPServer
    thread: threading.Thread

    def register(self, collector: Collector) -> None:
        self.registry.register(collector)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class _TolerantMultiProcessCollector(_mp.MultiProcessCollector):
    """A worker that is just creating its metrics file leaves it empty for an instant; a
    scrape at that moment must skip the file, not fail with HTTP 500."""

    def collect(self) -> Iterable[Metric]:
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            try:
                if os.path.getsize(path) >= 8:
                    files.append(path)
            except OSError:  # removed between glob and stat (a dead process's gauge)
                continue
        return self.merge(files, accumulate=True)



def build_registry(service: str, collectors: Iterable[Collector] = ()) -> CollectorRegistry:
    """The registry ``/metrics`` serves: the merged multi-process files plus the process
    tree when ``PROMETHEUS_MULTIPROC_DIR`` is set, else the default registry; plus
    ``collectors``."""
    registry = CollectorRegistry(auto_describe=False)
    d = multiproc_dir()
    if d is not None:
        if not d.is_dir():
            raise RuntimeError(f"{MULTIPROC_ENV}={d} is not a directory")
        _TolerantMultiProcessCollector(registry, path=str(d))
        registry.register(ProcessTreeCollector(service))
    else:
        registry.register(_Delegate(REGISTRY))
    for collector in collectors:
        registry.register(collector)
    return registry


def start_metrics_server(
    port: int,
    service: str,
    *,
    addr: str = "127.0.0.1",  # AFTERSALES_METRICS_BIND opens it (the pods: 0.0.0.0)
    collectors: Iterable[Collector] = (),
    version: str | None = None,
) -> MetricsServer:
    """Serve ``/metrics`` (Prometheus text format), ``/healthz`` (200 ``ok``: alive) and
    ``/readyz`` (200 or 503 with the reasons, see :mod:`shared.health`) on
    ``addr:port`` from a daemon thread of the calling process, and set
    ``aftersales_build_info{version}``. In multi-process mode call it in ONE process of
    the service's tree (the parent, after :func:`prepare_multiproc_dir`)."""
    registry = build_registry(service, collectors)
    build_info = metric("BUILD_INFO")
    assert isinstance(build_info, Gauge)
    build_info.labels(version=version or _version()).set(1)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                try:
                    body, status, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
                except Exception:
                    log.exception("metrics collection failed")
                    body, status, ctype = b"collection failed\n", 500, "text/plain"
            elif path in ("/healthz", "/health"):
                body, status, ctype = b"ok\n", 200, "text/plain; charset=utf-8"
            elif path == "/readyz":
                from shared.health import current

                ready, why = current().readiness()
                body, status = (why + "\n").encode(), 200 if ready else 503
                ctype = "text/plain; charset=utf-8"
            else:
                body, status, ctype = b"not found: try /metrics\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds: keep the service log clean

    httpd = ThreadingHTTPServer((addr, port), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name=f"metrics-{service}", daemon=True)
    thread.start()
    bound = int(httpd.server_address[1])
    log.info("metrics for %s on http://%s:%d/metrics", service, addr, bound)
    return MetricsServer(service, bound, registry, httpd, thread)
