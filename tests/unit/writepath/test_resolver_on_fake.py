"""The resolver on the in-memory unit of work: a due deadline whose fence is the case's
version fires once (decision, outbox row, row finished); a redelivery, a stale fence, an
early one and a missing id do what the design says; a bug is recorded, not retried."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from writepath_support import T0, ev, opened

from services.intake.processor import IntakeProcessor
from services.resolver.resolve import Resolver
from shared.db.deadlines import DeadlineStatus
from shared.db.fake import DeadlineRecord, FakeDatabase
from shared.domain import Engine


def the_deadline(store: FakeDatabase, case_id: str = "AS1") -> DeadlineRecord:
    [row] = [d for d in store.tables.deadlines.values() if d.spec.case_id == case_id
             and d.spec.purpose == "deadline" and d.status in ("pending", "dispatched")]
    return row


@pytest.fixture
def opened_case(store: FakeDatabase, intake: IntakeProcessor) -> DeadlineRecord:
    intake.process([opened("e1")])
    return the_deadline(store)


def test_a_due_deadline_fires_once_with_its_decision_in_the_outbox(
        store: FakeDatabase, resolver: Resolver, opened_case: DeadlineRecord) -> None:
    store.clock = opened_case.spec.due_at + timedelta(seconds=1)
    batch = resolver.fire_many([opened_case.id])
    assert [r.outcome for r in batch.resolutions] == ["fired"]
    assert [d.type for d in batch.stored.decisions] == ["decision.auto_approved"]
    assert store.tables.deadlines[opened_case.id].status == DeadlineStatus.fired
    [message] = store.tables.outbox.values()
    body = json.loads(message.body)
    assert (message.routing_key, body["case_id"], body["decision_id"]) == (
        "decision.auto_approved", "AS1", message.message_id)
    assert store.tables.cases["AS1"].step != "merchant_response"
    again = resolver.fire_many([opened_case.id])
    assert [r.outcome for r in again.resolutions] == ["duplicate"]
    assert len(store.tables.outbox) == 1


def test_a_deadline_the_case_no_longer_wants_fires_nothing(
        store: FakeDatabase, intake: IntakeProcessor, resolver: Resolver,
        opened_case: DeadlineRecord) -> None:
    intake.process([ev("e2", "merchant.approved", at=T0 + timedelta(hours=1))])
    store.clock = opened_case.spec.due_at + timedelta(seconds=1)
    [resolution] = resolver.fire_many([opened_case.id]).resolutions
    assert resolution.outcome == "missing"  # no longer wanted by its case: deleted
    assert not store.tables.outbox


def test_a_row_fenced_for_a_version_the_case_left_is_stale(
        store: FakeDatabase, resolver: Resolver, opened_case: DeadlineRecord) -> None:
    """A row set for an earlier version of its case (rows no longer wanted are deleted, so
    only one written outside the wanted set, or by an older release, can be so) fires
    nothing and is finished `stale`."""
    opened_case.spec = replace(opened_case.spec, fence=opened_case.spec.fence - 1)
    store.clock = opened_case.spec.due_at + timedelta(seconds=1)
    [resolution] = resolver.fire_many([opened_case.id]).resolutions
    assert resolution.outcome == "stale"
    assert store.tables.deadlines[opened_case.id].status == DeadlineStatus.stale
    assert not store.tables.outbox


def test_a_kept_row_fires_at_the_version_it_was_moved_to(
        store: FakeDatabase, intake: IntakeProcessor, resolver: Resolver,
        opened_case: DeadlineRecord) -> None:
    """A deadline the event did not change keeps its row; its fence follows the case, so
    when it is due it fires (not stale)."""
    case = store.tables.cases["AS1"]
    intake.process([ev("e2", "deadline.changed", at=T0 + timedelta(minutes=1),
                       due_at=case.step_due_at.isoformat())])
    assert the_deadline(store).id == opened_case.id
    store.clock = opened_case.spec.due_at + timedelta(seconds=1)
    assert [r.outcome for r in resolver.fire_many([opened_case.id]).resolutions] == ["fired"]


def test_not_due_by_the_database_clock_goes_back_to_pending(
        store: FakeDatabase, resolver: Resolver, opened_case: DeadlineRecord) -> None:
    store.tables.deadlines[opened_case.id].status = DeadlineStatus.dispatched
    store.clock = opened_case.spec.due_at - timedelta(minutes=5)
    assert [r.outcome for r in resolver.fire_many([opened_case.id]).resolutions] == ["early"]
    assert store.tables.deadlines[opened_case.id].status == DeadlineStatus.pending


def test_an_unknown_id_is_missing(store: FakeDatabase, resolver: Resolver) -> None:
    assert [r.outcome for r in resolver.fire_many([404]).resolutions] == ["missing"]


def test_a_bug_on_one_deadline_is_recorded_and_the_others_fire(
        store: FakeDatabase, intake: IntakeProcessor, resolver: Resolver, engine: Engine,
        monkeypatch: pytest.MonkeyPatch) -> None:
    intake.process([opened("e1"), opened("e2", case_id="AS2")])
    good, bad = the_deadline(store), the_deadline(store, "AS2")
    store.clock = T0 + timedelta(days=3)
    real_fire = engine.fire

    def fire(case: Any, deadline: Any, now: Any) -> Any:
        if case.case_id == "AS2":
            raise KeyError("a bug")
        return real_fire(case, deadline, now)

    monkeypatch.setattr(engine, "fire", fire)
    outcomes = {r.deadline_id: r.outcome for r in resolver.fire_many([good.id, bad.id]).resolutions}
    assert outcomes == {good.id: "fired", bad.id: "error"}
    assert store.tables.deadlines[bad.id].status == DeadlineStatus.error
    assert "KeyError" in (store.tables.deadlines[bad.id].result or "")
