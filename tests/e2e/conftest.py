"""The four services as real processes on the test session's database and vhost."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.harness import System


@pytest.fixture(scope="module")
def system(database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[System]:
    log_dir: Path = tmp_path_factory.mktemp("services")
    env = {
        "AFTERSALES_DATABASE_URL": database_url,
        "AFTERSALES_AMQP_URL": amqp_url,
        "AFTERSALES_REDIS_PREFIX": f"aftersales-test:{log_dir.name}:",
        "AFTERSALES_EMAIL_TRANSPORT": "log",
        "AFTERSALES_TIMER_POLL_SECONDS": "0.1",
        "AFTERSALES_OUTBOX_POLL_SECONDS": "0.1",
        # Faults leave deadlines dispatched with their message lost; pick them up soon.
        "AFTERSALES_TIMER_REDISPATCH_SECONDS": "10",
        "AFTERSALES_LOG_LEVEL": "INFO",
        "AFTERSALES_BACKLOG_INTERVAL_SECONDS": "0.5",
    }
    system = System(env, log_dir)
    system.start("intake", "timer", "resolver", "notifier")
    try:
        for service in ("intake", "timer", "resolver", "notifier"):
            wait_for(lambda s=service: system.metrics_ready(s), timeout=60,
                     what=f"{service} to serve metrics")
        yield system
    finally:
        system.stop()
