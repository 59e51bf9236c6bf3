"""Isolation is per message: whatever one message makes raise (not only database errors),
that message gets its verdict and the rest of its batch goes on; the consumer lives on."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import func, select

from services.intake.consumer import IntakeConsumer
from services.intake.processor import BatchResult, IntakeProcessor
from services.intake.rejected import safe_headers
from shared.db.models import CaseEventRow, CaseRow, EventConflictRow
from shared.db.session import Database
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.notifications.policy import NotificationPolicy
from tests.conftest import wait_for
from tests.harness import publish_events, rejected_messages
from tests.integration.test_intake import opened

pytestmark = pytest.mark.integration

BOOM = b'{"boom": true}'


class BuggyProcessor(IntakeProcessor):
    """A processor with a bug that a certain message triggers, outside any event's apply
    (for example in validation or bookkeeping code)."""

    def process(self, bodies: Sequence[bytes]) -> BatchResult:
        if BOOM in bodies:
            raise RuntimeError("a bug")
        return super().process(bodies)


@pytest.fixture
def processor(db: Database) -> IntakeProcessor:
    return BuggyProcessor(
        db=db, engine=Engine(RuleBook.load(None), WorkCalendar(None)),
        policy=NotificationPolicy.load(None), ops_contacts={"emails": [], "phones": []},
        max_event_bytes=64 * 1024,
    )


def test_an_exception_for_one_message_does_not_stop_its_batch_or_the_consumer(
    db: Database, amqp: Any, amqp_url: str, processor: IntakeProcessor
) -> None:
    observed: list[BatchResult] = []

    def observe(result: BatchResult, _seconds: float) -> None:
        observed.append(result)
        if len(observed) == 1:
            raise ValueError("a metrics bug")  # must not end the worker either

    consumer = IntakeConsumer(amqp_url, processor, prefetch=200, batch_size=100,
                              batch_wait_seconds=0.5, observe=observe)
    thread = threading.Thread(target=consumer.run_forever, daemon=True)
    stream: list[Any] = [opened("g1", "AS-G1"), BOOM, opened("g2", "AS-G2"), BOOM,
                         opened("g3", "AS-G3")]
    publish_events(amqp_url, stream, routing_key="case.opened")
    thread.start()  # all of them in its first batch
    try:
        cases = select(func.count()).select_from(CaseRow)
        wait_for(lambda: _count(db, cases) == 3, what="the good events of the batch applied")
        got: list[tuple[bytes, dict[str, Any]]] = []
        wait_for(lambda: got.extend(rejected_messages(amqp_url)) or len(got) >= 2,
                 what="the two messages that raised in aftersales.events.rejected")
        assert [(b, h["x-reject-reason"]) for b, h in got] == [(BOOM, "internal_error")] * 2
        assert "a bug" in got[0][1]["x-reject-detail"]
        # The consumer still runs: a later event is applied.
        publish_events(amqp_url, [opened("g4", "AS-G4")])
        wait_for(lambda: _count(db, cases) == 4, what="a later event applied")
        assert thread.is_alive()
        with db.transaction() as s:
            assert s.execute(select(func.count()).select_from(CaseEventRow)).scalar_one() == 4
    finally:
        consumer.stop()
        thread.join(10)


def _count(db: Database, stmt: Any) -> int:
    with db.transaction() as s:
        return int(s.execute(stmt).scalar_one())


@pytest.mark.parametrize(("headers", "kept", "dropped"), [
    ({"CC": ["q"], "BCC": ["q"], "Cc": ["q"], "trace": "t"}, {"trace": "t"}, ["CC", "BCC", "Cc"]),
    ({"x-death": [{"count": 1}], "x-first-death-queue": "q", "n": 1}, {"n": 1},
     ["x-death", "x-first-death-queue"]),
    ({"score": 0.5, "big": 2**64, "neg": -(2**63)}, {"score": "0.5", "big": str(2**64),
                                                      "neg": -(2**63)}, []),
    ({"k" * 300: 1, "ok": b"\xff"}, {"ok": b"\xff"}, ["k" * 64]),
    ({"deep": {"a": {"b": {"c": {"d": {"e": 1}}}}}}, {"deep": {"a": {"b": {"c": {}}}}}, []),
    ({"text": "a\ud800b"}, {"text": "a?b"}, []),
])
def test_rejected_copies_keep_only_safe_encodable_headers(
        headers: dict[str, Any], kept: dict[str, Any], dropped: list[str]) -> None:
    from pika import data as amqp_data

    got, left_out = safe_headers(headers)
    assert got == kept and left_out == dropped
    amqp_data.encode_table([], got)  # pika can encode all of it again


def test_an_event_id_logged_meanwhile_by_another_worker_is_not_lost(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers, the same event_id on two different cases (their case locks do not
    serialise them): the second must not be silently dropped by ON CONFLICT DO NOTHING
    while its effects are applied; it becomes a conflict."""
    from shared.db.case_log import INSERT_EVENTS
    from shared.db.cases import SqlCases
    from shared.schemas.events import content_hash

    plain = IntakeProcessor(
        db=db, engine=Engine(RuleBook.load(None), WorkCalendar(None)),
        policy=NotificationPolicy.load(None), ops_contacts={"emails": [], "phones": []},
        max_event_bytes=64 * 1024,
    )
    theirs = opened("same-id", "AS-OTHER")
    real_load_cases = SqlCases.load
    raced: list[bool] = []

    def load_cases_while_the_other_worker_commits(cases: Any, case_ids: Any) -> Any:
        if not raced:  # the other worker commits its event between our look and insert
            raced.append(True)
            with db.transaction() as other:  # with intake's own statement
                INSERT_EVENTS.execute(other.connection(), [{
                    "event_id": "same-id", "case_id": "AS-OTHER", "type": "case.opened",
                    "occurred_at": datetime.now(UTC), "outcome": "applied", "problem": None,
                    "case_version": 1, "body": theirs, "body_sha256": content_hash(theirs)}])
        return real_load_cases(cases, case_ids)

    monkeypatch.setattr(SqlCases, "load", load_cases_while_the_other_worker_commits)
    result = plain.process([json.dumps(opened("same-id", "AS-MINE")).encode()])
    assert [h.outcome for h in result.handled] == ["conflict"]
    with db.transaction() as s:
        assert s.get(CaseRow, "AS-MINE") is None  # not applied without being logged
        assert s.execute(select(func.count()).select_from(EventConflictRow)).scalar_one() == 1
