"""Fuzzing intake with thousands of malformed and adversarial messages: none crashes a
worker, none is lost (each is either rejected with a reason or recorded in a case log).

The broker-level run goes through the real broker and the real intake service
(`aftersales run intake`, two worker processes)."""

from __future__ import annotations

import json
import random
import threading
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from services.intake.processor import IntakeProcessor
from shared.db.models import CaseEventRow, EventConflictRow
from shared.db.session import Database
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.notifications.policy import NotificationPolicy
from shared.schemas.events import EVENT_TYPES, Accepted, Limits, Rejection, parse_event
from tests.conftest import wait_for
from tests.harness import rejected_messages
from tests.intake_service import intake_service, metric_sum, worker_pids
from tests.poison import Ids, Message, encode, follow_up, opened, poison_flood, publish_messages

pytestmark = pytest.mark.integration
LIMIT = 16 * 1024
KINDS = ["refund_only", "return_refund", "exchange", "repair", "onsite_repair",
         "voucher_refund"]
T0 = datetime(2026, 11, 22, 2, 0, tzinfo=UTC)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
weird_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60
) | st.sampled_from(["", " ", "\u0000", "‮RTL", "😀" * 30, "x" * 300, "AS1", "../../etc"])


@st.composite
def plausible_events(draw: st.DrawFn) -> dict[str, Any]:
    """Events close to valid: right shape, adversarial values, a few cases so that
    sequences collide on one case."""
    event_type = draw(st.sampled_from([*EVENT_TYPES, "case.unknown", "", "CASE.OPENED"]))
    data: dict[str, Any] = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3))
    if event_type == "case.opened" and draw(st.booleans()):
        data.update(kind=draw(st.sampled_from([*KINDS, "x"])),
                    amount_fen=draw(st.integers(-5, 10**13)),
                    buyer={"phone": draw(st.sampled_from(["13800000000", "nope", ""]))})
    if event_type == "intervention.resolved":
        data["outcome"] = draw(st.sampled_from(["buyer", "merchant", "resume", "??", ""]))
    doc: dict[str, Any] = {
        "event_id": draw(st.sampled_from(["dup-1", "dup-2"]) | st.uuids().map(str) | weird_text),
        "type": event_type,
        "occurred_at": draw(st.sampled_from([
            (T0 + timedelta(minutes=draw(st.integers(-10**6, 10**6)))).isoformat(),
            "2026-13-45T99:00:00+08:00", "2026-11-22T10:00:00", "yesterday",
            "9999-12-31T23:59:59+14:00",
        ])),
        "platform": draw(st.sampled_from(["kuaishou", "douyin", "taobao", "Kuai Shou", ""])),
        "shop_id": draw(weird_text | st.just("S1")),
        "order_id": draw(weird_text | st.just("O1")),
        "case_id": draw(st.sampled_from(["FZ-1", "FZ-2", "FZ-3"]) | weird_text),
        "data": data,
    }
    if draw(st.booleans()):
        doc["due_at"] = draw(st.sampled_from([
            (T0 + timedelta(hours=draw(st.integers(-1000, 1000)))).isoformat(), "soon", None]))
    for key in draw(st.lists(st.sampled_from(list(doc)), max_size=2)):
        doc.pop(key, None)
    return doc


messages = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    plausible_events().map(lambda d: json.dumps(d, ensure_ascii=False).encode()),
    plausible_events().map(lambda d: json.dumps(d).encode()[: len(json.dumps(d)) // 2]),
    st.just(b'{"a":' * 5000 + b"1" + b"}" * 5000),
    st.just(b'{"x": "' + b"y" * (LIMIT + 1) + b'"}'),
)


NOW = T0 + timedelta(minutes=30)  # when the processor below receives every batch


@pytest.fixture
def processor(db: Database) -> IntakeProcessor:
    return IntakeProcessor(
        db=db, engine=Engine(RuleBook.load(None), WorkCalendar(None)),
        policy=NotificationPolicy.load(None), ops_contacts={"emails": [], "phones": []},
        max_event_bytes=LIMIT, clock=lambda: NOW,
    )


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(messages, min_size=1, max_size=60))
def test_no_input_crashes_the_processor_and_each_is_accounted_for(
    processor: IntakeProcessor, db: Database, batch: list[bytes]
) -> None:
    result = processor.process(batch)  # must not raise
    handled = len(result.handled)
    assert len(result.rejected) + handled == len(batch)
    # "error" would mean a valid event hit a bug in the code: recorded, but not acceptable.
    assert {h.outcome for h in result.handled} <= {
        "accepted", "duplicate", "out_of_state", "parked"}, [
        h.problem for h in result.handled if h.outcome == "error"]
    with db.transaction() as s:
        logged = set(s.execute(select(CaseEventRow.event_id)).scalars())
    for index, body in enumerate(batch):
        parsed = parse_event(body, LIMIT, now=NOW)
        if isinstance(parsed, Accepted):
            assert parsed.event.event_id in logged
        else:
            assert index in {i for i, _ in result.rejected}


