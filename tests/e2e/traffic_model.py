"""What the generated traffic calls for, predicted without the services: every case's
events replayed through the pure domain core, each deadline fired at its due time, the
notices expanded by the notification policy. The fault suite compares what actually
arrived (on a queue bound to `aftersales.decisions`, at the SMTP server, at the SMS
provider) with this prediction, not with rows the services wrote themselves.

Under faults an event reaches intake late, so events are replayed at the time they
arrived (`arrivals`, the case log's received_at, on the database clock that also decides
due-ness) when given. A deadline fires some time after it is due (`lag(due)`): an event
that arrived in between raced the deadline, and either order is right; such a case is
marked `ambiguous` and left out of the comparison by the caller."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from services.intake.processor import to_domain_event
from shared.domain import Case, DeadlineSpec, Engine, Outcome
from shared.notifications.policy import NotificationPolicy
from shared.schemas.events import Accepted, parse_event


@dataclass
class CasePrediction:
    decisions: list[tuple[str, str]] = field(default_factory=list)  # (type, step)
    notifications: set[str] = field(default_factory=set)  # dedup keys
    outcomes: dict[str, str] = field(default_factory=dict)  # event_id -> applied|out_of_state
    ambiguous: bool = False  # an event arrived while a deadline it races was being fired


# Intake stamps received_at when its transaction starts and commits a little later.
COMMIT_SLACK_S = 1.0


def predict(bodies: Iterable[bytes], engine: Engine, policy: NotificationPolicy,
            ops: Any, until: datetime, arrivals: dict[str, datetime] | None = None,
            lag: Callable[[datetime], float] = lambda _due: 0.0
            ) -> dict[str, CasePrediction]:
    """Per case: the decisions and notifications due by `until`, and what became of each
    event (the case log's outcome)."""
    per_case: dict[str, list[Accepted]] = {}
    seen: set[str] = set()
    for body in bodies:
        parsed = parse_event(body, 10**6)
        if not isinstance(parsed, Accepted) or parsed.event.event_id in seen:
            continue  # malformed (rejected) or a duplicate (deduplicated by event_id)
        seen.add(parsed.event.event_id)
        per_case.setdefault(parsed.event.case_id, []).append(parsed)
    return {case_id: _replay(events, engine, policy, ops, until, arrivals or {}, lag)
            for case_id, events in per_case.items()}


def _replay(events: list[Accepted], engine: Engine, policy: NotificationPolicy, ops: Any,
            until: datetime, arrivals: dict[str, datetime],
            lag: Callable[[datetime], float]) -> CasePrediction:
    out = CasePrediction()
    case: Case | None = None
    pending: list[tuple[datetime, int, DeadlineSpec]] = []
    tiebreak = 0
    domain = [to_domain_event(a) for a in events]
    queue = sorted(((arrivals.get(e.event_id, e.occurred_at), e) for e in domain),
                   key=lambda pair: (pair[0], pair[1].occurred_at))

    def keep(outcome: Outcome) -> None:
        nonlocal case, pending, tiebreak
        if not outcome.applied or outcome.case is None:
            return
        case = outcome.case
        for decision in outcome.decisions:
            out.decisions.append((decision.type, decision.step))
        for notice in outcome.notices:
            out.notifications.update(
                r.dedup_key for r in policy.expand(notice, case.contacts, ops))
        if outcome.deadlines is not None:
            pending = []
            for spec in outcome.deadlines:
                tiebreak += 1
                heapq.heappush(pending, (spec.due_at, tiebreak, spec))

    index = 0
    while True:
        arrival = queue[index][0] if index < len(queue) else None
        if pending and pending[0][0] <= until and (arrival is None
                                                   or pending[0][0] <= arrival):
            due, _tb, spec = heapq.heappop(pending)
            if case is not None:
                fired = engine.fire(case, spec, due)
                if fired.applied and arrival is not None \
                        and arrival <= due + timedelta(seconds=lag(due)):
                    out.ambiguous = True  # the event may have been applied first
                keep(fired)
            continue
        if arrival is None:
            return out
        _at, event = queue[index]
        index += 1
        if case is not None and pending and pending[0][0] <= until and \
                pending[0][0] - arrival <= timedelta(seconds=COMMIT_SLACK_S) and \
                engine.fire(case, pending[0][2], pending[0][0]).applied:
            out.ambiguous = True  # committed just around the deadline
        outcome = engine.apply(case, event, max(arrival, event.occurred_at))
        out.outcomes[event.event_id] = "applied" if outcome.applied else "out_of_state"
        keep(outcome)
