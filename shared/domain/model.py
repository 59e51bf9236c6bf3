"""The value objects of the domain core (see docs/design.md, "The domain core API").

All frozen dataclasses; datetimes are timezone-aware and in UTC; money is integer fen.
Mappings inside them are plain dicts that the engine never mutates (copy on write).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import StrEnum
from functools import lru_cache
from typing import Any

OPEN = "open"
CLOSED = "closed"


class Kind(StrEnum):
    refund_only = "refund_only"
    return_refund = "return_refund"
    exchange = "exchange"
    repair = "repair"
    onsite_repair = "onsite_repair"
    voucher_refund = "voucher_refund"


class Party(StrEnum):
    merchant = "merchant"
    buyer = "buyer"
    platform = "platform"
    ops = "ops"


@dataclass(frozen=True)
class Event:
    """An inbound event after schema validation."""

    event_id: str
    type: str
    occurred_at: datetime
    platform: str
    shop_id: str
    order_id: str
    case_id: str
    due_at: datetime | None
    data: Mapping[str, Any]


@dataclass(frozen=True)
class RuleRef:
    set: str
    version: str
    id: str


_CASE_TIMES = ("step_started_at", "step_due_at", "opened_at", "closed_at")


@dataclass(frozen=True)
class Case:
    case_id: str
    platform: str
    shop_id: str
    order_id: str
    kind: Kind
    status: str  # "open" | "closed"
    step: str  # current step; "closed" once the case is closed (see data["closed_at_step"])
    resolution: str | None  # how a closed case ended
    version: int  # +1 on every applied change: the fence of the deadlines
    step_started_at: datetime
    step_due_at: datetime | None  # effective deadline of the current step
    paused_remaining_s: int | None  # clock paused: seconds that were left on the step
    rule_set: str  # "" when the step has no rule
    rule_version: str
    amount_fen: int
    refund_fen: int | None
    contacts: Mapping[str, Mapping[str, str]]
    opened_at: datetime
    closed_at: datetime | None
    data: Mapping[str, Any]
    # additions to the design: the id of the rule in force for the step (with set, version)
    rule_id: str | None = None

    @property
    def rule(self) -> RuleRef | None:
        if self.rule_id is None:
            return None
        return RuleRef(self.rule_set, self.rule_version, self.rule_id)

    @property
    def is_open(self) -> bool:
        return self.status == OPEN

    def to_dict(self, *, copy: bool = True) -> dict[str, Any]:
        """JSON-safe: datetimes as RFC 3339 strings. `copy=False` hands over the case's
        own contacts and data instead of deep copies: for a serialiser that only reads
        them (saving the case)."""
        out: dict[str, Any] = {}
        for name in _CASE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, Kind):
                value = value.value
            elif copy and name in ("contacts", "data"):
                value = _plain(value)
            out[name] = value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, copy: bool = True) -> Case:
        """`copy=False` when `d` was just parsed from JSON: its dicts and lists become the
        case's own (no one else holds them) instead of being copied again."""
        values = dict(d)
        for name in _CASE_TIMES:
            if values.get(name) is not None:
                values[name] = datetime.fromisoformat(values[name])
        values["kind"] = Kind(values["kind"])
        contacts, data = values.get("contacts", {}), values.get("data", {})
        values["contacts"] = _plain(contacts) if copy else contacts
        values["data"] = _plain(data) if copy else data
        return cls(**{k: v for k, v in values.items() if k in _CASE_FIELD_SET})


_CASE_FIELDS = tuple(f.name for f in fields(Case))
_CASE_FIELD_SET = frozenset(_CASE_FIELDS)
_UNCHANGED_BY_PLAIN = (str, int, float, bool, type(None))


def evolve(case: Case, **changes: Any) -> Case:
    """`dataclasses.replace` for a Case, without its cost: the engine copies a case several
    times per change, and `replace` checks every field and runs a frozen dataclass's
    `__init__`, which sets each one through `object.__setattr__` (docs/benchmarks.md,
    "Session 11"). Case has no `__post_init__` to skip
    (tests/unit/domain/test_domain_model.py checks both)."""
    unknown = changes.keys() - _CASE_FIELD_SET
    if unknown:
        raise TypeError(f"Case has no field {sorted(unknown)}")
    new = object.__new__(Case)
    new.__dict__.update(case.__dict__, **changes)
    return new


def _plain(value: Any) -> Any:
    """A deep copy made of dicts and lists only."""
    if isinstance(value, _UNCHANGED_BY_PLAIN):  # the leaves, checked before the ABCs
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class DeadlineSpec:
    case_id: str
    step: str
    purpose: str  # "deadline" | "reminder"
    due_at: datetime  # when it fires (UTC)
    action: str  # timeout action of a deadline; "remind" for a reminder
    party: str  # who must act
    fence: int  # the case.version this deadline belongs to
    rule: RuleRef
    deadline_at: datetime  # for a reminder, the deadline it warns about; else = due_at
    # working-day deadlines: the calendar data they stand on, e.g. {"source": "estimated",
    # "estimated": true} (shared.domain.calendar); None for fixed durations
    calendar: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Decision:
    """An automatic decision or a reminder, published to upstream."""

    type: str
    case_id: str
    step: str
    rule: RuleRef
    due_at: datetime
    decided_at: datetime
    data: Mapping[str, Any]
    key: str  # stable: the same missed deadline gives the same key


# decision_id = uuid5(namespace, decision.key): the same missed deadline always gives the
# same id, however often (and in whichever rebuild of the case) it is decided again.
DECISION_NAMESPACE = uuid.UUID("6f0c7a52-3c2e-4b8e-9a51-5f1b0d3c9e21")
SUPERSEDED = "decision.superseded"


@lru_cache(maxsize=4096)  # one decision's id is asked for several times while it is stored
def decision_id(key: str) -> str:
    return str(uuid.uuid5(DECISION_NAMESPACE, key))


@dataclass(frozen=True)
class Notice:
    """Something a person should hear about; the notification policy expands it."""

    reason: str
    case_id: str
    step: str
    party: str | None
    due_at: datetime | None
    urgent: bool
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepResult:
    """A step that ended, for SLA metrics: met = its party acted before the deadline."""

    step: str
    party: str
    met: bool
    seconds: float


@dataclass(frozen=True)
class Outcome:
    # None only when apply() got no case and the event could not open one
    case: Case | None
    applied: bool
    problem: str | None
    # the FULL set of pending deadlines the case must have now; None = leave them as they are
    deadlines: tuple[DeadlineSpec, ...] | None
    decisions: tuple[Decision, ...] = ()
    notices: tuple[Notice, ...] = ()
    steps: tuple[StepResult, ...] = ()
    # what became of each event taken into account: event_id -> None (applied) or the
    # problem (out of state / invalid). A rebuild re-judges every event of the case's log.
    verdicts: Mapping[str, str | None] = field(default_factory=dict)
    rebuilt: bool = False  # the case was rebuilt from its log in event-time order


def seconds_to_resolution(before: Case | None, after: Case) -> float | None:
    """Seconds from opening to closing, if the change from `before` to `after` is what
    closed the case (for the time-to-resolution metric); else None."""
    if after.status != CLOSED or (before is not None and before.status == CLOSED):
        return None
    return ((after.closed_at or after.opened_at) - after.opened_at).total_seconds()
