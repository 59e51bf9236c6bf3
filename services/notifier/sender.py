"""The notifier's work on one notification row: claim it, send it (or defer it), record
what happened. Exactly once per dedup key:

1. Claim in its own transaction (rows `new`, `queued` or, from before 0002, `pending`):
   a row already `sent` or `failed` is a redelivery and
   does nothing; a row found `sending` means an earlier attempt died after the claim and
   may or may not have reached the provider. It is recorded as failed ("unknown"), not
   sent again: the issue's promise is never twice to the same person for the same
   reason, and ops see the failure.
2. Send outside any transaction (a slow provider must not hold database locks).
3. Record the result: sent, deferred (quiet hours, rate limit, retry later: the timer
   releases it at `send_after`), or failed (permanent, or out of attempts).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update

from services.notifier.channels.base import Channel
from services.notifier.delivery import QuietHours, RetryPolicy, decide_and_send
from services.notifier.ratelimit import RateLimit, RateLimiter
from shared.db.models import NotificationRow
from shared.db.session import Database
from shared.notifications.policy import NotificationPolicy, NotificationRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SendOutcome:
    outcome: str  # sent | deferred | retried | failed | duplicate | early | missing
    channel: str | None = None


class NotificationSender:
    def __init__(
        self,
        db: Database,
        policy: NotificationPolicy,
        channels: Mapping[str, Channel],
        limiter: RateLimiter,
        quiet_hours: QuietHours,
        limits: Sequence[RateLimit],
        retry: RetryPolicy,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.db = db
        self.policy = policy
        self.channels = channels
        self.limiter = limiter
        self.quiet_hours = quiet_hours
        self.limits = limits
        self.retry = retry
        self.clock = clock

    def send(self, notification_id: int) -> SendOutcome:
        claimed = self._claim(notification_id)
        if isinstance(claimed, SendOutcome):
            return claimed
        request, attempt = claimed
        result = decide_and_send(
            request,
            self.channels[request.channel],
            now=self.clock(),
            attempt=attempt,
            limiter=self.limiter,
            quiet_hours=self.quiet_hours,
            render=self.policy.render,
            limits=self.limits,
            retry=self.retry,
        )
        values: dict[str, object] = {"attempts": attempt if result.attempted else attempt - 1}
        if result.status == "sent":
            values.update(status="sent", sent_at=self.clock(), provider_id=result.provider_id,
                          last_error=None)
            outcome = "sent"
        elif result.status in ("deferred", "retry"):
            values.update(status="deferred", send_after=result.retry_at,
                          last_error=result.error or result.error_kind)
            outcome = "retried" if result.status == "retry" else "deferred"
        else:
            values.update(status="failed", last_error=result.error or result.error_kind)
            outcome = "failed"
        with self.db.transaction() as s:
            s.execute(update(NotificationRow).where(NotificationRow.id == notification_id)
                      .values(**values))
        return SendOutcome(outcome, request.channel)

    def _claim(self, notification_id: int) -> tuple[NotificationRequest, int] | SendOutcome:
        with self.db.transaction() as s:
            row = s.execute(
                select(NotificationRow).where(NotificationRow.id == notification_id)
                .with_for_update()
            ).scalar_one_or_none()
            if row is None:
                return SendOutcome("missing")
            if row.status in ("sent", "failed"):
                return SendOutcome("duplicate", row.channel)
            if row.status == "sending":
                log.error("notification %s was being sent when a worker died: recorded as "
                          "failed (unknown delivery), not sent twice", notification_id)
                row.status = "failed"
                row.last_error = "unknown: worker died during the send; not repeated"
                return SendOutcome("failed", row.channel)
            if row.status == "deferred":
                # Only the timer releases a deferred row (at send_after); a stray message
                # for it is a duplicate.
                return SendOutcome("early", row.channel)
            row.status = "sending"
            return NotificationRequest.from_row(row), row.attempts + 1
