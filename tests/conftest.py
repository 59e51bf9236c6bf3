"""Fixtures shared by the integration and end-to-end tests.

Each test session gets its own PostgreSQL database, RabbitMQ vhost and Redis key prefix,
so it never touches data that is not its own (and several sessions can run at once).
A missing service makes these fixtures fail, never skip: CI must not pass silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pika
import pytest
from sqlalchemy import create_engine, text

from shared.db.migrate import upgrade
from shared.db.session import Database, make_engine

RUN_ID = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
PG_ADMIN_URL = os.environ.get("AFTERSALES_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1/postgres")
AMQP_HOST = os.environ.get("AFTERSALES_TEST_AMQP_HOST", "127.0.0.1")
VHOST = f"aftersales-test-{RUN_ID}"
TABLES = ("outbox", "notifications", "decisions", "deadlines", "case_events", "cases",
          "case_event_conflicts", "case_notes")


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
             what: str = "condition", explain: Callable[[], str] | None = None) -> Any:
    """Poll until `predicate()` is truthy; fail with `what` after `timeout` seconds, and
    with what `explain()` says about the state then (for a failure seen only in CI)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{explain()}" if explain is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


def _rabbitmqctl(*args: str) -> None:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        raise RuntimeError("rabbitmqctl not found: the tests create their own vhost with it")
    subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    name = f"aftersales_test_{RUN_ID}"
    # pre-ping: the fault tests restart PostgreSQL; the drop at the end needs a live link.
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield url
    with admin.connect() as conn:
        conn.execute(text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
        ), {"n": name})
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    engine = make_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY"))
    yield Database(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    _rabbitmqctl("add_vhost", VHOST)
    _rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    yield f"amqp://guest:guest@{AMQP_HOST}:5672/{quote(VHOST, safe='')}"
    _rabbitmqctl("delete_vhost", VHOST)


@pytest.fixture
def amqp(amqp_url: str) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    """A channel on the test vhost, with the project's queues of the previous test gone."""
    from shared.amqp import (
        INTAKE_QUEUE,
        NOTIFIER_QUEUE,
        OUTBOX_LEDGER_QUEUE,
        REJECTED_QUEUE,
        RESOLVER_QUEUE,
    )

    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    for base in (INTAKE_QUEUE, REJECTED_QUEUE, RESOLVER_QUEUE, NOTIFIER_QUEUE):
        for queue in (base, f"{base}.DQ", f"{base}.XQ"):
            channel.queue_delete(queue)  # deleting a queue that does not exist is fine
    channel.queue_delete(OUTBOX_LEDGER_QUEUE)
    yield channel
    if connection.is_open:
        connection.close()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    import redis

    prefix = f"aftersales-test:{RUN_ID}:{uuid.uuid4().hex[:6]}:"
    client = redis.Redis.from_url(os.environ.get("AFTERSALES_TEST_REDIS", "redis://127.0.0.1:6379/0"))
    client.ping()
    yield prefix
    for key in client.scan_iter(match=prefix + "*"):
        client.delete(key)
    client.close()
