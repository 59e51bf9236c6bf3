"""Intake as a real process (`aftersales run intake`) on the test session's database and
vhost, for the tests that feed it bad input through the broker."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pika

from shared.amqp import INTAKE_QUEUE, REJECTED_QUEUE, declare_topology
from tests.conftest import wait_for
from tests.harness import System, process_group_members


@contextmanager
def intake_service(database_url: str, amqp_url: str, log_dir: Path, **settings: str
                   ) -> Iterator[System]:
    """Start intake alone with empty queues; stop it at the end."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    declare_topology(channel)
    channel.queue_purge(INTAKE_QUEUE)
    channel.queue_purge(REJECTED_QUEUE)
    connection.close()
    env = {"AFTERSALES_DATABASE_URL": database_url, "AFTERSALES_AMQP_URL": amqp_url,
           "AFTERSALES_LOG_LEVEL": "INFO",
           **{f"AFTERSALES_{k.upper()}": v for k, v in settings.items()}}
    system = System(env, log_dir)
    system.start("intake")
    try:
        wait_for(lambda: system.metrics_ready("intake"), timeout=60, what="intake's metrics")
        workers = int(settings.get("worker_processes", "1"))
        wait_for(lambda: len(worker_pids(system)) == workers, timeout=60,
                 what="every intake worker process started")
        yield system
    finally:
        system.stop()


def worker_pids(system: System) -> set[int]:
    """The intake worker processes (named `as-intake`) now running."""
    return {pid for pid, comm in process_group_members(system.procs["intake"].pid)
            if comm == "as-intake"}


def metric_sum(system: System, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in system.metrics("intake").splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total
