"""Property-based tests: random event sequences and deadline firings on every kind.

A script is a list of moves, each either an event (type, data, time gap) or the firing of
one of the case's pending deadlines / reminders (chosen by index). The runner checks the
invariants after every move and the whole script is replayed to check determinism.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from domain_support import cst, default_engine, examples, make_event
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.domain import CLOSED, OPEN, Case, DeadlineSpec, Engine, Kind, Outcome, facts_of
from shared.domain.flows import FLOWS, INTERVENTION, all_event_types, step_def

ENGINE = default_engine()
START = cst(2024, 1, 8, 9)  # the scripts stay well within chinese_calendar's years
EVENT_TYPES = [*all_event_types(), "no.such.event"]


@dataclass(frozen=True)
class EventMove:
    type: str
    gap_minutes: int
    data: dict[str, Any]
    due_in_hours: int | None


@dataclass(frozen=True)
class FittingMove:
    """An event chosen at run time among those the current step accepts, so that scripts
    reach the late steps of every flow (random types alone rarely get past the first)."""

    pick: int
    gap_minutes: int


@dataclass(frozen=True)
class FireMove:
    pick: int
    late_minutes: int


Move = EventMove | FittingMove | FireMove


def _data(draw: st.DrawFn, type_: str, kind: Kind) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if type_ in ("case.opened", "voucher.expired"):
        data = {"kind": draw(st.sampled_from([kind.value, kind.value, "bogus"])),
                "amount_fen": draw(st.integers(-1, 100000))}
        if draw(st.booleans()):
            total = draw(st.integers(0, 4))
            data |= {"voucher_total_count": total,
                     "voucher_used_count": draw(st.integers(0, total + 1))}
    elif type_ == "merchant.inspected":
        data = {"passed": draw(st.sampled_from([True, False, None]))}
    elif type_ == "repair.scheduled":
        data = draw(st.sampled_from([{}, {"visit_at": "not a time"},
                                     {"visit_at": "2024-02-01T10:00:00+08:00"},
                                     {"visit_at": "2024-01-01T10:00:00"}]))
    elif type_ == "intervention.resolved":
        data = {"outcome": draw(st.sampled_from(["resume", "buyer", "merchant", "refund", "?"]))}
    elif type_ in ("refund.completed", "buyer.modified"):
        data = draw(st.sampled_from([{}, {"amount_fen": 500}, {"amount_fen": "x"}]))
    return data


@st.composite
def scripts(draw: st.DrawFn) -> tuple[Kind, str, list[Move]]:
    kind = draw(st.sampled_from(list(Kind)))
    platform = draw(st.sampled_from(["kuaishou", "douyin"]))
    opener = "voucher.expired" if kind == Kind.voucher_refund and draw(st.booleans()) \
        else "case.opened"
    moves: list[Move] = [
        EventMove(opener, 0, {"kind": kind.value, "amount_fen": draw(st.integers(0, 10**6))},
                  None)]
    for _ in range(draw(st.integers(0, 24))):
        choice = draw(st.sampled_from(["fire", "fire", "fitting", "fitting", "fitting",
                                       "random"]))
        if choice == "fire":
            moves.append(FireMove(draw(st.integers(0, 5)), draw(st.integers(0, 600))))
        elif choice == "fitting":
            moves.append(FittingMove(draw(st.integers(0, 50)), draw(st.integers(0, 4320))))
        else:
            type_ = draw(st.sampled_from(EVENT_TYPES))
            due = draw(st.one_of(st.none(), st.integers(-24, 400)))
            moves.append(EventMove(type_, draw(st.integers(0, 4320)), _data(draw, type_, kind),
                                   due))
    return kind, platform, moves


def _check(engine: Engine, before: Case | None, outcome: Outcome, now: Any,
           reminder: bool) -> None:
    if not outcome.applied:
        assert facts_of(outcome.case) == facts_of(before) and outcome.deadlines is None
        assert outcome.problem and outcome.problem.split(":")[0] in (
            "out_of_state", "invalid", "stale", "early")
        assert outcome.decisions == () and outcome.notices == ()
        return
    case = outcome.case
    assert case is not None
    assert case.status in (OPEN, CLOSED)
    assert FLOWS[case.kind].defines(case.step), case.step
    assert (case.status == CLOSED) == (case.step == "closed")
    if reminder:
        assert case == before and outcome.deadlines is None
        assert [d.type for d in outcome.decisions] == ["reminder.due_soon"]
        return
    # one version per change: the event's, and one per deadline it showed had passed
    fired = sum(1 for d in outcome.decisions if d.type != "reminder.due_soon")
    assert (before.version if before else 0) < case.version <= \
        (before.version if before else 0) + 1 + fired
    assert outcome.deadlines == engine.deadlines_for(case, now)
    deadlines = [d for d in outcome.deadlines if d.purpose == "deadline"]
    if case.status == CLOSED:
        assert outcome.deadlines == ()
        assert case.closed_at is not None and case.resolution
    elif case.step == INTERVENTION:
        assert outcome.deadlines == () and case.step_due_at is None
    else:
        # every resting open step has a rule, so exactly one deadline at the step's due time
        assert len(deadlines) == 1 and deadlines[0].due_at == case.step_due_at
        assert case.paused_remaining_s is None
    for spec in outcome.deadlines:
        assert spec.fence == case.version and spec.step == case.step
        assert spec.purpose == "deadline" or spec.due_at > now
    assert all(d.key for d in outcome.decisions)


OUTCOMES = ["resume", "buyer", "merchant", "refund"]


def _fitting_event(case: Case, move: FittingMove, clock: Any, platform: str) -> Any:
    step = step_def(case.kind, case.step)
    keys = sorted(step.on) if step is not None else []
    if not keys or move.pick >= 45:  # now and then an event every step shares
        keys = ["buyer.cancelled", "intervention.requested", "intervention.resolved"]
    key = keys[move.pick % len(keys)]
    data: dict[str, Any] = {}
    if key.startswith("merchant.inspected"):
        key, data = "merchant.inspected", {"passed": key.endswith(".passed")}
    elif key == "repair.scheduled":
        data = {"visit_at": (clock + timedelta(days=2)).isoformat()}
    elif key == "intervention.resolved":
        data = {"outcome": OUTCOMES[move.pick % len(OUTCOMES)]}
    return make_event(key, clock, case_id=case.case_id, platform=platform, **data)


def run(engine: Engine, kind: Kind, platform: str,
        moves: list[Move]) -> list[Outcome]:
    case: Case | None = None
    pending: tuple[DeadlineSpec, ...] = ()
    clock = START
    outcomes = []
    for move in moves:
        if isinstance(move, FireMove):
            if case is None or not pending:
                continue
            spec = pending[move.pick % len(pending)]
            clock = max(clock, spec.due_at + timedelta(minutes=move.late_minutes))
            outcome = engine.fire(case, spec, clock)
            reminder = spec.purpose == "reminder"
        elif isinstance(move, FittingMove):
            if case is None:
                continue
            clock += timedelta(minutes=move.gap_minutes)
            outcome = engine.apply(case, _fitting_event(case, move, clock, platform), clock)
            reminder = False
        else:
            clock += timedelta(minutes=move.gap_minutes)
            due = None if move.due_in_hours is None else clock + timedelta(hours=move.due_in_hours)
            event = make_event(move.type, clock, platform=platform, due_at=due, **move.data)
            outcome = engine.apply(case, event, clock)
            reminder = False
        _check(engine, case, outcome, clock, reminder)
        outcomes.append(outcome)
        if outcome.applied:
            case = outcome.case
            if outcome.deadlines is not None:
                pending = outcome.deadlines
            elif reminder:
                pending = tuple(d for d in pending if d != spec)
    return outcomes


def _strip_event_ids(outcomes: list[Outcome]) -> list[Any]:
    """Event ids differ between runs (make_event numbers them); nothing else may."""
    return [(o.case, o.applied, o.problem, o.deadlines, o.decisions, o.steps,
             [(n.reason, n.party, n.due_at, n.urgent) for n in o.notices]) for o in outcomes]


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scripts())
def test_random_sequences_keep_every_invariant_and_replay_identically(
    script: tuple[Kind, str, list[Move]],
) -> None:
    kind, platform, moves = script
    first = run(ENGINE, kind, platform, moves)
    again = run(ENGINE, kind, platform, moves)
    assert _strip_event_ids(first) == _strip_event_ids(again)


@settings(max_examples=examples(100), deadline=None)
@given(st.sampled_from(list(Kind)), st.lists(st.integers(0, 5), max_size=12))
def test_firing_only_deadlines_always_ends_or_rests_in_a_defined_step(
    kind: Kind, picks: list[int],
) -> None:
    """Nobody acts: the automatic actions alone must carry every case somewhere defined."""
    moves: list[Move] = [EventMove("case.opened", 0,
                                                   {"kind": kind.value, "amount_fen": 100}, None)]
    moves += [FireMove(p, 0) for p in picks]
    for outcome in run(ENGINE, kind, "kuaishou", moves):
        assert outcome.applied
