"""Intake against the real RabbitMQ and PostgreSQL: events become cases, duplicates change
nothing, bad input is moved to `aftersales.events.rejected` with its reason while good
events keep flowing, and two workers on one case never corrupt it."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from services.intake.consumer import IntakeConsumer
from services.intake.processor import IntakeProcessor
from shared.db.models import CaseEventRow, CaseRow, DeadlineRow
from shared.db.session import Database
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.notifications.policy import NotificationPolicy
from tests.conftest import FIXED_DATE_LIMITS, wait_for
from tests.harness import publish_events, rejected_messages

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 22, 2, 0, tzinfo=UTC)


def ev(event_id: str, type_: str, case_id: str = "AS1", at: datetime = T0,
       data: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": event_id, "type": type_, "occurred_at": at.isoformat(),
        "platform": "kuaishou", "shop_id": "S1", "order_id": "O1", "case_id": case_id,
        "data": data or {}, **extra,
    }


def opened(event_id: str, case_id: str = "AS1", kind: str = "exchange",
           at: datetime = T0) -> dict[str, Any]:
    return ev(event_id, "case.opened", case_id, at, {
        "kind": kind, "amount_fen": 12900, "reason": "尺码不合适",
        "buyer": {"phone": "13800000000"}, "merchant": {"email": "shop@example.com"},
    })


@pytest.fixture
def processor(db: Database) -> IntakeProcessor:
    return IntakeProcessor(
        db=db,
        engine=Engine(RuleBook.load(None), WorkCalendar(None)),
        policy=NotificationPolicy.load(None),
        ops_contacts={"emails": ["ops@example.com"], "phones": []},
        max_event_bytes=64 * 1024, limits=FIXED_DATE_LIMITS,
    )


def count(db: Database, stmt: Any) -> int:
    with db.transaction() as s:
        return int(s.execute(stmt).scalar_one())


def test_a_published_event_becomes_a_case(db: Database, amqp_url: str,
                                          running_intake: IntakeConsumer) -> None:
    publish_events(amqp_url, [opened("e1")])
    wait_for(lambda: count(db, select(func.count()).select_from(CaseRow)) == 1,
             what="the case row")
    with db.transaction() as s:
        case = s.get(CaseRow, "AS1")
        assert case is not None
        assert (case.kind, case.status, case.step) == ("exchange", "open", "merchant_response")
        deadlines = s.execute(
            select(DeadlineRow).where(DeadlineRow.status == "pending",
                                      DeadlineRow.purpose == "deadline")
        ).scalars().all()
        # Kuaishou: the merchant has 48 h from the request to handle an exchange.
        assert [d.due_at for d in deadlines] == [T0 + timedelta(hours=48)]
        assert deadlines[0].action == "auto_approve"
        logged = s.get(CaseEventRow, "e1")
        assert logged is not None and logged.outcome == "applied"


def test_a_duplicate_changes_nothing(db: Database, amqp_url: str,
                                     running_intake: IntakeConsumer) -> None:
    publish_events(amqp_url, [opened("e1"), ev("e2", "merchant.approved",
                                               at=T0 + timedelta(hours=1))])
    wait_for(lambda: count(db, select(func.count()).select_from(CaseEventRow)) == 2,
             what="two events logged")

    def snapshot() -> tuple[Any, ...]:
        with db.transaction() as s:
            case = s.get(CaseRow, "AS1")
            assert case is not None
            rows = s.execute(select(DeadlineRow.id, DeadlineRow.status)
                             .where(DeadlineRow.case_id == "AS1")
                             .order_by(DeadlineRow.id)).all()
            return case.version, case.step, case.snapshot, tuple(rows)

    before = snapshot()
    publish_events(amqp_url, [opened("e1"), ev("e2", "merchant.approved",
                                               at=T0 + timedelta(hours=1)),
                              opened("marker", case_id="AS-marker")])
    # One consumer reads the queue in order: once the marker's case exists, the two
    # duplicates before it have been handled.
    wait_for(lambda: count(db, select(func.count()).select_from(CaseRow)) == 2,
             what="the marker case")
    assert snapshot() == before
    assert count(db, select(func.count()).select_from(CaseEventRow)) == 3


BAD_INPUTS = [
    (b"\xff\xfe\xfd", "not_utf8"),
    (b"{this is not json", "invalid_json"),
    (json.dumps({k: v for k, v in opened("x1").items() if k != "case_id"}).encode(), "schema"),
    (json.dumps({**opened("x2"), "occurred_at": "yesterday"}).encode(), "schema"),
    (json.dumps({**opened("x3"), "type": "case.exploded"}).encode(), "unknown_type"),
    (json.dumps({**opened("x4"), "data": {"kind": "exchange", "amount_fen": "many"}}).encode(),
     "schema"),
    (b'{"pad": "' + b"x" * 70_000 + b'"}', "oversized"),
]


def test_bad_input_is_rejected_with_its_reason_while_good_events_flow(
    db: Database, amqp_url: str, running_intake: IntakeConsumer
) -> None:
    stream: list[bytes | dict[str, Any]] = []
    for index, (raw, _reason) in enumerate(BAD_INPUTS):
        stream.append(raw)
        stream.append(opened(f"good-{index}", case_id=f"AS-good-{index}"))
    publish_events(amqp_url, stream, routing_key="case.opened")
    wait_for(lambda: count(db, select(func.count()).select_from(CaseRow)) == len(BAD_INPUTS),
             what="every good event applied")
    got: list[tuple[bytes, dict[str, Any]]] = []
    wait_for(lambda: got.extend(rejected_messages(amqp_url)) or len(got) >= len(BAD_INPUTS),
             what="every bad message in aftersales.events.rejected")
    assert sorted(body for body, _ in got) == sorted(raw for raw, _ in BAD_INPUTS)
    reasons = {body: headers["x-reject-reason"] for body, headers in got}
    for raw, reason in BAD_INPUTS:
        assert reasons[raw] == reason
    for _body, headers in got:
        assert headers["x-reject-detail"]
        assert headers["x-original-exchange"] == "aftersales.events"


def test_an_event_that_does_not_fit_the_state_is_recorded_not_dropped(
    db: Database, processor: IntakeProcessor
) -> None:
    result = processor.process([
        json.dumps(opened("e1")).encode(),
        json.dumps(ev("e2", "buyer.confirmed", at=T0 + timedelta(minutes=5))).encode(),
    ])
    assert [h.outcome for h in result.handled] == ["accepted", "out_of_state"]
    with db.transaction() as s:
        row = s.get(CaseEventRow, "e2")
        assert row is not None
        assert row.outcome == "out_of_state" and row.problem
        case = s.get(CaseRow, "AS1")
        assert case is not None and case.step == "merchant_response"


def test_an_event_before_its_case_is_parked_then_applied(
    db: Database, processor: IntakeProcessor
) -> None:
    approved = ev("e2", "merchant.approved", at=T0 + timedelta(hours=1))
    first = processor.process([json.dumps(approved).encode()])
    assert [h.outcome for h in first.handled] == ["parked"]
    processor.process([json.dumps(opened("e1")).encode()])
    with db.transaction() as s:
        row = s.get(CaseEventRow, "e2")
        assert row is not None and row.outcome == "applied"
        case = s.get(CaseRow, "AS1")
        assert case is not None and case.step != "merchant_response"


def test_two_workers_on_one_case_never_corrupt_it(db: Database, database_url: str,
                                                  processor: IntakeProcessor) -> None:
    """Many events of one case, split across two processors running at the same time,
    each with its own connection pool: every event is applied exactly once, and the
    case's version counts them (a lost update would show as a smaller version)."""
    from shared.db.session import make_engine

    processor.process([json.dumps(opened("e0")).encode()])
    other = IntakeProcessor(
        db=Database(make_engine(database_url)), engine=processor.engine,
        policy=processor.policy, ops_contacts=processor.ops_contacts,
        max_event_bytes=processor.max_event_bytes, limits=processor.limits,
    )
    # buyer.modified on an open case in merchant_response is out of state or applied;
    # deadline.changed always applies to an open case: it bumps the version each time.
    events = [
        json.dumps(ev(f"d{i}", "deadline.changed", at=T0 + timedelta(minutes=i),
                      due_at=(T0 + timedelta(hours=40, minutes=i)).isoformat())).encode()
        for i in range(1, 81)
    ]
    errors: list[BaseException] = []

    def run(proc: IntakeProcessor, chunk: list[bytes]) -> None:
        try:
            for i in range(0, len(chunk), 5):
                proc.process(chunk[i:i + 5])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(processor, events[0::2])),
               threading.Thread(target=run, args=(other, events[1::2]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    with db.transaction() as s:
        case = s.get(CaseRow, "AS1")
        assert case is not None
        applied = s.execute(select(func.count()).select_from(CaseEventRow)
                            .where(CaseEventRow.outcome == "applied")).scalar_one()
        assert applied == 81
        assert case.version == s.execute(
            select(func.max(CaseEventRow.case_version))).scalar_one()
        pending = s.execute(select(func.count()).select_from(DeadlineRow).where(
            DeadlineRow.status == "pending", DeadlineRow.purpose == "deadline")).scalar_one()
        assert pending == 1  # exactly the deadline of the current version


def test_a_trickle_is_committed_without_waiting_for_a_full_batch(
    db: Database, amqp: Any, amqp_url: str, processor: IntakeProcessor
) -> None:
    # Neither a full batch (1,000 events) nor a quiet queue (5 s) comes in time in this
    # test: only the age of the batch's oldest event can make intake commit.
    consumer = IntakeConsumer(amqp_url, processor, prefetch=200, batch_size=1000,
                              idle_seconds=5, batch_wait_seconds=0.05)
    thread = threading.Thread(target=consumer.run_forever, daemon=True)
    thread.start()
    cases = select(func.count()).select_from(CaseRow)
    try:
        publish_events(amqp_url, [opened("t1", "AS-T1")])
        wait_for(lambda: count(db, cases) == 1, timeout=3,
                 what="a lone event committed before the 5 s idle timeout")
        publish_events(amqp_url, [opened("t2", "AS-T2")])
        wait_for(lambda: count(db, cases) == 2, timeout=3,
                 what="the next one too, on its own")
    finally:
        consumer.stop()
        thread.join(10)


def test_an_event_whose_case_another_worker_holds_waits_for_the_next_batch(
    db: Database, processor: IntakeProcessor
) -> None:
    from sqlalchemy import text

    busy, free = opened("b1", "AS-BUSY"), opened("f1", "AS-FREE")
    with db.transaction() as other_worker:  # holds AS-BUSY's lock until it commits
        other_worker.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:c, 0))"),
                             {"c": "AS-BUSY"})
        result = processor.process([json.dumps(busy).encode(), json.dumps(free).encode()])
        assert result.deferred == [0]  # left, unacked, for the next batch
        assert [h.outcome for h in result.handled] == ["accepted"]  # the free case went on
        with db.transaction() as s:
            assert s.get(CaseRow, "AS-FREE") is not None
            assert s.get(CaseRow, "AS-BUSY") is None and s.get(CaseEventRow, "b1") is None
    # The lock is free again: the next batch applies it.
    again = processor.process([json.dumps(busy).encode()])
    assert again.deferred == [] and [h.outcome for h in again.handled] == ["accepted"]


def test_a_batch_whose_cases_are_all_held_waits_rather_than_spins(
    db: Database, processor: IntakeProcessor
) -> None:
    from sqlalchemy import text

    busy = opened("b2", "AS-HELD")
    release = threading.Event()
    locked = threading.Event()

    def other_worker() -> None:
        with db.transaction() as s:
            s.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:c, 0))"),
                      {"c": "AS-HELD"})
            locked.set()
            release.wait(30)

    holder = threading.Thread(target=other_worker)
    holder.start()
    assert locked.wait(10)
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(
        processor.process([json.dumps(busy).encode()])))
    worker.start()

    def waiting_for_an_advisory_lock() -> bool:
        with db.transaction() as s:
            return bool(s.execute(text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND database = (SELECT oid FROM pg_database "
                "WHERE datname = current_database())"
            )).scalar_one())

    # It waits for the lock (PostgreSQL shows the wait), it does not return "deferred".
    wait_for(waiting_for_an_advisory_lock, timeout=10, what="the batch to wait for the lock")
    assert worker.is_alive() and results == []
    release.set()
    worker.join(30)
    holder.join(30)
    assert results[0].deferred == [] and [h.outcome for h in results[0].handled] == ["accepted"]
