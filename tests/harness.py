"""Running the services as real processes in tests, and watching what they publish."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import pika

from shared.amqp import DECISIONS_EXCHANGE, EVENTS_EXCHANGE, REJECTED_QUEUE, declare_topology
from tests.conftest import wait_for
from tests.platform_messages import GATEWAY_ENV
from tests.resources import free_port

ROOT = Path(__file__).resolve().parents[1]


def signal_group(pgid: int, sig: int) -> None:
    """`sig` to a service's process group, if it is still there."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class System:
    """The four services, each its own process group, on the test's database and vhost.

    With `copies` > 1, each service runs that many times as separate processes (as
    separate pods would), named "timer.1", "timer.2"... each with its own metrics port;
    `log("timer")` reads all the copies' logs."""

    def __init__(self, env: dict[str, str], log_dir: Path, copies: int = 1) -> None:
        self.env = env
        self.log_dir = log_dir
        self.ports = {name if copies == 1 else f"{name}.{i}": free_port()
                      for name in ("intake", "timer", "resolver", "notifier")
                      for i in range(1, copies + 1)}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: dict[str, int] = {}
        # Extra environment for one service only (e.g. libfaketime on the resolver).
        self.service_env: dict[str, dict[str, str]] = {}

    def start(self, *services: str) -> None:
        for service in services:
            if service in self.procs and self.procs[service].poll() is None:
                continue
            self.starts[service] = self.starts.get(service, 0) + 1
            log = open(self.log_dir / f"{service}.{self.starts[service]}.log", "wb")
            env = {**os.environ, **self.env,
                   "AFTERSALES_METRICS_PORT": str(self.ports[service]),
                   "AFTERSALES_METRICS_DIR": str(self.log_dir / "metrics"),
                   **self.service_env.get(service, {})}
            self.procs[service] = subprocess.Popen(
                [sys.executable, "-m", "aftersales_cli.cli", "run", service.split(".")[0]],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill the whole tree at once
            )

    def kill(self, service: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(service)
        signal_group(proc.pid, sig)
        proc.wait(timeout=30)
        if sig != signal.SIGKILL:
            return
        # SIGKILL to the group reaches every child; wait until none is left.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def kill_worker(self, service: str, name: str) -> int:
        """SIGKILL one worker child (by its process name, e.g. "as-outbox"); the
        service's supervisor starts a new one. Returns the killed pid."""
        pgid = self.procs[service].pid
        deadline = time.monotonic() + 30  # a just-restarted service may not have forked yet
        while time.monotonic() < deadline:
            for pid, comm in process_group_members(pgid):
                if comm == name:
                    os.kill(pid, signal.SIGKILL)
                    return pid
            time.sleep(0.05)
        raise AssertionError(f"no {name} process in {service}'s group")

    def stop(self) -> None:
        """SIGTERM to every service at once, then wait for each: each shuts down
        gracefully on its own, so stopping them one after another only adds up the waits."""
        procs = list(self.procs.values())
        self.procs.clear()
        for proc in procs:
            signal_group(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=30)

    def log(self, service: str) -> str:
        return "\n".join(p.read_text(errors="replace")
                         for p in sorted(self.log_dir.glob(f"{service}.*.log")))

    def metrics(self, service: str) -> str:
        import urllib.request

        url = f"http://127.0.0.1:{self.ports[service]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()

    def metrics_ready(self, service: str) -> bool:
        try:
            self.metrics(service)
            return True
        except OSError:
            return False


class Gateway:
    """`aftersales run gateway` as its own process group on a free port."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.port = free_port()
        self.env = {**os.environ, **env, **GATEWAY_ENV,
                    "AFTERSALES_GATEWAY_PORT": str(self.port),
                    "AFTERSALES_METRICS_DIR": str(log_dir / "gateway-metrics")}
        self.log_dir = log_dir
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        log = open(self.log_dir / f"gateway.{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aftersales_cli.cli", "run", "gateway"], cwd=ROOT, env=self.env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.healthy, timeout=60, what="the gateway to answer /healthz")

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        signal_group(self.proc.pid, sig)
        self.proc.wait(timeout=30)
        self.proc = None

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace")
                         for p in sorted(self.log_dir.glob("gateway.*.log")))

    def post(self, platform: str, body: bytes, headers: dict[str, str] | None = None,
             params: dict[str, str] | None = None) -> httpx.Response:
        return httpx.post(f"{self.url}/platforms/{platform}/messages", content=body,
                          headers=headers or {}, params=params, timeout=60)

    def deliver(self, platform: str, body: bytes, headers: dict[str, str] | None = None,
                params: dict[str, str] | None = None) -> httpx.Response:
        """As the platform delivers: sent again while the gateway answers 503 (RabbitMQ
        away for a moment: other test sessions on this machine restart it)."""
        answers: list[httpx.Response] = []

        def taken() -> bool:
            answers.append(self.post(platform, body, headers, params))
            return answers[-1].status_code != 503

        wait_for(taken, timeout=120, interval=0.5, what=f"{platform}: an answer other than 503")
        return answers[-1]


class Console:
    """`aftersales run console` as its own process group on a free port."""

    def __init__(self, env: dict[str, str], log_dir: Path, name: str = "console") -> None:
        self.port = free_port()
        self.env = {**os.environ, **env, "AFTERSALES_CONSOLE_PORT": str(self.port)}
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aftersales_cli.cli", "run", "console"], cwd=ROOT, env=self.env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.healthy, timeout=60, what="the console to answer /healthz")

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def get(self, path: str = "/") -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=30)

    def stop(self) -> None:
        if self.proc is None:
            return
        signal_group(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.proc = None


def publish_events(amqp_url: str, events: Iterable[dict[str, Any] | bytes],
                   routing_key: str | None = None) -> int:
    """Publish as an upstream would: persistent, confirmed, routing key = type."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        # As `aftersales publish` does: the queue exists before the first event, so nothing
        # published before intake first starts is lost.
        declare_topology(channel)
        channel.confirm_delivery()
        count = 0
        for event in events:
            body = event if isinstance(event, bytes) else json.dumps(event).encode()
            key = routing_key or (event.get("type", "x") if isinstance(event, dict) else "x")
            channel.basic_publish(EVENTS_EXCHANGE, key, body,
                                  pika.BasicProperties(delivery_mode=2), mandatory=True)
            count += 1
        return count
    finally:
        if connection.is_open:
            connection.close()


MARKER_PREFIX = "test-marker-"


class DecisionTap:
    """Binds its own queue to `aftersales.decisions` and collects everything published."""

    def __init__(self, amqp_url: str) -> None:
        self.amqp_url = amqp_url
        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DecisionTap:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("decision tap did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
                channel = connection.channel()
                declare_topology(channel)
                # A durable named queue survives a RabbitMQ restart in the fault tests.
                queue = "test.decision-tap"
                if not self._ready.is_set():
                    channel.queue_delete(queue)  # a fresh tap sees only what comes next
                channel.queue_declare(queue, durable=True)
                channel.queue_bind(queue, DECISIONS_EXCHANGE, "#")
                self._ready.set()
                for method, _props, body in channel.consume(queue, inactivity_timeout=0.1):
                    if self._stop.is_set():
                        break
                    if method is None:
                        continue
                    with self._lock:
                        self.messages.append(json.loads(body))
                    channel.basic_ack(method.delivery_tag)
                connection.close()
            except (pika.exceptions.AMQPError, OSError):
                time.sleep(0.5)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [m for m in self.messages if not str(m.get("decision_id")).startswith(
                MARKER_PREFIX)]

    def catch_up(self, timeout: float = 60) -> list[dict[str, Any]]:
        """Everything published to the exchange so far. A marker published now arrives
        after all of it (one FIFO queue), so a late repeat cannot be missed."""
        marker = f"{MARKER_PREFIX}{uuid.uuid4()}"
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        connection.channel().basic_publish(DECISIONS_EXCHANGE, "test.marker",
                                           json.dumps({"decision_id": marker}).encode())
        connection.close()

        def seen() -> bool:
            with self._lock:
                return any(m.get("decision_id") == marker for m in self.messages)

        wait_for(seen, timeout=timeout, what="the tap to catch up with the exchange")
        return self.snapshot()


def rejected_messages(amqp_url: str) -> list[tuple[bytes, dict[str, Any]]]:
    """Drain `aftersales.events.rejected` (body, headers)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    out = []
    try:
        channel = connection.channel()
        while True:
            method, props, body = channel.basic_get(REJECTED_QUEUE, auto_ack=True)
            if method is None:
                return out
            out.append((body, dict(props.headers or {})))
    finally:
        connection.close()


def process_group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, comm) of every process in a process group."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                out.append((int(entry.name), (entry / "comm").read_text().strip()))
        except (OSError, IndexError, ValueError):
            continue
    return out
