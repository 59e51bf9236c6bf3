"""Ops actions on a case: pause (an intervention), resume, extend (a goodwill extension).

Each is an ordinary event published to `aftersales.events`, so it goes through intake like
an upstream event: validated, deduplicated, applied under the case's lock, recorded in the
case's timeline. Its `data` says it came from ops, who did it and why:
`{"source": "ops", "by": ..., "reason": ...}`.

- pause  -> `intervention.requested` (the step's clock stops, what is left is kept)
- resume -> `intervention.resolved` with outcome `resume` (the clock goes on)
- extend -> `deadline.changed` with the new `due_at` (the step's deadline, reminders
  recomputed from it)

The event's `occurred_at` is the database clock's `now()`, the clock that decides.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from shared.db.queries.case_view import event_verdict, load_case
from shared.db.session import Database
from shared.domain.timeutil import as_utc
from shared.errors import InvalidInput
from shared.publish_events import publish_lines

OPS_SOURCE = "ops"
ACTIONS = {"pause": "intervention.requested", "resume": "intervention.resolved",
           "extend": "deadline.changed"}


class ActionError(InvalidInput, ValueError):
    """The action cannot be built (no such case, no deadline to extend...)."""


@dataclass(frozen=True)
class ActionResult:
    event: dict[str, Any]
    outcome: str | None  # applied | out_of_state | ... ; None if intake has not answered yet
    problem: str | None

    def document(self) -> dict[str, Any]:
        return {"event_id": self.event["event_id"], "type": self.event["type"],
                "case_id": self.event["case_id"], "outcome": self.outcome,
                "problem": self.problem, "data": self.event["data"],
                "due_at": self.event.get("due_at")}


def build_event(db: Database, action: str, case_id: str, reason: str, by: str,
                until: datetime | None = None, hours: float | None = None) -> dict[str, Any]:
    if action not in ACTIONS:
        raise ActionError(f"unknown action {action!r}")
    if not reason.strip():
        raise ActionError("a reason is needed: it is recorded in the case's timeline")
    moment, case = load_case(db, case_id)
    if case is None:
        raise ActionError(f"no case {case_id}")
    now, due = as_utc(moment), case.step_due_at
    event: dict[str, Any] = {
        "event_id": f"ops-{action}-{uuid.uuid4()}", "type": ACTIONS[action],
        "occurred_at": now.isoformat(), "platform": case.platform, "shop_id": case.shop_id,
        "order_id": case.order_id, "case_id": case.case_id,
        "data": {"source": OPS_SOURCE, "by": by, "reason": reason.strip()},
    }
    if action == "resume":
        event["data"]["outcome"] = "resume"
    if action == "extend":
        if until is None:
            if hours is None or hours <= 0:
                raise ActionError("extend needs --until TIME or --hours N (> 0)")
            if due is None:
                raise ActionError(f"case {case_id} has no deadline to extend in step {case.step}")
            until = as_utc(due) + timedelta(hours=hours)
        event["due_at"] = as_utc(until).isoformat()
    return event


def submit(amqp_url: str, event: dict[str, Any]) -> None:
    """Publish to `aftersales.events` with a publisher confirm, as upstream does."""
    publish_lines(amqp_url, [json.dumps(event, ensure_ascii=False).encode()])


def outcome_of(db: Database, event_id: str) -> tuple[str, str | None] | None:
    return event_verdict(db, event_id)


def act(db: Database, amqp_url: str, action: str, case_id: str, reason: str, by: str, *,
        until: datetime | None = None, hours: float | None = None,
        wait_seconds: float = 10.0) -> ActionResult:
    """Build, publish, and wait (a while) for intake's verdict on the event."""
    event = build_event(db, action, case_id, reason, by, until=until, hours=hours)
    submit(amqp_url, event)
    deadline = time.monotonic() + wait_seconds
    found = outcome_of(db, event["event_id"])
    while found is None and time.monotonic() < deadline:
        time.sleep(0.1)  # polling intake's verdict: a user is waiting for one line
        found = outcome_of(db, event["event_id"])
    return ActionResult(event, *(found or (None, None)))
