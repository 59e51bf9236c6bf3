"""An in-memory `notifications` table behind the sender's port
(services.notifier.sender.NotificationRepository), as NotificationStore does it on
PostgreSQL: a transaction works on a copy and commits it when its block ends."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared.db.notifications import UNKNOWN_ERROR, NotificationStatus

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai


@dataclass
class Row:
    id: int
    dedup_key: str
    case_id: str = "C-1"
    reason: str = "case.opened"
    party: str = "merchant"
    channel: str = "email"
    recipient: str = "shop@example.com"
    template: str = "case_opened.merchant"
    params: dict[str, Any] = field(default_factory=lambda: {"case_id": "C-1"})
    urgent: bool = True
    status: str = NotificationStatus.QUEUED
    attempts: int = 0
    send_after: datetime | None = None
    last_error: str | None = None
    provider_id: str | None = None
    created_at: datetime = T0
    sent_at: datetime | None = None


class FakeNotifications:
    """The table (`rows`), the commits made, and the transactions as the sender gets them."""

    def __init__(self, now: datetime = T0) -> None:
        self.rows: dict[int, Row] = {}
        self.now = now
        self.commits = 0
        self._ids = itertools.count(1)

    def add(self, n: int = 1, **columns: Any) -> list[int]:
        ids = []
        for _ in range(n):
            i = next(self._ids)
            self.rows[i] = Row(id=i, dedup_key=f"key-{i}", **columns)
            ids.append(i)
        return ids

    def status(self, ids: Sequence[int]) -> list[str]:
        return [str(self.rows[i].status) for i in ids]

    @contextmanager
    def transaction(self) -> Iterator[_FakeStore]:
        work = copy.deepcopy(self.rows)
        yield _FakeStore(work, self.now)
        self.rows = work
        self.commits += 1


class _FakeStore:
    def __init__(self, rows: dict[int, Row], now: datetime) -> None:
        self.rows = rows
        self._now = now

    def now(self) -> datetime:
        return self._now

    def lock(self, ids: Sequence[int]) -> list[Any]:
        return [copy.copy(self.rows[i]) for i in sorted(set(ids)) if i in self.rows]

    def mark_sending(self, ids: Sequence[int]) -> None:
        for i in ids:
            self.rows[i].status = NotificationStatus.SENDING

    def mark_unknown(self, ids: Sequence[int]) -> None:
        for i in ids:
            self.rows[i].status = NotificationStatus.FAILED
            self.rows[i].last_error = UNKNOWN_ERROR

    def record(self, results: Sequence[dict[str, Any]]) -> None:
        for v in results:
            row = self.rows[v["b_id"]]
            row.status = v["b_status"]
            row.attempts = v["b_attempts"]
            row.last_error = v["b_last_error"]
            row.sent_at = v["b_sent_at"] or row.sent_at
            row.provider_id = v["b_provider_id"] or row.provider_id
            row.send_after = v["b_send_after"] or row.send_after

    def release(self, rows: Sequence[tuple[int, str]]) -> None:
        for i, status in rows:
            if self.rows[i].status == NotificationStatus.SENDING:
                self.rows[i].status = status
