"""What `/healthz` and `/readyz` answer, for the service's supervisor process.

- `/healthz` (liveness): the supervisor answers at all. Restarting the pod cannot fix a
  database outage, so liveness never looks at dependencies.
- `/readyz` (readiness): the dependencies answer (PostgreSQL, RabbitMQ, and Redis for the
  notifier), every worker process is up, the workers are not crash-looping (restarted
  `crash_restarts` times within `crash_window_s`), and the service is not shutting down.

Dependencies are checked on an interval by a background thread, never per probe: a
probe (or many) reads the last result.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

Check = Callable[[], None]  # raises when the dependency is not reachable


class Health:
    def __init__(self, checks: Mapping[str, Check] | None = None, *, interval_s: float = 5.0,
                 crash_restarts: int = 3, crash_window_s: float = 60.0) -> None:
        self.checks = dict(checks or {})
        self.interval_s = interval_s
        self.crash_restarts = crash_restarts
        self.crash_window_s = crash_window_s
        self._lock = threading.Lock()
        self._failing: dict[str, str] = {name: "not checked yet" for name in self.checks}
        self._workers_expected = 0
        self._workers_alive = 0
        self._restarts: deque[float] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> Health:
        if self.checks and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="health", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            self.check_now()
            time.sleep(self.interval_s)

    def check_now(self) -> None:
        failing: dict[str, str] = {}
        for name, check in self.checks.items():
            try:
                check()
            except Exception as exc:
                failing[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
        with self._lock:
            if failing.keys() != self._failing.keys():
                log.warning("readiness: dependencies failing: %s", failing or "none")
            self._failing = failing

    def workers(self, expected: int, alive: int) -> None:
        with self._lock:
            self._workers_expected, self._workers_alive = expected, alive

    def worker_restarted(self) -> None:
        with self._lock:
            self._restarts.append(time.monotonic())

    def stopping(self) -> None:
        with self._lock:
            self._stopping = True

    def readiness(self) -> tuple[bool, str]:
        """(ready, one line per problem or "ready")."""
        now = time.monotonic()
        with self._lock:
            while self._restarts and now - self._restarts[0] > self.crash_window_s:
                self._restarts.popleft()
            problems = [f"{name} unreachable: {why}" for name, why in self._failing.items()]
            if self._workers_alive < self._workers_expected:
                problems.append(f"workers up: {self._workers_alive} of "
                                f"{self._workers_expected}")
            if len(self._restarts) >= self.crash_restarts:
                problems.append(f"crash-looping: {len(self._restarts)} worker restarts in "
                                f"{self.crash_window_s:.0f}s")
            if self._stopping:
                problems.append("shutting down")
        return (not problems, "\n".join(problems) or "ready")


_current = Health()


def install(health: Health) -> Health:
    """Make `health` what this process's `/readyz` answers."""
    global _current
    _current = health
    return health


def current() -> Health:
    return _current


def database_check(db: object) -> Check:
    def check() -> None:
        db.ping()  # type: ignore[attr-defined]

    return check


def amqp_check(amqp_url: str) -> Check:
    def check() -> None:
        import pika

        from shared.amqp import connection_parameters_list

        params = connection_parameters_list(amqp_url)  # ready if any node answers
        for node in params:
            node.socket_timeout = 3
            node.blocked_connection_timeout = 3
        pika.BlockingConnection(params).close()

    return check


def redis_check(redis_url: str) -> Check:
    def check() -> None:
        import redis

        client = redis.Redis.from_url(redis_url, socket_timeout=3, socket_connect_timeout=3)
        try:
            client.ping()
        finally:
            client.close()

    return check
