"""The notifier's actor: one send_many per message, metrics as the outcomes commit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from dramatiq.brokers.stub import StubBroker

from services.notifier import actors
from services.notifier.sender import SendOutcome
from shared import metrics
from shared.db.notifications import MadeBetween


class StubSender:
    def __init__(self, outcomes: list[SendOutcome]) -> None:
        self.outcomes = outcomes
        self.calls: list[list[int]] = []
        self.spans: list[MadeBetween | None] = []

    def send_many(self, ids: Sequence[int],
                  on_outcome: Callable[[SendOutcome], None] | None = None,
                  made_between: MadeBetween | None = None) -> list[SendOutcome]:
        self.calls.append(list(ids))
        self.spans.append(made_between)
        for o in self.outcomes:
            assert on_outcome is not None
            on_outcome(o)
        return self.outcomes


def test_one_send_many_per_message_and_the_same_metrics(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    counted: list[tuple[str, str]] = []
    monkeypatch.setattr(metrics, "record_notification", lambda c, o: counted.append((c, o)))
    sender = StubSender([
        SendOutcome("sent", "email"), SendOutcome("deferred", "sms"),
        SendOutcome("retried", "sms"), SendOutcome("failed", "email"),
        SendOutcome("duplicate", "email"), SendOutcome("early", "email"),
        SendOutcome("missing"),
    ])
    broker = StubBroker()
    actor: Any = actors.register(broker, sender)  # type: ignore[arg-type]
    actor.fn([3, "1", 2])
    assert sender.calls == [[3, 1, 2]]
    # early and missing are bookkeeping of a message, not something that happened to a
    # notification: not counted (as before).
    assert counted == [("email", "sent"), ("sms", "deferred"), ("sms", "retried"),
                       ("email", "failed"), ("email", "duplicate")]
    broker.close()


def test_the_creation_times_in_a_message_reach_the_sender_and_bad_ones_are_ignored() -> None:
    """The timer names when the rows were written (their partitions); a message without
    them (from an older timer), or with something else there, still has its rows sent,
    found by id alone."""
    sender = StubSender([])
    broker = StubBroker()
    actor: Any = actors.register(broker, sender)  # type: ignore[arg-type]
    since, until = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 2, 3, tzinfo=UTC)
    actor.fn([1], [since.isoformat(), until.isoformat()])
    actor.fn([2])
    for bad in (["yesterday", "today"], [since.isoformat()], 7, None,
                ["2026-11-01T00:00:00", "2026-11-02T00:00:00"]):  # no zone
        actor.fn([3], bad)
    assert sender.calls == [[1], [2]] + [[3]] * 5
    assert sender.spans == [(since, until)] + [None] * 6
    broker.close()
