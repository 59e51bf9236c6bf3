"""Inbound event schema, version 1: an envelope plus a `data` model per event type.

`parse_event` turns raw AMQP bytes into a validated `EventV1` or a `Rejection` whose
`reason` is one of a few fixed codes (used as a metric label) and whose `detail` says
exactly what is wrong (kept in the rejected message's header for ops).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from shared.domain.model import Kind  # the one list of kinds; the schema shows its values

SCHEMA_VERSION = 1

Id = Annotated[str, StringConstraints(min_length=1, max_length=128, strip_whitespace=True)]
Text = Annotated[str, StringConstraints(max_length=2000)]
Url = Annotated[str, StringConstraints(min_length=1, max_length=2000)]


class _Data(BaseModel):
    # Upstream systems add fields over time; unknown ones are kept, never a rejection.
    model_config = ConfigDict(extra="allow")


class Contact(BaseModel):
    model_config = ConfigDict(extra="allow")
    phone: Annotated[str, StringConstraints(pattern=r"^\+?[0-9]{5,20}$")] | None = None
    email: Annotated[
        str, StringConstraints(max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")] | None = None


class CaseOpened(_Data):
    kind: Kind
    amount_fen: int = Field(ge=0, le=10**12)
    reason: Text = ""
    evidence: list[Url] = Field(default_factory=list, max_length=50)
    buyer: Contact = Field(default_factory=Contact)
    merchant: Contact = Field(default_factory=Contact)
    # Local-life vouchers: how many units were bought and used (pro-rata refunds).
    voucher_total_count: int | None = Field(default=None, ge=1)
    voucher_used_count: int | None = Field(default=None, ge=0)
    voucher_expires_at: AwareDatetime | None = None

    @model_validator(mode="after")
    def _voucher_counts(self) -> CaseOpened:
        total, used = self.voucher_total_count, self.voucher_used_count
        if total is not None and used is not None and used > total:
            raise ValueError("voucher_used_count exceeds voucher_total_count")
        return self


class MerchantRejected(_Data):
    reason: Annotated[str, StringConstraints(min_length=1, max_length=2000)]
    evidence: list[Url] = Field(default_factory=list, max_length=50)


class BuyerShipped(_Data):
    carrier: Id
    tracking_no: Id


class MerchantInspected(_Data):
    passed: bool


class RepairScheduled(_Data):
    visit_at: AwareDatetime


class InterventionResolved(_Data):
    outcome: Id


class RefundCompleted(_Data):
    amount_fen: int = Field(ge=0, le=10**12)


class NoData(_Data):
    pass


class DeadlineChanged(_Data):
    # the step the platform's deadline is for; without it, the change applies only to the
    # step the case was in when the change happened (docs/design.md "Event time")
    step: Id | None = None


DATA_MODELS: dict[str, type[_Data]] = {
    "case.opened": CaseOpened,
    "merchant.approved": NoData,
    "merchant.rejected": MerchantRejected,
    "merchant.refused_repair": NoData,
    "buyer.shipped": BuyerShipped,
    "merchant.received": NoData,
    "merchant.inspected": MerchantInspected,
    "merchant.reshipped": NoData,
    "buyer.confirmed": NoData,
    "buyer.cancelled": NoData,
    "buyer.modified": NoData,
    "repair.scheduled": RepairScheduled,
    "repair.visited": NoData,
    "repair.completed": NoData,
    "intervention.requested": NoData,
    "intervention.resolved": InterventionResolved,
    "refund.completed": RefundCompleted,
    "deadline.changed": DeadlineChanged,
    "voucher.expired": NoData,
}
EVENT_TYPES = tuple(DATA_MODELS)


class EventV1(BaseModel):
    """The envelope every upstream event carries (contract v1)."""

    # Unknown envelope fields are kept, not refused: upstreams add fields before we do.
    model_config = ConfigDict(extra="allow")

    event_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    type: Literal[EVENT_TYPES]  # type: ignore[valid-type]
    occurred_at: AwareDatetime
    platform: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
    shop_id: Id
    order_id: Id
    case_id: Id
    due_at: AwareDatetime | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    schema_version: Literal[1] = 1

    @model_validator(mode="after")
    def _deadline_changed_needs_due_at(self) -> EventV1:
        if self.type == "deadline.changed" and self.due_at is None:
            raise ValueError("deadline.changed needs due_at")
        return self

    def typed_data(self) -> _Data:
        return DATA_MODELS[self.type].model_validate(self.data)


class RejectReason(StrEnum):
    not_utf8 = "not_utf8"
    invalid_json = "invalid_json"
    schema = "schema"
    unknown_type = "unknown_type"
    oversized = "oversized"


@dataclass(frozen=True)
class Rejection:
    reason: RejectReason
    detail: str


@dataclass(frozen=True)
class Accepted:
    event: EventV1
    data: dict[str, Any]  # the type's data, validated and normalised (JSON-safe)
    body: dict[str, Any]  # the whole event, JSON-safe, as stored in the case log


def _first_error(exc: ValidationError, prefix: str = "") -> str:
    errors = exc.errors()
    parts = []
    for err in errors[:3]:
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        parts.append(f"{loc or '(body)'}: {err['msg']}")
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def parse_event(raw: bytes, max_bytes: int) -> Accepted | Rejection:
    """Validate one inbound message. Never raises on bad input."""
    if len(raw) > max_bytes:
        return Rejection(RejectReason.oversized, f"body is {len(raw)} bytes, limit {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection(RejectReason.not_utf8, f"not UTF-8 at byte {exc.start}")
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        return Rejection(RejectReason.invalid_json, f"not JSON: {exc}"[:500])
    if _has_nul(doc):
        # PostgreSQL cannot store U+0000 in text or JSONB; say so instead of failing later.
        return Rejection(RejectReason.schema, "strings must not contain U+0000")
    if not isinstance(doc, dict):
        got = type(doc).__name__
        return Rejection(RejectReason.schema, f"body must be a JSON object, got {got}")
    event_type = doc.get("type")
    if isinstance(event_type, str) and event_type not in DATA_MODELS:
        return Rejection(RejectReason.unknown_type, f"unknown event type {event_type[:64]!r}")
    try:
        event = EventV1.model_validate(doc)
    except ValidationError as exc:
        return Rejection(RejectReason.schema, _first_error(exc)[:1000])
    try:
        data = event.typed_data()
    except ValidationError as exc:
        return Rejection(RejectReason.schema, _first_error(exc, "data")[:1000])
    data_json = data.model_dump(mode="json", exclude_none=True)
    body = event.model_dump(mode="json", exclude_none=True)
    body["data"] = data_json
    return Accepted(event=event, data=data_json, body=body)


def event_json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of the envelope, of each type's data and of the outbound decision,
    for `schemas/v1/`."""
    from shared.schemas.decisions import DecisionV1

    out: dict[str, dict[str, Any]] = {
        "envelope": EventV1.model_json_schema(),
        "decision": DecisionV1.model_json_schema(),
    }
    for name, model in DATA_MODELS.items():
        out[name] = model.model_json_schema()
    return out
