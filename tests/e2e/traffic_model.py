"""What the generated traffic calls for, predicted without the services: every case's
events replayed through the pure domain core in event time, each deadline fired at its
due time, the notices expanded by the notification policy. The fault suite compares what
actually arrived (on a queue bound to `aftersales.decisions`, at the SMTP server, at the
SMS provider) with this prediction, not with rows the services wrote themselves."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
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


def predict(bodies: Iterable[bytes], engine: Engine, policy: NotificationPolicy,
            ops: Any, until: datetime) -> dict[str, CasePrediction]:
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
    return {case_id: _replay(events, engine, policy, ops, until)
            for case_id, events in per_case.items()}


def _replay(events: list[Accepted], engine: Engine, policy: NotificationPolicy, ops: Any,
            until: datetime) -> CasePrediction:
    out = CasePrediction()
    case: Case | None = None
    pending: list[tuple[datetime, int, DeadlineSpec]] = []
    tiebreak = 0
    queue = sorted(((to_domain_event(a), a) for a in events),
                   key=lambda pair: pair[0].occurred_at)

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
        next_event = queue[index][0].occurred_at if index < len(queue) else None
        if pending and pending[0][0] <= until and (next_event is None
                                                   or pending[0][0] <= next_event):
            due, _tb, spec = heapq.heappop(pending)
            if case is not None:
                keep(engine.fire(case, spec, due))
            continue
        if next_event is None:
            return out
        event, _accepted = queue[index]
        index += 1
        outcome = engine.apply(case, event, event.occurred_at)
        out.outcomes[event.event_id] = "applied" if outcome.applied else "out_of_state"
        keep(outcome)
