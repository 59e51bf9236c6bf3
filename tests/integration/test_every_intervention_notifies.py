"""Every intervention request notifies, a second one on the same case too; a redelivered
request does not notify twice."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from services.intake.processor import IntakeProcessor
from shared.db.models import NotificationRow
from shared.db.session import Database
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.notifications.policy import NotificationPolicy, OpsContacts

pytestmark = pytest.mark.integration

T0 = datetime.now(UTC) - timedelta(hours=1)


def event(n: int, type_: str, data: dict[str, Any]) -> bytes:
    return json.dumps({
        "event_id": f"IV-{n}", "type": type_,
        "occurred_at": (T0 + timedelta(minutes=n)).isoformat(), "platform": "kuaishou",
        "shop_id": "S1", "order_id": "O1", "case_id": "AS-IV", "data": data,
    }).encode()


def test_a_second_intervention_request_notifies_again(db: Database) -> None:
    policy = NotificationPolicy.load(None)
    ops = OpsContacts.parse("ops@example.com", "")
    intake = IntakeProcessor(db, Engine(RuleBook.load(None), WorkCalendar(None)), policy, ops,
                             64 * 1024)
    intake.process([event(0, "case.opened", {
        "kind": "exchange", "amount_fen": 100, "buyer": {"phone": "13800000000"},
        "merchant": {"email": "shop@example.com"}})])
    first = event(1, "intervention.requested", {"requested_by": "buyer", "reason": "x"})
    intake.process([first])
    intake.process([first])  # redelivered: still one notification per recipient
    intake.process([event(2, "intervention.resolved", {"outcome": "resume"})])
    intake.process([event(3, "intervention.requested", {"requested_by": "buyer",
                                                         "reason": "again"})])
    with db.transaction() as s:
        sent_to = Counter(s.execute(select(NotificationRow.party).where(
            NotificationRow.reason == "intervention.requested")).scalars())
    assert sent_to == {"ops": 2, "merchant": 2}
