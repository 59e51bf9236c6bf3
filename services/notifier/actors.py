"""The notifier's Dramatiq actor: thin, it decodes the ids and hands them to the sender in
one call (the sender claims and records them in chunks, see sender.py)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import dramatiq

from services.notifier.sender import NotificationSender, SendOutcome
from shared import metrics
from shared.amqp import NOTIFIER_QUEUE, SEND_NOTIFICATION_ACTOR
from shared.db.notifications import MadeBetween
from shared.worker import batch_actor

log = logging.getLogger(__name__)

# The metric counts what happened to a notification, not the bookkeeping of a message.
_COUNTED = {"sent", "deferred", "retried", "failed", "duplicate"}


def count(outcome: SendOutcome) -> None:
    if outcome.outcome in _COUNTED and outcome.channel:
        metrics.record_notification(outcome.channel, outcome.outcome)


def made_between(about: tuple[Any, ...]) -> MadeBetween | None:
    """The span of the rows' creation times the timer puts in a message, or None: absent
    (a message from before it did) or not two ISO 8601 times with a zone. Without it the
    rows are found by id alone, in every monthly partition: slower, still right, so a
    message is never refused for it."""
    try:
        since, until = (datetime.fromisoformat(t) for t in about[0])
    except (IndexError, TypeError, ValueError):
        if about:
            log.warning("send_notifications: creation times not understood; "
                        "finding the rows by id alone")
        return None
    if since.tzinfo is None or until.tzinfo is None:
        return None
    return since, until


def register(broker: dramatiq.Broker, sender: NotificationSender
             ) -> dramatiq.Actor[..., None]:
    def send_notifications(notification_ids: list[int], *about: Any) -> None:
        # Counted as each outcome is committed: a batch that fails half way has its
        # committed half counted, as when ids were sent one by one.
        sender.send_many([int(i) for i in notification_ids], on_outcome=count,
                         made_between=made_between(about))

    # Provider failures are handled inside (deferral with send_after).
    return batch_actor(broker, NOTIFIER_QUEUE, SEND_NOTIFICATION_ACTOR, send_notifications)
