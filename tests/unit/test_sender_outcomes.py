"""What the sender records for each way a hand-over can end, on the in-memory table:
sent, refused, throttled, rate-limited, the limiter down, expired, ambiguous."""

from __future__ import annotations

from datetime import datetime, timedelta

from services.notifier.channels import FakeChannel
from services.notifier.delivery import QuietHours, RetryPolicy
from services.notifier.errors import PermanentSendError, ThrottledError, TransientSendError
from services.notifier.ratelimit import InMemoryRateLimiter, RateLimit
from services.notifier.sender import NotificationSender
from shared.db.notifications import NotificationStatus as S
from shared.notifications.policy import NotificationPolicy
from tests.unit.fake_notifications import T0, FakeNotifications

POLICY = NotificationPolicy.load(None)


class DownLimiter(InMemoryRateLimiter):
    def acquire_many(self, *args: object, **kwargs: object) -> list[float | None]:
        raise ConnectionError("redis: connection refused")


def sender_on(table: FakeNotifications, channel: FakeChannel, *,
              limiter: InMemoryRateLimiter | None = None,
              limits: tuple[RateLimit, ...] = (),
              valid_for: timedelta | None = None) -> NotificationSender:
    return NotificationSender(
        table, POLICY, {"email": channel}, limiter or InMemoryRateLimiter(),
        QuietHours.parse("off"), limits, RetryPolicy(), valid_for=valid_for)


def later_than_now(at: datetime | None) -> bool:
    return at is not None and at > T0


def test_a_refusal_fails_the_row_for_good_after_one_attempt() -> None:
    table = FakeNotifications()
    (i,) = table.add()
    channel = FakeChannel(script=[PermanentSendError("550 mailbox unavailable", code="550")])
    assert sender_on(table, channel).send(i).outcome == "failed"
    row = table.rows[i]
    assert (row.status, row.attempts) == (S.FAILED, 1)
    assert "550" in (row.last_error or "")
    assert sender_on(table, channel).send(i).outcome == "duplicate"
    assert channel.calls == 1


def test_a_throttled_send_waits_for_the_providers_hint_and_counts_an_attempt() -> None:
    table = FakeNotifications()
    (i,) = table.add()
    channel = FakeChannel(script=[ThrottledError("slow down", retry_after=120)])
    assert sender_on(table, channel).send(i).outcome == "retried"
    row = table.rows[i]
    assert (row.status, row.attempts) == (S.DEFERRED, 1)
    assert row.send_after is not None and row.send_after >= T0 + timedelta(seconds=120)


def test_past_the_rate_limit_a_row_is_deferred_without_an_attempt() -> None:
    table = FakeNotifications()
    first, second = table.add(2)
    channel = FakeChannel()
    limits = (RateLimit("email", 1, 3600),)
    outcomes = sender_on(table, channel, limits=limits).send_many([first, second])
    assert [o.outcome for o in outcomes] == ["sent", "deferred"]
    row = table.rows[second]
    assert (row.status, row.attempts) == (S.DEFERRED, 0)
    assert later_than_now(row.send_after)
    assert channel.calls == 1


def test_with_the_limiter_down_rows_wait_and_nothing_is_sent() -> None:
    table = FakeNotifications()
    ids = table.add(2)
    channel = FakeChannel()
    limits = (RateLimit("email", 10, 3600),)
    outcomes = sender_on(table, channel, limiter=DownLimiter(), limits=limits).send_many(ids)
    assert [o.outcome for o in outcomes] == ["deferred", "deferred"]
    assert [(table.rows[i].status, table.rows[i].attempts) for i in ids] == [(S.DEFERRED, 0)] * 2
    assert all(later_than_now(table.rows[i].send_after) for i in ids)
    assert channel.calls == 0


def test_a_row_older_than_its_validity_expires_unsent() -> None:
    table = FakeNotifications()
    (old,) = table.add(created_at=T0 - timedelta(hours=25))
    (fresh,) = table.add(created_at=T0 - timedelta(hours=1))
    channel = FakeChannel()
    outcomes = sender_on(table, channel, valid_for=timedelta(hours=24)).send_many([old, fresh])
    assert [o.outcome for o in outcomes] == ["failed", "sent"]
    assert "expired" in (table.rows[old].last_error or "")
    assert set(channel.sends_per_key()) == {f"key-{fresh}"}


def test_a_send_that_may_have_arrived_is_failed_not_repeated() -> None:
    table = FakeNotifications()
    (i,) = table.add()
    channel = FakeChannel(script=[TransientSendError("timeout after DATA", maybe_sent=True)])
    assert sender_on(table, channel).send(i).outcome == "failed"
    assert table.rows[i].status == S.FAILED and table.rows[i].attempts == 1
    assert sender_on(table, channel).send(i).outcome == "duplicate"
    assert channel.calls == 1


def test_a_transient_failure_is_retried_later() -> None:
    table = FakeNotifications()
    (i,) = table.add()
    channel = FakeChannel(script=[TransientSendError("connection refused")])
    assert sender_on(table, channel).send(i).outcome == "retried"
    row = table.rows[i]
    assert (row.status, row.attempts) == (S.DEFERRED, 1) and later_than_now(row.send_after)
