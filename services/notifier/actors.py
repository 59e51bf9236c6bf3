"""The notifier's Dramatiq actor: thin, it decodes the ids and hands them to the sender in
one call (the sender claims and records them in chunks, see sender.py)."""

from __future__ import annotations

import dramatiq

from services.notifier.sender import NotificationSender, SendOutcome
from shared import metrics
from shared.amqp import NOTIFIER_QUEUE, SEND_NOTIFICATION_ACTOR
from shared.worker import batch_actor

# The metric counts what happened to a notification, not the bookkeeping of a message.
_COUNTED = {"sent", "deferred", "retried", "failed", "duplicate"}


def count(outcome: SendOutcome) -> None:
    if outcome.outcome in _COUNTED and outcome.channel:
        metrics.record_notification(outcome.channel, outcome.outcome)


def register(broker: dramatiq.Broker, sender: NotificationSender
             ) -> dramatiq.Actor[[list[int]], None]:
    def send_notifications(notification_ids: list[int]) -> None:
        # Counted as each outcome is committed: a batch that fails half way has its
        # committed half counted, as when ids were sent one by one.
        sender.send_many([int(i) for i in notification_ids], on_outcome=count)

    # Provider failures are handled inside (deferral with send_after).
    return batch_actor(broker, NOTIFIER_QUEUE, SEND_NOTIFICATION_ACTOR, send_notifications)
