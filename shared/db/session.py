"""Engine and transactions. Built by the composition root, never at import time."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker


def make_engine(database_url: str, pool_size: int = 5) -> Engine:
    return create_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,  # survive a PostgreSQL restart: stale connections are replaced
        pool_recycle=1800,
    )


class Database:
    """The unit of work: `with db.transaction() as s:` commits on success, rolls back on error."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))


def lock_case(session: Session, case_id: str) -> None:
    """Serialise every change of one case across all workers and services, including its
    creation (a row lock cannot lock a row that does not exist yet). Held until commit."""
    session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:case_id, 0))"),
        {"case_id": case_id},
    )
