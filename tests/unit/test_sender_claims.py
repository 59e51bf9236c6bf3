"""The sender's claim on the in-memory table: what it takes, what it settles without a
send, how a message is cut into chunks, and what an interrupted chunk leaves."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from services.notifier.channels import FakeChannel, SendResult
from services.notifier.delivery import QuietHours, RetryPolicy
from services.notifier.ratelimit import InMemoryRateLimiter
from services.notifier.sender import CHUNK, NotificationSender
from shared.db.notifications import NotificationStatus as S
from shared.notifications.policy import NotificationPolicy
from tests.unit.fake_notifications import T0, FakeNotifications

POLICY = NotificationPolicy.load(None)


class Interrupted(BaseException):
    """Stands for Dramatiq's Shutdown / TimeLimitExceeded, raised inside a send."""


def sender_on(table: FakeNotifications, channel: FakeChannel) -> NotificationSender:
    return NotificationSender(
        table, POLICY, {"email": channel}, InMemoryRateLimiter(),
        QuietHours.parse("off"), (), RetryPolicy())


def test_rows_waiting_are_sent_and_the_others_settled_without_a_send() -> None:
    table = FakeNotifications()
    waiting = table.add(status=S.NEW) + table.add(status=S.QUEUED) + table.add(status=S.PENDING)
    (sent,) = table.add(status=S.SENT)
    (failed,) = table.add(status=S.FAILED)
    # A worker died holding these two: it had handed the first to a provider.
    (in_flight,) = table.add(status=S.SENDING, claim_token="dead", handed_over_at=T0)
    (never_handed,) = table.add(status=S.SENDING, claim_token="dead")
    # Claimed by a notifier from before the stamps: it may be with a provider.
    (legacy,) = table.add(status=S.SENDING)
    (deferred,) = table.add(status=S.DEFERRED, send_after=T0 + timedelta(hours=1))
    channel = FakeChannel()

    outcomes = sender_on(table, channel).send_many(
        [*waiting, sent, failed, in_flight, never_handed, legacy, deferred, 999])

    assert [o.outcome for o in outcomes] == [
        "sent", "sent", "sent", "duplicate", "duplicate", "failed", "sent", "failed", "early",
        "missing"]
    assert set(channel.sends_per_key()) == {f"key-{i}" for i in [*waiting, never_handed]}
    assert table.status([*waiting, never_handed]) == [S.SENT] * 4
    assert table.status([sent, failed, deferred]) == [S.SENT, S.FAILED, S.DEFERRED]
    for unknown in (in_flight, legacy):
        assert table.rows[unknown].status == S.FAILED
        assert (table.rows[unknown].last_error or "").startswith("unknown")


def test_a_sent_row_keeps_the_provider_id_the_attempt_and_the_database_time() -> None:
    table = FakeNotifications()
    (i,) = table.add()
    sender_on(table, FakeChannel("acme")).send(i)
    row = table.rows[i]
    assert (row.status, row.attempts, row.provider_id) == (S.SENT, 1, "acme-1")
    assert row.sent_at is not None and row.sent_at - T0 < timedelta(seconds=5)


def test_a_message_of_ids_is_claimed_and_recorded_chunk_by_chunk() -> None:
    table = FakeNotifications()
    ids = table.add(CHUNK + 5)
    outcomes = sender_on(table, FakeChannel()).send_many(ids + ids[:1])
    assert [o.outcome for o in outcomes] == ["sent"] * (CHUNK + 5) + ["duplicate"]
    # claim 1 | record 1 + claim 2 | record 2 (the stamps go through a line of their own)
    assert table.commits == 3
    assert table.handed_over == ids


def test_each_row_is_stamped_handed_over_before_its_provider_call() -> None:
    table = FakeNotifications()
    ids = table.add(3)
    stamped_at_call: list[list[int]] = []

    class Watching(FakeChannel):
        def send(self, message: Any, dedup_key: str) -> SendResult:
            stamped_at_call.append(list(table.handed_over))
            return super().send(message, dedup_key)

    sender_on(table, Watching()).send_many(ids)
    assert stamped_at_call == [ids[:1], ids[:2], ids[:3]]


def test_a_row_taken_over_by_another_claim_is_sent_by_that_claim_only() -> None:
    """A duplicate message handled while the first worker is still sending (thought dead:
    its RabbitMQ connection dropped): every notification still goes out once."""
    table = FakeNotifications()
    ids = table.add(4)
    second_outcomes: list[str] = []

    class Redelivering(FakeChannel):
        redelivered = False

        def send(self, message: Any, dedup_key: str) -> SendResult:
            if not self.redelivered:  # during the first worker's first provider call
                self.redelivered = True
                second_outcomes.extend(o.outcome for o in sender_on(table, self).send_many(ids))
            return super().send(message, dedup_key)

    channel = Redelivering()
    first = sender_on(table, channel).send_many(ids)
    # The second claim found the first row with a provider: unknown; took the others.
    assert second_outcomes == ["failed", "sent", "sent", "sent"]
    assert [o.outcome for o in first] == ["sent", "duplicate", "duplicate", "duplicate"]
    assert sorted(channel.sends_per_key()) == sorted(f"key-{i}" for i in ids)
    assert set(channel.sends_per_key().values()) == {1}
    assert table.status(ids) == [S.SENT] * 4  # the first worker's result is the truth


def test_a_redelivered_message_sends_nothing_again() -> None:
    table = FakeNotifications()
    ids = table.add(3)
    channel = FakeChannel()
    sender_on(table, channel).send_many(ids)
    again = sender_on(table, channel).send_many(ids)
    assert [o.outcome for o in again] == ["duplicate"] * 3
    assert set(channel.sends_per_key().values()) == {1}


def test_an_interrupted_chunk_records_what_it_knows_and_hands_back_the_untried() -> None:
    table = FakeNotifications()
    ids = table.add(5)
    channel = FakeChannel(script=[None, Interrupted()])
    reported: list[str] = []
    with pytest.raises(Interrupted):
        sender_on(table, channel).send_many(ids, on_outcome=lambda o: reported.append(o.outcome))
    assert reported == ["sent"]
    assert table.status(ids) == [S.SENT, S.SENDING, S.QUEUED, S.QUEUED, S.QUEUED]
    assert table.handed_over == ids[:2]

    again = sender_on(table, channel).send_many(ids)  # Dramatiq redelivers the message
    assert [o.outcome for o in again] == ["duplicate", "failed", "sent", "sent", "sent"]
    assert (table.rows[ids[1]].last_error or "").startswith("unknown")
    assert set(channel.sends_per_key().values()) == {1}
