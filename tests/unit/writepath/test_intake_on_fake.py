"""Intake's processor on the in-memory unit of work: verdicts, what is stored, and that
one bad event neither stops the batch nor is retried forever."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from writepath_support import OPS, T0, ev, opened

from services.intake.processor import IntakeProcessor
from shared.db.case_log import EventOutcome
from shared.db.deadlines import DeadlineStatus
from shared.db.fake import FakeDatabase
from shared.domain import Engine
from shared.notifications.policy import NotificationPolicy
from shared.schemas.events import RejectReason


def open_deadlines(store: FakeDatabase, case_id: str = "AS1") -> list[Any]:
    return [d for d in store.tables.deadlines.values()
            if d.spec.case_id == case_id and d.status == DeadlineStatus.pending]


def test_an_opening_event_stores_the_case_its_log_row_and_its_deadlines(
        store: FakeDatabase, intake: IntakeProcessor) -> None:
    result = intake.process([opened("e1")])
    assert [h.outcome for h in result.handled] == ["accepted"]
    case = store.tables.cases["AS1"]
    assert (case.status, case.step) == ("open", "merchant_response")
    assert store.tables.events["e1"].outcome == EventOutcome.applied
    deadline = [d for d in open_deadlines(store) if d.spec.purpose == "deadline"]
    # Kuaishou: the merchant has 48 h from the request to handle an exchange.
    assert [d.spec.due_at for d in deadline] == [T0 + timedelta(hours=48)]
    assert all(d.spec.fence == case.version for d in open_deadlines(store))
    assert store.tables.notifications, "the merchant is told about the request"


def test_a_duplicate_changes_nothing_and_other_content_is_a_conflict(
        store: FakeDatabase, intake: IntakeProcessor) -> None:
    intake.process([opened("e1")])
    before = store.tables.cases["AS1"]
    again = intake.process([opened("e1")])
    other = intake.process([opened("e1", at=T0 + timedelta(seconds=1))])
    assert [h.outcome for h in again.handled] == ["duplicate"]
    assert [h.outcome for h in other.handled] == ["conflict"]
    assert store.tables.cases["AS1"] == before
    assert [c.event_id for c in store.tables.conflicts] == ["e1"]


def test_an_event_before_its_case_is_parked_then_applied(
        store: FakeDatabase, intake: IntakeProcessor) -> None:
    first = intake.process([ev("e2", "merchant.approved", at=T0 + timedelta(hours=1))])
    assert [h.outcome for h in first.handled] == ["parked"]
    assert store.tables.events["e2"].outcome == EventOutcome.parked
    intake.process([opened("e1")])
    assert store.tables.events["e2"].outcome == EventOutcome.applied
    assert store.tables.cases["AS1"].step != "merchant_response"


def test_an_event_that_does_not_fit_is_logged_out_of_state(
        store: FakeDatabase, intake: IntakeProcessor) -> None:
    result = intake.process([opened("e1"),
                             ev("e2", "buyer.confirmed", at=T0 + timedelta(minutes=1))])
    assert [h.outcome for h in result.handled] == ["accepted", "out_of_state"]
    assert store.tables.events["e2"].outcome == EventOutcome.out_of_state


def test_a_case_another_worker_holds_is_deferred_and_the_rest_applied(
        store: FakeDatabase, intake: IntakeProcessor) -> None:
    store.held.add("AS2")
    result = intake.process([opened("e1"), opened("e2", case_id="AS2")])
    assert result.deferred == [1]
    assert set(store.tables.cases) == {"AS1"}
    assert "e2" not in store.tables.events


def test_a_bug_on_one_event_is_its_verdict_and_the_batch_goes_on(
        store: FakeDatabase, intake: IntakeProcessor, engine: Engine,
        monkeypatch: pytest.MonkeyPatch) -> None:
    real_apply = engine.apply

    def apply(case: Any, event: Any, now: Any) -> Any:
        if event.event_id == "bad":
            raise ZeroDivisionError("a bug")
        return real_apply(case, event, now)

    monkeypatch.setattr(engine, "apply", apply)
    result = intake.process([opened("e1"), opened("bad", case_id="AS2"),
                             opened("e3", case_id="AS3")])
    assert sorted(h.outcome for h in result.handled) == ["accepted", "accepted", "error"]
    assert store.tables.events["bad"].outcome == EventOutcome.error
    assert "ZeroDivisionError" in (store.tables.events["bad"].problem or "")
    assert set(store.tables.cases) == {"AS1", "AS3"}


def test_nothing_is_stored_when_the_unit_of_work_is_not_committed(
        store: FakeDatabase, intake: IntakeProcessor, monkeypatch: pytest.MonkeyPatch) -> None:
    """A transient database failure mid-batch raises to the consumer (which retries the
    batch) and leaves nothing behind."""
    from sqlalchemy.exc import OperationalError

    from shared.db.fake import FakeDeadlines

    def gone(*_args: Any) -> Any:
        raise OperationalError("INSERT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(FakeDeadlines, "set_wanted", gone)
    with pytest.raises(OperationalError):
        intake.process([opened("e1")])
    assert not store.tables.cases and not store.tables.events


def test_a_deadline_an_event_does_not_change_keeps_its_row(
        store: FakeDatabase, intake: IntakeProcessor) -> None:
    intake.process([opened("e1")])
    case = store.tables.cases["AS1"]
    kept = {d.id: d.spec for d in open_deadlines(store)}
    # The platform restates the deadline the case already has: nothing to change but
    # the case version.
    same = intake.process([ev("e2", "deadline.changed", at=T0 + timedelta(minutes=1),
                              due_at=case.step_due_at.isoformat())])
    assert [h.outcome for h in same.handled] == ["accepted"]
    after = store.tables.cases["AS1"]
    assert after.version > case.version
    rows = open_deadlines(store)
    assert {d.id for d in rows} == set(kept)  # same rows, same ids
    assert all(d.spec.fence == after.version for d in rows)  # for the case as it is now
    assert set(store.tables.deadlines) == set(kept)  # none deleted, none added


def test_a_changed_deadline_is_replaced(store: FakeDatabase, intake: IntakeProcessor) -> None:
    intake.process([opened("e1")])
    old = {d.id: d.spec for d in open_deadlines(store)}
    new_due = T0 + timedelta(hours=24)
    intake.process([ev("e2", "deadline.changed", at=T0 + timedelta(minutes=1),
                       due_at=new_due.isoformat())])
    rows = open_deadlines(store)
    deadline = [d for d in rows if d.spec.purpose == "deadline"]
    assert [d.spec.due_at for d in deadline] == [new_due]
    assert deadline[0].id not in old
    [old_deadline] = [i for i, spec in old.items() if spec.purpose == "deadline"]
    assert old_deadline not in store.tables.deadlines  # no longer wanted: deleted


class _CountingDatabase(FakeDatabase):
    """Counts the transactions opened."""

    def __init__(self, clock: Any) -> None:
        super().__init__(clock)
        self.opened = 0

    def unit_of_work(self) -> Any:
        self.opened += 1
        return super().unit_of_work()


def test_each_batch_is_one_transaction_after_the_first_clock_reading(
        store: FakeDatabase, engine: Engine) -> None:
    db = _CountingDatabase(store.clock)
    intake = IntakeProcessor(db, engine, NotificationPolicy.load(None), OPS, 64 * 1024)
    for n in range(3):
        assert [h.outcome for h in intake.process([opened(f"e{n}", f"AS{n}")]).handled] \
            == ["accepted"]
    # The first batch reads the database's clock on its own; the others reuse the last
    # batch's reading for the plausible-time window.
    assert db.opened == 1 + 3


def test_the_plausible_window_is_judged_by_the_databases_clock_not_the_hosts(
        engine: Engine) -> None:
    # The database's clock is a year behind the host's. By the host's, all three events
    # are a year old, which is plausible; by the database's, the third is six minutes
    # ahead, more than the five allowed, even when the window reuses an earlier reading.
    db_time = T0 - timedelta(days=365)
    db = FakeDatabase(clock=db_time)
    intake = IntakeProcessor(db, engine, NotificationPolicy.load(None), OPS, 64 * 1024)
    first = intake.process([opened("e1", "AS1", at=db_time)])
    second = intake.process([opened("e2", "AS2", at=db_time + timedelta(minutes=4)),
                             opened("e3", "AS3", at=db_time + timedelta(minutes=6))])
    assert [h.outcome for h in first.handled] == ["accepted"]
    assert [h.outcome for h in second.handled] == ["accepted"]
    assert [r.reason for _i, r in second.rejected] == [RejectReason.implausible_time]
