"""The notifier's Dramatiq actor: thin, it decodes the ids and calls the sender for each
(each notification is claimed, sent and recorded on its own)."""

from __future__ import annotations

import dramatiq

from services.notifier.sender import NotificationSender
from shared import metrics
from shared.amqp import NOTIFIER_QUEUE, SEND_NOTIFICATION_ACTOR
from shared.worker import batch_actor

# The metric counts what happened to a notification, not the bookkeeping of a message.
_COUNTED = {"sent", "deferred", "retried", "failed", "duplicate"}


def register(broker: dramatiq.Broker, sender: NotificationSender
             ) -> dramatiq.Actor[[list[int]], None]:
    def send_notifications(notification_ids: list[int]) -> None:
        for notification_id in [int(i) for i in notification_ids]:
            outcome = sender.send(notification_id)
            if outcome.outcome in _COUNTED and outcome.channel:
                metrics.record_notification(outcome.channel, outcome.outcome)

    # Provider failures are handled inside (deferral with send_after).
    return batch_actor(broker, NOTIFIER_QUEUE, SEND_NOTIFICATION_ACTOR, send_notifications)