FUZZ_MESSAGES = 10_000
VALID_CASES = 1000


def test_ten_thousand_generated_messages_through_the_real_intake_service(
    db: Database, amqp_url: str, database_url: str, tmp_path: Path
) -> None:
    """Valid envelopes with one field mutated to an edge value of its type, byte noise,
    oversized bodies and odd headers, interleaved with valid events, same ids with other
    content and exact duplicates. At the end: the same worker processes as at the start,
    every message accounted for (applied + recorded + rejected = published), every valid
    event applied, and the rejected queue holds exactly the rejected ones, each with the
    reason the contract gives."""
    seed = 20261127
    rng = random.Random(seed)
    now = datetime.now(UTC)
    ids = Ids(f"fz{uuid.uuid4().hex[:6]}")
    poison = poison_flood(FUZZ_MESSAGES, seed, now, ids.prefix + "p")
    stream: list[Message] = list(poison)
    valid_ids: set[str] = set()
    for _ in range(VALID_CASES):  # interleaved at random places, each case in order
        first = opened(ids, now, kind=rng.choice(["exchange", "refund_only", "return_refund"]))
        approved = follow_up(first, ids)
        valid_ids |= {first["event_id"], approved["event_id"]}
        at = rng.randrange(len(stream) + 1)
        stream[at:at] = [Message(encode(first)), Message(encode(approved))]
    planted: list[Message] = []
    for _ in range(20):  # same id, other content; and the same event again
        first = opened(ids, now)
        other = {**first, "data": {**first["data"], "amount_fen": 1}}
        planted += [Message(encode(first)), Message(encode(other)), Message(encode(first))]
    stream += planted

    limits = Limits()  # the settings' defaults, as the service runs with
    verdicts = [parse_event(m.body, limits=limits, now=now) for m in stream]
    expected_rejected = Counter((m.body, v.reason.value) for m, v in zip(stream, verdicts,
                                                                         strict=True)
                                if isinstance(v, Rejection))
    accepted = [v for v in verdicts if isinstance(v, Accepted)]
    distinct_ids = {v.event.event_id for v in accepted}
    assert valid_ids <= distinct_ids
    assert {v.reason.value for v in verdicts if isinstance(v, Rejection)} >= {
        "too_deep", "out_of_range", "invalid_text", "implausible_time", "schema",
        "oversized", "invalid_json", "not_utf8", "unknown_type"}

    with intake_service(database_url, amqp_url, tmp_path, worker_processes="2") as system:
        pids = worker_pids(system)
        assert len(pids) == 2
        publisher = threading.Thread(target=publish_messages, args=(amqp_url, stream))
        publisher.start()
        rejected: list[tuple[bytes, dict[str, Any]]] = []

        def received() -> float:
            return metric_sum(system, "aftersales_events_received_total")

        wait_for(lambda: received() == len(stream), timeout=600, interval=0.5,
                 what="a verdict for every published message")
        publisher.join(60)
        wait_for(lambda: rejected.extend(rejected_messages(amqp_url))
                 or len(rejected) >= sum(expected_rejected.values()), timeout=60,
                 what="every rejected message in aftersales.events.rejected")
        assert worker_pids(system) == pids, "a worker process was restarted"
        assert "exited with" not in system.log("intake")
        duplicates = metric_sum(system, "aftersales_events_received_total",
                                outcome="duplicate")

    with db.transaction() as s:
        rows = dict(s.execute(select(CaseEventRow.event_id, CaseEventRow.outcome)).all())
        conflicts = s.execute(select(func.count()).select_from(EventConflictRow)).scalar_one()
    applied = sum(1 for outcome in rows.values() if outcome == "applied")
    recorded = len(rows) - applied + conflicts + int(duplicates)
    print(f"\n[fuzz report] published={len(stream)} applied={applied} "
          f"recorded={recorded} (out_of_state/parked={len(rows) - applied}, "
          f"conflicts={conflicts}, duplicates={int(duplicates)}) rejected={len(rejected)} "
          f"reasons={dict(Counter(h['x-reject-reason'] for _b, h in rejected))}")
    assert applied + recorded + len(rejected) == len(stream)
    assert set(rows) == distinct_ids
    assert all(rows[event_id] == "applied" for event_id in valid_ids)
    assert "error" not in rows.values()
    assert conflicts >= 20
    assert Counter((body, h["x-reject-reason"]) for body, h in rejected) == expected_rejected
