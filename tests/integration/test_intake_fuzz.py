"""Fuzzing intake with thousands of malformed and adversarial messages: none crashes a
worker, none is lost (each is either rejected with a reason or recorded in a case log)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from services.intake.consumer import IntakeConsumer
from services.intake.processor import IntakeProcessor
from shared.db.models import CaseEventRow
from shared.db.session import Database
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.notifications.policy import NotificationPolicy
from shared.schemas.events import EVENT_TYPES, Accepted, parse_event
from tests.conftest import wait_for
from tests.harness import publish_events, rejected_messages

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


@pytest.fixture
def processor(db: Database) -> IntakeProcessor:
    return IntakeProcessor(
        db=db, engine=Engine(RuleBook.load(None), WorkCalendar(None)),
        policy=NotificationPolicy.load(None), ops_contacts={"emails": [], "phones": []},
        max_event_bytes=LIMIT,
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
        parsed = parse_event(body, LIMIT)
        if isinstance(parsed, Accepted):
            assert parsed.event.event_id in logged
        else:
            assert index in {i for i, _ in result.rejected}


def generated_stream(count: int, seed: int) -> list[bytes]:
    """Deterministic adversarial traffic for the broker-level run."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        base = {
            "event_id": f"fz-{rng.randrange(count // 2)}", "type": rng.choice(EVENT_TYPES),
            "occurred_at": (T0 + timedelta(minutes=i)).isoformat(), "platform": "kuaishou",
            "shop_id": "S1", "order_id": "O1", "case_id": f"FZB-{rng.randrange(40)}",
            "data": {"kind": rng.choice(KINDS), "amount_fen": rng.randrange(10**6),
                     "passed": rng.random() < 0.5, "reason": "坏了", "outcome": "resume",
                     "carrier": "SF", "tracking_no": "SF1", "amount": 1,
                     "visit_at": (T0 + timedelta(days=1)).isoformat()},
        }
        roll = rng.random()
        if roll < 0.15:
            body = rng.randbytes(rng.randrange(1, 80))
        elif roll < 0.3:
            base.pop(rng.choice(list(base)))
            body = json.dumps(base).encode()
        elif roll < 0.4:
            base["type"] = "case." + "".join(rng.choice("xyz") for _ in range(5))
            body = json.dumps(base).encode()
        elif roll < 0.5:
            raw = json.dumps(base).encode()
            body = raw[: rng.randrange(1, len(raw))]
        else:
            body = json.dumps(base, ensure_ascii=False).encode()
        out.append(body)
    return out


def test_thousands_of_adversarial_messages_through_the_broker_none_lost(
    db: Database, amqp_url: str, running_intake: IntakeConsumer
) -> None:
    stream = generated_stream(3000, seed=20261122)
    expected_rejected = [b for b in stream if not isinstance(parse_event(b, LIMIT), Accepted)]
    expected_ids = {p.event.event_id for b in stream
                    if isinstance(p := parse_event(b, LIMIT), Accepted)}
    publish_events(amqp_url, stream, routing_key="fuzz")
    rejected: list[bytes] = []

    def logged_ids() -> set[str]:
        with db.transaction() as s:
            return set(s.execute(select(CaseEventRow.event_id)).scalars())

    wait_for(lambda: logged_ids() >= expected_ids, timeout=180, what="every valid event logged")
    wait_for(lambda: rejected.extend(b for b, _ in rejected_messages(amqp_url))
             or len(rejected) >= len(expected_rejected), timeout=120,
             what="every bad message in aftersales.events.rejected")
    assert sorted(rejected) == sorted(expected_rejected)
    assert logged_ids() == expected_ids
    with db.transaction() as s:
        errors = s.execute(select(CaseEventRow.problem)
                           .where(CaseEventRow.outcome == "error")).scalars().all()
    assert errors == []
    print(f"\n[fuzz report] messages={len(stream)} rejected={len(rejected)} "
          f"distinct_valid_events={len(expected_ids)} lost=0")
