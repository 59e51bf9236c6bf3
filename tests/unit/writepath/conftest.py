"""The write path (intake, timer, resolver, relay) on the in-memory unit of work."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.intake.processor import IntakeProcessor
from services.resolver.resolve import Resolver
from shared.db.fake import FakeDatabase
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.notifications.policy import NotificationPolicy

T0 = datetime(2026, 11, 22, 2, 0, tzinfo=UTC)
OPS = {"emails": ["ops@example.com"], "phones": []}


def ev(event_id: str, type_: str, case_id: str = "AS1", at: datetime = T0,
       data: dict[str, Any] | None = None, **extra: Any) -> bytes:
    return json.dumps({
        "event_id": event_id, "type": type_, "occurred_at": at.isoformat(),
        "platform": "kuaishou", "shop_id": "S1", "order_id": "O1", "case_id": case_id,
        "data": data or {}, **extra,
    }).encode()


def opened(event_id: str, case_id: str = "AS1", at: datetime = T0) -> bytes:
    return ev(event_id, "case.opened", case_id, at, {
        "kind": "exchange", "amount_fen": 12900, "reason": "尺码不合适",
        "buyer": {"phone": "13800000000"}, "merchant": {"email": "shop@example.com"},
    })


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
