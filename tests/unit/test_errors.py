"""One error tree, and one rule (shared.errors.is_transient) that tells a retry from a
verdict; the actors act on it (dramatiq.Retry, throws=)."""

from __future__ import annotations

import dramatiq
import psycopg
import pytest
from dramatiq.brokers.stub import StubBroker
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError

from services.gateway.mapping import MappingError
from services.notifier.errors import PermanentSendError, ThrottledError, TransientSendError
from services.ops.actions import ActionError
from shared.domain.errors import RuleFileError
from shared.errors import (
    AftersalesError,
    ConfigError,
    InvalidInput,
    Permanent,
    Transient,
    is_transient,
)
from shared.worker import batch_actor


def db_error(kind: type[DBAPIError], orig: Exception, *, invalidated: bool = False
             ) -> DBAPIError:
    return kind("UPDATE deadlines SET status = %(s)s", {"s": "x"}, orig,
                connection_invalidated=invalidated)


@pytest.mark.parametrize("exc", [
    db_error(OperationalError, psycopg.OperationalError("server closed the connection")),
    db_error(OperationalError, psycopg.errors.AdminShutdown("terminating connection")),
    db_error(OperationalError, psycopg.errors.QueryCanceled("statement timeout")),
    # Named by PostgreSQL's error class, whatever SQLAlchemy wrapped it as.
    db_error(DBAPIError, psycopg.errors.DeadlockDetected("deadlock detected")),
    db_error(DBAPIError, psycopg.errors.SerializationFailure("could not serialize")),
    db_error(DBAPIError, psycopg.errors.LockNotAvailable("lock timeout")),
    db_error(IntegrityError, psycopg.errors.UniqueViolation("dup"), invalidated=True),
    TransientSendError("connection reset"),
    ThrottledError("slow down", retry_after=5),
], ids=repr)
def test_infrastructure_away_is_transient(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    db_error(DataError, psycopg.errors.NumericValueOutOfRange("integer out of range")),
    db_error(IntegrityError, psycopg.errors.UniqueViolation("duplicate key")),
    PermanentSendError("unknown number"),
    InvalidInput("no such case"),
    ConfigError("AFTERSALES_SMTP_PORT: bad"),
    ValueError("a bug"),
    KeyError("a bug"),
], ids=repr)
def test_data_errors_and_bugs_are_not_transient(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_one_root() -> None:
    for category in (ConfigError, InvalidInput, Transient, Permanent, RuleFileError,
                     ThrottledError, TransientSendError, PermanentSendError):
        assert issubclass(category, AftersalesError)
    assert issubclass(RuleFileError, ConfigError)  # a broken rules file stops the start
    assert issubclass(MappingError, ConfigError)
    assert issubclass(ActionError, InvalidInput)
    assert issubclass(ThrottledError, Transient)
    assert issubclass(PermanentSendError, Permanent)


@pytest.fixture
def broker() -> StubBroker:
    stub = StubBroker()
    stub.emit_after("process_boot")
    return stub


def run_until_idle(broker: StubBroker) -> None:
    worker = dramatiq.Worker(broker, worker_timeout=50)
    worker.start()
    try:
        broker.join("work", fail_fast=False)
        worker.join()
    finally:
        worker.stop()


def test_an_actor_retries_a_transient_failure(broker: StubBroker) -> None:
    calls: list[list[int]] = []

    def fire(ids: list[int]) -> None:
        calls.append(ids)
        if len(calls) == 1:
            raise db_error(OperationalError, psycopg.OperationalError("server closed"))

    batch_actor(broker, "work", "fire", fire).send([1, 2])
    run_until_idle(broker)
    assert calls == [[1, 2], [1, 2]]
    assert broker.dead_letters == []


def test_an_actor_does_not_retry_what_retrying_cannot_fix(broker: StubBroker) -> None:
    calls: list[list[int]] = []

    def fire(ids: list[int]) -> None:
        calls.append(ids)
        raise PermanentSendError("refused for good")

    batch_actor(broker, "work", "fire", fire).send([7])
    run_until_idle(broker)
    assert calls == [[7]]
    assert len(broker.dead_letters) == 1


def test_an_actor_raises_a_transient_failure_as_retry_and_a_bug_as_itself(
        broker: StubBroker) -> None:
    def down(ids: list[int]) -> None:
        raise db_error(OperationalError, psycopg.OperationalError("server closed"))

    def bug(ids: list[int]) -> None:
        raise ZeroDivisionError

    with pytest.raises(dramatiq.Retry):
        batch_actor(broker, "work", "down", down)([1])
    with pytest.raises(ZeroDivisionError):
        batch_actor(broker, "work", "bug", bug)([1])
