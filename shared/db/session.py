"""Engine and transactions. Built by the composition root, never at import time."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
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


def is_infrastructure(exc: DBAPIError) -> bool:
    """Lost connections, restarts and deadlocks are worth retrying the whole batch; data
    errors (a value PostgreSQL refuses) are about one item only."""
    return bool(exc.connection_invalidated) or isinstance(
        exc, (OperationalError, InterfaceError)
    ) or type(exc.orig).__name__ in {"DeadlockDetected", "SerializationFailure",
                                     "AdminShutdown", "CannotConnectNow"}
