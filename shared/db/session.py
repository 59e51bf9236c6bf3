"""Engine and transactions. Built by the composition root, never at import time."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

# psycopg prepares a statement after a few executions, and PostgreSQL then switches a
# prepared statement to a generic plan if it costs no more than the custom ones. Planned
# while the tables are small (a new deployment, a new partition, a drained backlog), that
# generic plan is a sequential scan, and it stays until the next ANALYZE, which on a
# quickly growing table is minutes away: in the end-to-end benchmark every intake batch
# scanned all of `case_events` and `deadlines`, and latency grew second by second.
# A custom plan per execution sees the real array of ids and picks the index; planning
# these short statements costs little next to a batch.
PLAN_EVERY_EXECUTION = "-c plan_cache_mode=force_custom_plan"
# The exception, for a statement whose planning costs more than running it: one plan kept
# per connection, which may not scan (made while a table is still empty, a sequential scan
# looks cheapest and would then stay; tests/integration/test_query_plans.py). The notifier's
# hand-overs (a row by id, planned per execution, cost twice as much: docs/benchmarks.md
# "Session 7"), and reads by a key that is not the partition key, which are planned once
# per monthly partition.
KEEP_INDEX_PLANS = "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off"
USUAL_PLANS = "RESET plan_cache_mode; RESET enable_seqscan"


@contextmanager
def index_plans_kept(session: Session) -> Iterator[None]:
    """Within a transaction: the statements run inside keep their plans (KEEP_INDEX_PLANS).
    The settings are reset after them; if one fails, the transaction's rollback undoes
    them."""
    session.execute(text(KEEP_INDEX_PLANS))
    yield
    session.execute(text(USUAL_PLANS))


@dataclass(frozen=True)
class SessionLimits:
    """Per-session timeouts and TCP keepalives (shared.config: AFTERSALES_DB_*)."""

    statement_timeout_ms: int = 60_000
    lock_timeout_ms: int = 10_000
    keepalives_idle_s: int = 30
    keepalives_interval_s: int = 10
    keepalives_count: int = 3


def make_engine(database_url: str, pool_size: int = 5,
                limits: SessionLimits | None = None) -> Engine:
    limits = limits or SessionLimits()
    # A statement or lock wait beyond these is cancelled (an infrastructure error: the
    # batch is retried), instead of holding a worker and its locks for ever.
    options = (f"{PLAN_EVERY_EXECUTION} -c statement_timeout={limits.statement_timeout_ms}"
               f" -c lock_timeout={limits.lock_timeout_ms}")
    return create_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,  # survive a PostgreSQL restart: stale connections are replaced
        pool_recycle=1800,
        json_deserializer=read_json,
        connect_args={
            "options": options,
            # libpq TCP keepalives: a peer that vanished is noticed, not waited on.
            "keepalives": 1,
            "keepalives_idle": limits.keepalives_idle_s,
            "keepalives_interval": limits.keepalives_interval_s,
            "keepalives_count": limits.keepalives_count,
            "connect_timeout": 10,
        },
    )


def read_json(data: str | bytes) -> Any:
    """JSON columns read back (a case's snapshot on every event and decision), parsed in C.
    The numbers we store fit 64 bits (intake rejects others), and for those orjson gives
    what json.loads gives; a number beyond a double, which jsonb can hold, is left to
    json.loads rather than fail the read."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


class Database:
    """The unit of work: `with db.transaction() as s:` commits on success, rolls back on error."""

    def __init__(self, sql_engine: Engine) -> None:
        self.sql_engine = sql_engine
        self._sessions = sessionmaker(sql_engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    def session(self) -> Session:
        """A new session, for a unit of work that manages its transaction itself."""
        return self._sessions()

    def ping(self) -> None:
        with self.sql_engine.connect() as conn:
            conn.execute(text("SELECT 1"))


# The one clock that decides due-ness (the timer claims by `now()` in its statements):
# the database's, never the host's. `clock_timestamp()`, not `now()`, so a transaction
# that waited for locks decides at the time it actually decides.
DB_NOW = text("SELECT clock_timestamp()")


def db_now(session: Session) -> datetime:
    value = session.execute(DB_NOW).scalar_one()
    assert isinstance(value, datetime)
    return value


class DatabaseClock:
    """A reading of the database's clock, advanced by the host's monotonic clock (never
    its wall clock): the database's time without a round trip for each look."""

    def __init__(self, at: datetime) -> None:
        self.at = at
        self.started = time.monotonic()

    def __call__(self) -> datetime:
        return self.at + timedelta(seconds=self.age())

    def age(self) -> float:
        """Seconds since the reading."""
        return time.monotonic() - self.started
