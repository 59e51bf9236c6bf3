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

from shared.db.notifications import UNKNOWN_ERROR, MadeBetween, NotificationStatus

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
    claim_token: str | None = None
    handed_over_at: datetime | None = None


class FakeNotifications:
    """The table (`rows`), the transactions committed (`commits`), the rows stamped handed
    over in order; called, a transaction as the sender gets them."""

    def __init__(self, now: datetime = T0) -> None:
        self.rows: dict[int, Row] = {}
        self.now = now
        self.commits = 0
        self.handed_over: list[int] = []  # ids, in the order their stamp was committed
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
    def __call__(self) -> Iterator[_FakeStore]:
        """A transaction."""
        work = copy.deepcopy(self.rows)
        yield _FakeStore(work, self.now)
        self.rows = work
        self.commits += 1

    @contextmanager
    def hand_overs(self) -> Iterator[_FakeLine]:
        yield _FakeLine(self)


class _FakeLine:
    """Each call commits on its own."""

    def __init__(self, table: FakeNotifications) -> None:
        self.table = table

    def record_and_hand_over(self, results: Sequence[dict[str, Any]], ids: Sequence[int],
                             token: str, created: datetime | None = None) -> set[int]:
        store = _FakeStore(self.table.rows, self.table.now)
        store.record(results)
        taken = store.hand_over(ids, token)
        self.table.handed_over.extend(sorted(taken))
        return taken


class _FakeStore:
    def __init__(self, rows: dict[int, Row], now: datetime) -> None:
        self.rows = rows
        self._now = now

    def now(self) -> datetime:
        return self._now

    def lock(self, ids: Sequence[int], made_between: MadeBetween | None = None
             ) -> list[Any]:
        since, until = made_between or (datetime.min.replace(tzinfo=UTC),
                                        datetime.max.replace(tzinfo=UTC))
        return [copy.copy(self.rows[i]) for i in sorted(set(ids))
                if i in self.rows and since <= self.rows[i].created_at <= until]

    def claim(self, ids: Sequence[int], token: str) -> None:
        for i in ids:
            row = self.rows[i]
            row.status, row.claim_token = NotificationStatus.SENDING, token
            row.handed_over_at = None

    def hand_over(self, ids: Sequence[int], token: str) -> set[int]:
        taken = {i for i in ids if (r := self.rows[i]).claim_token == token
                 and r.status == NotificationStatus.SENDING and r.handed_over_at is None}
        for i in taken:
            self.rows[i].handed_over_at = self._now
        return taken

    def mark_unknown(self, ids: Sequence[int]) -> None:
        for i in ids:
            self.rows[i].status = NotificationStatus.FAILED
            self.rows[i].last_error = UNKNOWN_ERROR

    def record(self, results: Sequence[dict[str, Any]]) -> None:
        for v in results:
            row = self.rows[v["b_id"]]
            if row.claim_token != v["b_token"]:
                continue
            row.status = v["b_status"]
            row.attempts = v["b_attempts"]
            row.last_error = v["b_last_error"]
            row.sent_at = v["b_sent_at"] or row.sent_at
            row.provider_id = v["b_provider_id"] or row.provider_id
            row.send_after = v["b_send_after"] or row.send_after

    def release(self, rows: Sequence[tuple[int, str]], token: str) -> None:
        for i, status in rows:
            row = self.rows[i]
            if (row.status == NotificationStatus.SENDING and row.claim_token == token
                    and row.handed_over_at is None):
                row.status = status
