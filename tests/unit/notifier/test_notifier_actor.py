"""The notifier's actor: one send_many per message, metrics as the outcomes commit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
from dramatiq.brokers.stub import StubBroker

from services.notifier import actors
from services.notifier.sender import SendOutcome
from shared import metrics


class StubSender:
    def __init__(self, outcomes: list[SendOutcome]) -> None:
        self.outcomes = outcomes
        self.calls: list[list[int]] = []

    def send_many(self, ids: Sequence[int],
                  on_outcome: Callable[[SendOutcome], None] | None = None
                  ) -> list[SendOutcome]:
        self.calls.append(list(ids))
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
