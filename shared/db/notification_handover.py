"""The write path's side of `notifications` (the notifier's own outbox): rows written
`new` with the case change that caused them, and handed to the notifier by the timer.

(The notifier's sending side and the read side own the rest of the table's statements.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, cast

from sqlalchemy import Table, text
from sqlalchemy.orm import Session

from shared.db.bulk import bulk_insert
from shared.db.models import NotificationRow

_NOTIFICATIONS = cast(Table, NotificationRow.__table__)

# No RETURNING: the timer finds new notifications by status.
INSERT_NOTIFICATIONS = bulk_insert(_NOTIFICATIONS, [
    "dedup_key", "case_id", "reason", "party", "channel", "recipient", "template", "params",
    "urgent", "status"], "ON CONFLICT (dedup_key) DO NOTHING")
# Notifications to hand to the notifier: new ones, deferred ones whose time has come, and
# queued ones whose message was lost (the notifier gave up on it or died): oldest first.
CLAIM_NOTIFICATIONS = (
    text("""SELECT id FROM notifications WHERE status = 'new'
            ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED"""),
    text("""SELECT id FROM notifications WHERE status = 'deferred' AND send_after <= now()
            ORDER BY send_after LIMIT :limit FOR UPDATE SKIP LOCKED"""),
    text("""SELECT id FROM notifications
            WHERE status = 'queued' AND queued_at < now() - make_interval(secs => :after)
            ORDER BY queued_at LIMIT :limit FOR UPDATE SKIP LOCKED"""),
)
MARK_NOTIFICATIONS_QUEUED = text(
    "UPDATE notifications SET status = 'queued', queued_at = now() WHERE id = ANY(:ids)"
)

NEW = "new"  # the status a notification is written with


class NewNotification(Protocol):
    """A notification to write (shared.notifications.policy.NotificationRequest)."""

    @property
    def dedup_key(self) -> str: ...
    @property
    def case_id(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def party(self) -> str: ...
    @property
    def channel(self) -> str: ...
    @property
    def recipient(self) -> str: ...
    @property
    def template(self) -> str: ...
    @property
    def params(self) -> Mapping[str, Any]: ...
    @property
    def urgent(self) -> bool: ...


class NotificationHandover(Protocol):
    def add_new(self, notifications: Sequence[NewNotification]) -> int:
        """Write these `new` (a dedup key already stored is skipped); returns how many
        were offered."""

    def claim_for_notifier(self, limit: int, requeue_after_seconds: float) -> list[int]:
        """Lock the ids to hand over now (new, deferred until now, queued and lost)."""

    def mark_queued(self, ids: Sequence[int]) -> None: ...


class SqlNotificationHandover:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add_new(self, notifications: Sequence[NewNotification]) -> int:
        if not notifications:
            return 0
        INSERT_NOTIFICATIONS.execute(self.session.connection(), [
            {"dedup_key": n.dedup_key, "case_id": n.case_id, "reason": n.reason,
             "party": n.party, "channel": n.channel, "recipient": n.recipient,
             "template": n.template, "params": dict(n.params), "urgent": n.urgent,
             "status": NEW}
            for n in notifications
        ])
        return len(notifications)

    def claim_for_notifier(self, limit: int, requeue_after_seconds: float) -> list[int]:
        params = {"limit": limit, "after": requeue_after_seconds}
        return [r.id for claim in CLAIM_NOTIFICATIONS for r in self.session.execute(claim, params)]

    def mark_queued(self, ids: Sequence[int]) -> None:
        if ids:
            self.session.execute(MARK_NOTIFICATIONS_QUEUED, {"ids": list(ids)})
