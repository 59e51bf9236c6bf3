"""The unit of work: one transaction and the repositories of the tables it changes
(cosmicpython's AbstractUnitOfWork). Services get a factory from their composition root
and use it as

    with uow_factory() as uow:
        ... uow.cases.load(...), uow.deadlines.set_wanted(...) ...
        uow.commit()

Leaving the block without `commit` rolls everything back. `SqlUnitOfWork` runs on
PostgreSQL; `shared/db/fake.py` keeps the same tables in memory for unit tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import datetime
from types import TracebackType
from typing import Self

from sqlalchemy.orm import Session

from shared.db.case_log import CaseLogRepository, SqlCaseLog
from shared.db.cases import CaseRepository, SqlCases
from shared.db.deadlines import DeadlineRepository, SqlDeadlines
from shared.db.notifications import NotificationHandover, SqlNotificationHandover
from shared.db.outbox import OutboxRepository, SqlOutbox
from shared.db.session import Database, db_now


class UnitOfWork(ABC):
    cases: CaseRepository
    case_log: CaseLogRepository
    deadlines: DeadlineRepository
    outbox: OutboxRepository  # decisions and their outbox rows
    notifications: NotificationHandover

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.rollback()  # after a commit there is nothing left to roll back

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def rollback(self) -> None: ...

    @abstractmethod
    def now(self) -> datetime:
        """The database clock, the one that decides due-ness (read now, in this
        transaction)."""


UnitOfWorkFactory = Callable[[], UnitOfWork]


class SqlUnitOfWork(UnitOfWork):
    def __init__(self, db: Database) -> None:
        self.db = db
        self.session: Session | None = None

    def __enter__(self) -> Self:
        session = self.db.session()
        session.begin()
        self.session = session
        self.cases = SqlCases(session)
        self.case_log = SqlCaseLog(session)
        self.deadlines = SqlDeadlines(session)
        self.outbox = SqlOutbox(session)
        self.notifications = SqlNotificationHandover(session)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        session, self.session = self.session, None
        if session is not None:
            try:
                session.rollback()
            finally:
                session.close()

    def _session(self) -> Session:
        if self.session is None:
            raise RuntimeError("the unit of work is not open (use it in a with block)")
        return self.session

    def commit(self) -> None:
        self._session().commit()

    def rollback(self) -> None:
        self._session().rollback()

    def now(self) -> datetime:
        return db_now(self._session())


def sql_unit_of_work(db: Database) -> UnitOfWorkFactory:
    return lambda: SqlUnitOfWork(db)


def as_unit_of_work_factory(source: Database | UnitOfWorkFactory) -> UnitOfWorkFactory:
    """A service built with a `Database` (tests, tools, benchmarks) works on SQL units of
    work; given a factory (a composition root, or a unit test's fake), uses it."""
    return sql_unit_of_work(source) if isinstance(source, Database) else source
