
"""Gateway benchmark: Douyin batches over HTTP to `aftersales run gateway`, on this machine's
RabbitMQ, against a baseline measured in the same run.

    .venv/bin/python bench/gateway_bench.py [--messages N] [--batch B] [--clients C]

Uses its own RabbitMQ vhost (dropped at the end); no database (the gateway has none).
Phases:

  baseline  the same events, built the same way, published straight to aftersales.events
            with the gateway's own publisher (services/gateway/forward.py), B per batch,
            one connection
            -> events/s: what the broker takes from one publisher
  gateway   N Douyin messages in signed batches of B, C clients posting at once; each
            request returns once RabbitMQ has its batch -> messages/s, and request
            latency p50/p95/p99; the gateway's RSS at the end
Prints a table and writes bench-results/gateway.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.measure import rss_kib  # noqa: E402
from services.gateway.forward import Forwarder  # noqa: E402
from services.gateway.mapping import load_mappings, map_message  # noqa: E402
from services.gateway.platforms import Unpacked, douyin_unpack  # noqa: E402
from shared.amqp import EVENTS_EXCHANGE  # noqa: E402
from tests.platform_messages import (  # noqa: E402
    GATEWAY_ENV,
    douyin_body,
    douyin_data,
    douyin_headers,
    douyin_message,
)
from tests.resources import free_port, own_vhost  # noqa: E402

NAME = f"aftersales_bench_gateway_{os.getpid()}"
AMQP_HOST = os.environ.get("AFTERSALES_BENCH_AMQP_HOST", "127.0.0.1")


def batches(count: int, size: int, run: str) -> list[bytes]:
    out = []
    for start in range(0, count, size):
        out.append(douyin_body(*[
            douyin_message("200", f"{run}-{i}", douyin_data(10_000_000 + i, status=6))
            for i in range(start, min(count, start + size))]))
    return out


def baseline(amqp_url: str, bodies: list[bytes]) -> float:
    """Map each batch as the gateway does, then publish it directly: events/s."""
    mapping = load_mappings()["douyin"]
    publisher = Forwarder(amqp_url)
    now = datetime.now(UTC)
    started = time.perf_counter()
    sent = 0
    for body in bodies:
        unpacked = douyin_unpack(body, mapping, 100_000)
        assert isinstance(unpacked, Unpacked)
        messages = []
        for message in unpacked.messages:
            verdict = map_message(mapping, message, now)
            for event in getattr(verdict, "events", ()):
                messages.append((EVENTS_EXCHANGE, event.event.type,
                                 json.dumps(event.body, ensure_ascii=False).encode(),
                                 event.event.event_id, None))
        publisher.forward(messages)
        sent += len(messages)
    elapsed = time.perf_counter() - started
    publisher.close()
    return sent / elapsed


@contextlib.contextmanager
def gateway_process(amqp_url: str) -> Iterator[tuple[str, int]]:
    port = free_port()
    env = {**os.environ, **GATEWAY_ENV, "AFTERSALES_AMQP_URL": amqp_url,
           "AFTERSALES_GATEWAY_PORT": str(port), "AFTERSALES_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "aftersales_cli.cli", "run", "gateway"],
                            cwd=ROOT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the gateway did not become ready")
            time.sleep(0.1)
        yield url, proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def through_gateway(url: str, bodies: list[bytes], clients: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()
    work = list(enumerate(bodies))

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while True:
                with lock:
                    if not work:
                        return
                    _i, body = work.pop()
                started = time.perf_counter()
                answer = http.post(f"{url}/platforms/douyin/messages", content=body,
                                   headers=douyin_headers(body))
                took = time.perf_counter() - started
                if answer.status_code != 200 or answer.json() != {"code": 0, "msg": "success"}:
                    raise SystemExit(f"gateway answered {answer.status_code}: {answer.text}")
                with lock:
                    latencies.append(took)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started, latencies


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    with own_vhost(NAME, f"{AMQP_HOST}:5672") as amqp_url:
        base_rate = baseline(amqp_url, batches(args.messages, args.batch, "base"))
        bodies = batches(args.messages, args.batch, "gw")
        with gateway_process(amqp_url) as (url, pid):
            through_gateway(url, bodies[:5], 1)  # warm up (imports, first connection)
            elapsed, latencies = through_gateway(url, bodies, args.clients)
            rss = rss_kib(pid)
    cut = statistics.quantiles(latencies, n=100)
    result: dict[str, Any] = {
        "messages": args.messages, "batch": args.batch, "clients": args.clients,
        "baseline_events_per_s": round(base_rate),
        "gateway_messages_per_s": round(args.messages / elapsed),
        "request_latency_ms": {"p50": round(cut[49] * 1000, 1), "p95": round(cut[94] * 1000, 1),
                               "p99": round(cut[98] * 1000, 1)},
        "gateway_rss_mib": round(rss / 1024, 1),
        "load_average": os.getloadavg(),
    }
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "gateway.json").write_text(json.dumps(result, indent=2))
    print(f"{'phase':<10} {'rate':>12}  detail")
    print(f"{'baseline':<10} {result['baseline_events_per_s']:>10}/s  map + the gateway's "
          f"publisher, {args.batch} per batch, one connection")
    print(f"{'gateway':<10} {result['gateway_messages_per_s']:>10}/s  {args.clients} clients, "
          f"{args.batch} per request; latency p50/p95/p99 "
          f"{result['request_latency_ms']['p50']}/{result['request_latency_ms']['p95']}/"
          f"{result['request_latency_ms']['p99']} ms; RSS {result['gateway_rss_mib']} MiB")
    print(f"load average {result['load_average']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
