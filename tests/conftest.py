"""Fixtures shared by the integration and end-to-end tests.

Each test session gets its own PostgreSQL database, RabbitMQ vhost and Redis key prefix,
so it never touches data that is not its own (and several sessions can run at once).
A missing service makes these fixtures fail, never skip: CI must not pass silently.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from typing import Any

import pika
import pytest
from psycopg.errors import DeadlockDetected
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from shared.db.session import Database, make_engine
from shared.schemas.events import Limits
from tests.resources import own_database, own_vhost

# For tests written on fixed dates (a weekday, a holiday, a quiet hour they are about):
# intake's plausible window reaches back to those dates however many years later they run.
FIXED_DATE_LIMITS = Limits(
    max_past=timedelta(days=(date.today() - date(2026, 1, 1)).days + 400))

RUN_ID = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
PG_ADMIN_URL = os.environ.get("AFTERSALES_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1/postgres")
AMQP_HOST = os.environ.get("AFTERSALES_TEST_AMQP_HOST", "127.0.0.1")
VHOST = f"aftersales-test-{RUN_ID}"
TABLES = ("outbox", "notifications", "decisions", "deadlines", "case_events", "cases",
          "case_event_conflicts", "case_notes")


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
             what: str = "condition", explain: Callable[[], str] | None = None,
             *, until: Callable[[Any], bool] = bool, or_last: bool = False) -> Any:
    """Poll until `predicate()` is truthy (or its value passes `until`), and return that
    value; fail with `what` after `timeout` seconds, and with what `explain()` says about
    the state then (for a failure seen only in CI). `or_last`: after `timeout`, return the
    last value instead (the caller judges it)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if until(value):
            return value
        if time.monotonic() > deadline:
            if or_last:
                return value
            detail = f"\n{explain()}" if explain is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with own_database(PG_ADMIN_URL, f"aftersales_test_{RUN_ID}") as url:
        yield url


def _empty_tables(sql_engine: Engine, attempts: int = 5) -> None:
    """TRUNCATE the project's tables. A module's services may still be running (the
    end-to-end tests share one system per module), and a service's transaction that
    holds one table while it reads the next can deadlock with the TRUNCATE's locks;
    PostgreSQL then aborts one of the two, and when it is ours we simply take it again."""
    for attempt in range(attempts):
        try:
            with sql_engine.begin() as conn:
                conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY"))
            return
        except OperationalError as error:
            if not isinstance(error.orig, DeadlockDetected) or attempt == attempts - 1:
                raise


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    sql_engine = make_engine(database_url)
    _empty_tables(sql_engine)
    yield Database(sql_engine)
    sql_engine.dispose()


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    with own_vhost(VHOST, f"{AMQP_HOST}:5672") as url:
        yield url


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
