"""The traffic simulator: what it generates is valid, realistic and in the shares asked for."""

from __future__ import annotations

import argparse
import heapq
import json
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from aftersales_cli.simulate.command import add_arguments, config_from_args, run_simulation
from aftersales_cli.simulate.generator import DEFAULT_MIX, KINDS, SimConfig, generate, parse_mix
from services.intake.processor import to_domain_event
from shared.domain import Case, DeadlineSpec, Engine, RuleBook, WorkCalendar
from shared.schemas.events import Accepted, Rejection, parse_event

LIMIT = 64 * 1024
START = datetime(2026, 11, 22, 2, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(RuleBook.load(None), WorkCalendar())


def messages(n: int = 6000, seed: int = 7, rate: float = 50.0, **overrides: object) -> list:
    cfg = SimConfig(run_id="t", **overrides)  # type: ignore[arg-type]
    return list(generate(cfg, n, seed=seed, start=START, rate=rate))


def replay(engine: Engine, msgs: list) -> tuple[Counter, list[tuple[object, str]]]:
    """Apply the well-formed, first-sent events in order on a virtual clock, firing every
    deadline when it comes due, as intake, timer and resolver would. Returns what happened
    to each event (applied / out_of_state / ...) and the unexpected problems."""
    cases: dict[str, Case] = {}
    due: list[tuple[datetime, int, DeadlineSpec]] = []
    tiebreak = 0
    results: Counter = Counter()
    unexpected: list[tuple[object, str]] = []

    def keep(outcome) -> None:
        nonlocal tiebreak
        if outcome.case is not None:
            cases[outcome.case.case_id] = outcome.case
        for spec in outcome.deadlines or ():
            tiebreak += 1
            heapq.heappush(due, (spec.due_at, tiebreak, spec))

    for msg in msgs:
        if msg.category != "event":
            continue
        parsed = parse_event(msg.body, LIMIT)
        assert isinstance(parsed, Accepted), parsed
        event = to_domain_event(parsed)
        now = event.occurred_at
        while due and due[0][0] <= now:
            at, _tb, spec = heapq.heappop(due)
            case = cases[spec.case_id]
            fired = engine.fire(case, spec, at)
            if fired.applied:
                keep(fired)
        outcome = engine.apply(cases.get(event.case_id), event, now)
        if outcome.applied:
            keep(outcome)
            results["applied_late" if msg.late else "applied"] += 1
        else:
            results["late_refused" if msg.late else "refused"] += 1
            if not msg.late:
                unexpected.append((msg.event, outcome.problem or ""))
    return results, unexpected


def test_every_well_formed_message_passes_the_schema_and_every_malformed_one_is_rejected(
) -> None:
    msgs = messages(4000, malformed_share=0.05, duplicate_share=0.05)
    kinds = Counter()
    for msg in msgs:
        parsed = parse_event(msg.body, LIMIT)
        if msg.category == "malformed":
            assert isinstance(parsed, Rejection), msg.body
            kinds[msg.malformed] += 1
        else:
            assert isinstance(parsed, Accepted), (msg.body, parsed)
            assert parsed.event.type == msg.routing_key
    assert set(kinds) == {"invalid_json", "missing_field", "unknown_type", "not_utf8",
                          "bad_data"}


def test_every_event_type_the_flows_need_is_generated() -> None:
    msgs = messages(20000, deadline_seconds=20.0)
    types = {m.event["type"] for m in msgs if m.category == "event"}
    assert types >= {
        "case.opened", "merchant.approved", "merchant.rejected", "merchant.refused_repair",
        "buyer.shipped", "merchant.received", "merchant.inspected", "merchant.reshipped",
        "buyer.confirmed", "buyer.cancelled", "buyer.modified", "repair.scheduled",
        "repair.visited", "repair.completed", "intervention.requested",
        "intervention.resolved", "refund.completed", "voucher.expired",
    }


@pytest.mark.parametrize("deadline_seconds", [None, 20.0])
def test_journeys_are_valid_for_their_kind(engine: Engine, deadline_seconds: float | None
                                           ) -> None:
    msgs = messages(8000, deadline_seconds=deadline_seconds, late_buyer_share=0.3,
                    late_merchant_share=0.2)
    results, unexpected = replay(engine, msgs)
    assert unexpected == []
    assert results["applied"] > 6000
    if deadline_seconds:
        # late buyers ship after their request auto-closed: recorded as out_of_state
        assert results["late_refused"] > 20
        assert results["applied_late"] == 0
    else:
        assert results["late_refused"] == results["applied_late"] == 0


def test_deadline_mode_makes_deadlines_fire_within_a_minute(engine: Engine) -> None:
    msgs = messages(3000, deadline_seconds=15.0)
    opened = [m.event for m in msgs if m.category == "event"
              and m.event["type"] == "case.opened" and m.event["data"]["kind"] != "voucher_refund"]
    assert opened
    for ev in opened:
        due = datetime.fromisoformat(ev["due_at"]) - datetime.fromisoformat(ev["occurred_at"])
        assert due == timedelta(seconds=15)


def test_shares_are_respected_with_a_fixed_seed() -> None:
    n = 30000
    msgs = messages(n, seed=11, duplicate_share=0.04, malformed_share=0.02,
                    late_merchant_share=0.25)
    cats = Counter(m.category for m in msgs)
    assert cats["duplicate"] / n == pytest.approx(0.04, abs=0.006)
    assert cats["malformed"] / n == pytest.approx(0.02, abs=0.004)
    # duplicates are exact re-sends of events sent before
    sent_ids: set[str] = set()
    for m in msgs:
        if m.category == "event":
            sent_ids.add(m.event["event_id"])
        elif m.category == "duplicate":
            assert m.event["event_id"] in sent_ids
    opened = Counter(m.event["data"]["kind"] for m in msgs if m.category == "event"
                     and m.event["type"] in ("case.opened", "voucher.expired"))
    total = sum(opened.values())
    weights = sum(DEFAULT_MIX.values())
    for kind in KINDS:
        assert opened[kind] / total == pytest.approx(DEFAULT_MIX[kind] / weights, abs=0.03)


def test_the_same_seed_gives_the_same_traffic() -> None:
    a = [m.body for m in messages(500, seed=3)]
    b = [m.body for m in messages(500, seed=3)]
    c = [m.body for m in messages(500, seed=4)]
    assert a == b
    assert a != c


def test_mix_and_platforms_are_honoured() -> None:
    msgs = messages(2000, mix=parse_mix("exchange=1,repair=1"), platforms=("douyin",))
    kinds = {m.event["data"].get("kind") for m in msgs if m.category == "event"
             and m.event["type"] == "case.opened"}
    assert kinds == {"exchange", "repair"}
    assert {m.event["platform"] for m in msgs if m.event} == {"douyin"}
    with pytest.raises(ValueError):
        parse_mix("teleport=1")


def test_dry_run_prints_json_lines_and_writes_the_summary(tmp_path, capsysbinary) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=50.0)  # as the CLI already defines it
    add_arguments(parser)
    summary = tmp_path / "summary.json"
    args = parser.parse_args(["--rate", "0", "--count", "300", "--seed", "1", "--dry-run",
                              "--summary", str(summary), "--run-id", "dry"])
    assert config_from_args(args).count == 300

    class Settings:
        amqp_url = "amqp://unused"

    assert run_simulation(Settings(), args) == 0
    out = capsysbinary.readouterr().out.splitlines()
    assert len(out) == 300
    doc = json.loads(summary.read_text())
    assert doc["sent"] == 300
    assert doc["events"] + doc["duplicates"] + doc["malformed"] == 300
    assert sum(doc["events_by_type"].values()) == doc["events"]
