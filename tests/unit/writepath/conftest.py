"""The write path (intake, timer, resolver, relay) on the in-memory unit of work."""

from __future__ import annotations

from datetime import timedelta

import pytest
from writepath_support import OPS, T0

from services.intake.processor import IntakeProcessor
from services.resolver.resolve import Resolver
from shared.db.fake import FakeDatabase
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.notifications.policy import NotificationPolicy


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine(RuleBook.load(None), WorkCalendar(None))


@pytest.fixture(scope="session")
def policy() -> NotificationPolicy:
    return NotificationPolicy.load(None)


@pytest.fixture
def store() -> FakeDatabase:
    # the database clock a few hours after the events happened
    return FakeDatabase(clock=T0 + timedelta(hours=3))


@pytest.fixture
def intake(store: FakeDatabase, engine: Engine, policy: NotificationPolicy) -> IntakeProcessor:
    return IntakeProcessor(store, engine, policy, OPS, 64 * 1024)


@pytest.fixture
def resolver(store: FakeDatabase, engine: Engine, policy: NotificationPolicy) -> Resolver:
    return Resolver(store, engine, policy, OPS)
