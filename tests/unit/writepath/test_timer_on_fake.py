"""The timer's tick on the in-memory unit of work: what is due by the database clock is
handed to the resolver oldest first and marked dispatched; what is not due stays; a
failed publish leaves everything pending."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from writepath_support import T0, opened

from services.intake.processor import IntakeProcessor
from services.timer.loop import Timer
from shared.amqp import FIRE_DEADLINE_ACTOR, NOTIFIER_QUEUE, RESOLVER_QUEUE
from shared.db.deadlines import DeadlineStatus
from shared.db.fake import FakeDatabase


class Recording:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, str, tuple[Any, ...]]] = []
        self.fail = fail

    def publish(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("the timer sends actor messages only")

    def send_actor(self, queue_name: str, actor_name: str, *args: Any) -> None:
        if self.fail:
            raise ConnectionError("broker away")
        self.sent.append((queue_name, actor_name, args))


def deadline_ids(publisher: Recording) -> list[int]:
    return [i for q, a, args in publisher.sent if q == RESOLVER_QUEUE
            and a == FIRE_DEADLINE_ACTOR for i in args[0]]


@pytest.fixture
def two_cases(store: FakeDatabase, intake: IntakeProcessor) -> FakeDatabase:
    intake.process([opened("e1"), opened("e2", case_id="AS2", at=T0 + timedelta(hours=1))])
    return store


def test_due_deadlines_are_handed_over_oldest_first_and_marked_dispatched(
        two_cases: FakeDatabase) -> None:
    store = two_cases
    store.clock = T0 + timedelta(hours=48, minutes=30)  # AS1's 48 h passed, not AS2's
    publisher = Recording()
    result = Timer(store, publisher, batch=100, redispatch_after=60, max_rate=1000,
                   message_size=1).tick()
    due = sorted((d for d in store.tables.deadlines.values() if d.spec.due_at <= store.clock),
                 key=lambda d: d.spec.due_at)
    assert deadline_ids(publisher) == [d.id for d in due]
    assert all(d.status == DeadlineStatus.dispatched for d in due)
    assert result.fired == len(due) and result.redispatched == 0
    assert all(lateness >= 0 for _purpose, lateness in result.latenesses)
    later = [d for d in store.tables.deadlines.values() if d.spec.due_at > store.clock]
    assert later and all(d.status == DeadlineStatus.pending for d in later)


def test_nothing_due_sends_nothing_but_hands_over_new_notifications(
        two_cases: FakeDatabase) -> None:
    publisher = Recording()
    result = Timer(two_cases, publisher, batch=100, redispatch_after=60, max_rate=1000).tick()
    assert result.fired == 0 and deadline_ids(publisher) == []
    handed = [i for q, _a, args in publisher.sent if q == NOTIFIER_QUEUE for i in args[0]]
    assert sorted(handed) == sorted(two_cases.tables.notifications)
    assert {n.status for n in two_cases.tables.notifications.values()} == {"queued"}


def test_a_failed_publish_leaves_the_rows_pending(two_cases: FakeDatabase) -> None:
    two_cases.clock = T0 + timedelta(days=3)
    with pytest.raises(ConnectionError):
        Timer(two_cases, Recording(fail=True), batch=100, redispatch_after=60,
              max_rate=1000).tick()
    assert {d.status for d in two_cases.tables.deadlines.values()} == {DeadlineStatus.pending}


def test_dispatched_long_ago_and_never_finished_is_sent_again(two_cases: FakeDatabase) -> None:
    store = two_cases
    store.clock = T0 + timedelta(days=3)
    first = Recording()
    Timer(store, first, batch=100, redispatch_after=60, max_rate=1000).tick()
    store.advance(120)  # the resolver never finished them
    again = Recording()
    result = Timer(store, again, batch=100, redispatch_after=60, max_rate=1000).tick()
    assert result.redispatched == len(deadline_ids(first)) > 0
    assert sorted(deadline_ids(again)) == sorted(deadline_ids(first))
    assert {d.dispatch_count for d in store.tables.deadlines.values()
            if d.status == DeadlineStatus.dispatched} == {2}


def test_the_rate_limit_bounds_a_tick(two_cases: FakeDatabase) -> None:
    two_cases.clock = T0 + timedelta(days=3)
    publisher = Recording()
    result = Timer(two_cases, publisher, batch=100, redispatch_after=60, max_rate=2).tick()
    assert result.fired == 2 and len(deadline_ids(publisher)) == 2


class WithQueue(Recording):
    """A broker whose notifier queue holds `ready` messages; each one sent adds one."""

    def __init__(self, ready: int) -> None:
        super().__init__()
        self.ready = ready

    def send_actor(self, queue_name: str, actor_name: str, *args: Any) -> None:
        super().send_actor(queue_name, actor_name, *args)
        self.ready += queue_name == NOTIFIER_QUEUE

    def waiting(self, queue_name: str) -> int:
        assert queue_name == NOTIFIER_QUEUE
        return self.ready


def test_notifications_wait_in_the_table_while_the_notifiers_queue_is_full(
        two_cases: FakeDatabase) -> None:
    def notes() -> dict[int, Any]:  # each commit puts new tables in place
        return two_cases.tables.notifications

    assert len(notes()) >= 2
    full = WithQueue(ready=5)
    timer = Timer(two_cases, full, batch=100, redispatch_after=60, max_rate=1000,
                  message_size=1, notifier_queue_max=5)
    assert timer.tick().notifications == 0
    assert {n.status for n in notes().values()} == {"new"}
    # Room for one message of one notification: the one whose deferral has ended goes
    # first, before the new ones.
    last = max(notes())
    notes()[last].status, notes()[last].send_after = "deferred", two_cases.clock
    full.ready = 4
    assert timer.tick().notifications == 1
    assert [args[0] for q, _a, args in full.sent if q == NOTIFIER_QUEUE] == [[last]]
    assert full.ready == 5
    assert {i for i, n in notes().items() if n.status == "queued"} == {last}
