"""Inbound event schema, version 1: an envelope plus a `data` model per event type.

`parse_event` turns raw AMQP bytes into a validated `EventV1` or a `Rejection` whose
`reason` is one of a few fixed codes (used as a metric label) and whose `detail` says
exactly what is wrong (kept in the rejected message's header for ops).

Strict to the contract, and cheap checks first: the size, then the nesting depth (a scan
of the raw bytes, before any recursive parser sees them), then JSON, then every value of
the document (64-bit integers, finite numbers, strings of Unicode scalar values without
U+0000, keys without control or format characters), then the typed models in strict mode
(no `true` or `"100"` for an integer, no epoch number for a time), then the plausible time
window. Whatever is accepted can be stored in PostgreSQL and encoded again.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from shared.domain.model import Kind  # the one list of kinds; the schema shows its values

SCHEMA_VERSION = 1

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Categories no identifier may contain: control (Cc), format (Cf: zero-width and
# bidirectional marks), surrogates (Cs), line and paragraph separators.
_FORBIDDEN_IN_IDS = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _visible_id(value: str) -> str:
    if value.isprintable():  # every forbidden category is one `isprintable` refuses
        return value
    for char in value:
        if unicodedata.category(char) in _FORBIDDEN_IN_IDS:
            raise ValueError(f"must not contain control or format characters (U+{ord(char):04X})")
    return value


MAX_UTC_OFFSET = timedelta(hours=14)
# RFC 3339 with its offset (a trailing Z or +hh:mm): no epoch numbers, no local times.
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")


def _rfc3339(value: Any) -> Any:
    if isinstance(value, datetime):
        return value  # already parsed (the models are also built from Python values)
    if not isinstance(value, str) or not _RFC3339.match(value):
        raise ValueError("must be an RFC 3339 date-time string with an offset, "
                         "e.g. 2026-11-22T10:00:00+08:00")
    # Python's parser takes at most 6 fractional digits; finer precision is dropped.
    head, _, tail = value.partition(".")
    if tail:
        digits = re.match(r"\d+", tail)
        assert digits is not None
        value = f"{head}.{digits.group()[:6].ljust(6, '0')}{tail[digits.end():]}"
    try:
        parsed = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError as exc:
        raise ValueError(f"not a valid date-time: {exc}") from None
    offset = parsed.utcoffset()
    if offset is not None and abs(offset) > MAX_UTC_OFFSET:
        # Real offsets lie within -12:00..+14:00; PostgreSQL refuses beyond ±15:59.
        raise ValueError("UTC offset beyond ±14:00")
    return parsed


# Strict types: the JSON type the contract documents, no coercion.
Id = Annotated[str, Strict(),
               StringConstraints(min_length=1, max_length=128, strip_whitespace=True),
               AfterValidator(_visible_id)]
Text = Annotated[str, Strict(), StringConstraints(max_length=2000)]
Url = Annotated[str, Strict(), StringConstraints(min_length=1, max_length=2000),
                AfterValidator(_visible_id)]
Int64 = Annotated[int, Strict()]  # any integer of the document is checked against 64 bits
EventTime = Annotated[datetime, BeforeValidator(_rfc3339),
                      WithJsonSchema({"type": "string", "format": "date-time"})]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _Data(_Strict):
    # Upstream systems add fields over time; unknown ones are kept, never a rejection
    # (their values pass the same storability checks as the rest of the document).
    pass


class Contact(_Strict):
    phone: Annotated[str, Strict(), StringConstraints(pattern=r"^\+?[0-9]{5,20}$")] | None = None
    email: Annotated[
        str, Strict(), StringConstraints(max_length=254, pattern=r"^[^@\s]+@[^@\s]+$"),
        AfterValidator(_visible_id)] | None = None


class CaseOpened(_Data):
    kind: Annotated[Kind, Strict(False)]  # an enum from its JSON string value
    amount_fen: Int64 = Field(ge=0, le=10**12)
    reason: Text = ""
    evidence: list[Url] = Field(default_factory=list, max_length=50)
    buyer: Contact = Field(default_factory=Contact)
    merchant: Contact = Field(default_factory=Contact)
    # Local-life vouchers: how many units were bought and used (pro-rata refunds).
    voucher_total_count: Int64 | None = Field(default=None, ge=1)
    voucher_used_count: Int64 | None = Field(default=None, ge=0)
    voucher_expires_at: EventTime | None = None

    @model_validator(mode="after")
    def _voucher_counts(self) -> CaseOpened:
        total, used = self.voucher_total_count, self.voucher_used_count
        if total is not None and used is not None and used > total:
            raise ValueError("voucher_used_count exceeds voucher_total_count")
        return self


class MerchantRejected(_Data):
    reason: Annotated[str, Strict(), StringConstraints(min_length=1, max_length=2000)]
    evidence: list[Url] = Field(default_factory=list, max_length=50)


class BuyerShipped(_Data):
    carrier: Id
    tracking_no: Id


class MerchantInspected(_Data):
    passed: bool


class RepairScheduled(_Data):
    visit_at: EventTime
    visit_until: EventTime | None = None  # the end of the agreed slot (default: visit_at)


class InterventionResolved(_Data):
    outcome: Id


class RefundCompleted(_Data):
    amount_fen: Int64 = Field(ge=0, le=10**12)


class BuyerRated(_Data):
    rating: int = Field(ge=1, le=5)
    comment: Text = ""


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
    "buyer.received": NoData,
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
    "buyer.rated": BuyerRated,
}
EVENT_TYPES = tuple(DATA_MODELS)


class EventV1(_Strict):
    """The envelope every upstream event carries (contract v1)."""

    # Unknown envelope fields are kept, not refused: upstreams add fields before we do.

    event_id: Annotated[str, Strict(), StringConstraints(min_length=1, max_length=256),
                        AfterValidator(_visible_id)]
    type: Literal[EVENT_TYPES]  # type: ignore[valid-type]
    occurred_at: EventTime
    platform: Annotated[str, Strict(), StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
    shop_id: Id
    order_id: Id
    case_id: Id
    due_at: EventTime | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    schema_version: Literal[1] = 1

    @field_validator("schema_version", mode="before")
    @classmethod
    def _schema_version_is_a_number(cls, value: Any) -> Any:
        if type(value) is not int:  # Literal[1] alone takes `true` (True == 1)
            raise ValueError("must be the integer 1")
        return value

    @model_validator(mode="after")
    def _deadline_changed_needs_due_at(self) -> EventV1:
        if self.type == "deadline.changed" and self.due_at is None:
            raise ValueError("deadline.changed needs due_at")
        return self

    def typed_data(self) -> _Data:
        return DATA_MODELS[self.type].model_validate(self.data)


class RejectReason(StrEnum):
    """Why a message went to `aftersales.events.rejected` (the `x-reject-reason` header and
    the `reason` label of `aftersales_events_rejected`)."""

    not_utf8 = "not_utf8"  # the body is not UTF-8
    invalid_json = "invalid_json"  # not one JSON document
    schema = "schema"  # a field missing, of another type than documented, or out of its range
    unknown_type = "unknown_type"  # `type` is not an event type of the contract
    oversized = "oversized"  # the body is larger than AFTERSALES_MAX_EVENT_BYTES
    too_deep = "too_deep"  # nested deeper than AFTERSALES_INTAKE_MAX_DEPTH
    out_of_range = "out_of_range"  # an integer beyond 64 bits, or a non-finite number
    invalid_text = "invalid_text"  # a lone surrogate, U+0000, or a control character in a key
    implausible_time = "implausible_time"  # occurred_at / due_at outside the plausible window
    case_never_opened = "case_never_opened"  # parked, and its case was not opened in time
    internal_error = "internal_error"  # handling it raised: kept for ops, the rest goes on


@dataclass(frozen=True)
class Rejection:
    reason: RejectReason
    detail: str


@dataclass(frozen=True)
class Accepted:
    event: EventV1
    data: dict[str, Any]  # the type's data, validated and normalised (JSON-safe)
    body: dict[str, Any]  # the whole event, JSON-safe, as stored in the case log

    @cached_property  # read for the dedup check and again for the case log row
    def content_hash(self) -> str:
        """SHA-256 of the normalised event: the same event sent again (other key order,
        other spacing, other time zone notation of the same instant) has the same hash."""
        return content_hash(self.body)


def content_hash(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Limits:
    """What intake accepts beyond the types (settings `AFTERSALES_INTAKE_*`)."""

    max_bytes: int = 64 * 1024
    max_depth: int = 16
    # The plausible window, around the time intake received the message.
    max_future: timedelta = timedelta(minutes=5)
    max_past: timedelta = timedelta(days=400)
    max_due_ahead: timedelta = timedelta(days=400)


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


# Tokens that matter for nesting: an escape (two bytes, so an escaped quote is skipped), a
# quote, a bracket. Everything else is skipped by the regex engine, not by Python.
_STRUCTURE = re.compile(rb'\\.|["\[\]{}]', re.DOTALL)


def nesting_depth(raw: bytes, stop_at: int) -> int:
    """Deepest nesting of arrays and objects in `raw` (outside strings), found without
    parsing; stops counting once `stop_at` is exceeded. Linear in the size of `raw`."""
    depth = deepest = 0
    in_string = False
    for match in _STRUCTURE.finditer(raw):
        token = match.group()
        if token == b'"':
            in_string = not in_string
        elif in_string or len(token) == 2:
            continue
        elif token in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > stop_at:
                    return deepest
        else:
            depth -= 1
    return deepest


def _plainly_storable(value: Any) -> bool:
    """True for a scalar that certainly has no problem: the usual value, passed without
    building its path. False sends it (and every container) to `_value_problem`'s long
    way, which says what the problem is, if any (a string need not be printable)."""
    if isinstance(value, str):
        # printable: no U+0000, no lone surrogate (both are categories it refuses)
        return value.isprintable()
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, int):
        return INT64_MIN <= value <= INT64_MAX
    if isinstance(value, float):
        return math.isfinite(value)
    return False


def _value_problem(value: Any, path: str) -> tuple[RejectReason, str] | None:
    """The first value that could not be stored or encoded again. Recursion is bounded:
    the depth was checked on the raw bytes before parsing."""
    if _plainly_storable(value):
        return None
    # A scalar past here failed the quick check: a number is out of range; a string that
    # is not printable may still be fine (a tab, a newline).
    if isinstance(value, str):
        return _text_problem(value, path)
    if isinstance(value, int):
        return RejectReason.out_of_range, f"{path}: integer outside the signed 64-bit range"
    if isinstance(value, float):
        return RejectReason.out_of_range, f"{path}: number too large for a double"
    if isinstance(value, dict):
        for key, item in value.items():
            key_plain = key.isprintable()  # no U+0000, surrogate, control or format char
            if key_plain and _plainly_storable(item):
                continue
            name = key[:40] if key[:40].isprintable() else repr(key[:40])
            where = f"{path}.{name}" if path else name
            problem = None if key_plain else _key_problem(key, where)
            problem = problem or _value_problem(item, where)
            if problem:
                return problem
        return None
    if isinstance(value, list):
        for index, item in enumerate(value):
            if _plainly_storable(item):
                continue
            problem = _value_problem(item, f"{path}[{index}]")
            if problem:
                return problem
    return None


def _key_problem(key: str, where: str) -> tuple[RejectReason, str] | None:
    problem = _text_problem(key, where)
    if problem is None and any(unicodedata.category(c) in _FORBIDDEN_IN_IDS for c in key):
        problem = (RejectReason.invalid_text,
                   f"{where}: a key must not contain control or format characters")
    return problem


def _text_problem(text: str, path: str) -> tuple[RejectReason, str] | None:
    if "\x00" in text:
        # PostgreSQL cannot store U+0000 in text or JSONB; say so instead of failing later.
        return RejectReason.invalid_text, f"{path or '(body)'}: strings must not contain U+0000"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (RejectReason.invalid_text, f"{path or '(body)'}: lone surrogate "
                f"U+{ord(text[exc.start]):04X} (a character cut in half?)")
    return None


def _time_problem(event: EventV1, now: datetime, limits: Limits) -> str | None:
    if event.occurred_at > now + limits.max_future:
        return (f"occurred_at {event.occurred_at.isoformat()} is more than "
                f"{_span(limits.max_future)} after intake received it ({now.isoformat()})")
    if event.occurred_at < now - limits.max_past:
        return (f"occurred_at {event.occurred_at.isoformat()} is more than "
                f"{_span(limits.max_past)} before intake received it ({now.isoformat()})")
    if event.due_at is not None:
        if event.due_at > now + limits.max_due_ahead:
            return (f"due_at {event.due_at.isoformat()} is more than "
                    f"{_span(limits.max_due_ahead)} after intake received it")
        if event.due_at < now - limits.max_past:
            return (f"due_at {event.due_at.isoformat()} is more than "
                    f"{_span(limits.max_past)} before intake received it")
    return None


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    return f"{seconds // 86400} days" if seconds >= 86400 and not seconds % 86400 \
        else f"{seconds} s"


def parse_event(raw: bytes, max_bytes: int | None = None, *, limits: Limits | None = None,
                now: datetime | None = None) -> Accepted | Rejection:
    """Validate one inbound message. Never raises on bad input.

    `now` is when intake received it: occurred_at and due_at must lie in the plausible
    window around it. Without `now` (an event read back from the case log) the window is
    not checked again."""
    limits = limits or Limits()
    if max_bytes is not None:
        limits = Limits(max_bytes, limits.max_depth, limits.max_future, limits.max_past,
                        limits.max_due_ahead)
    if len(raw) > limits.max_bytes:
        return Rejection(RejectReason.oversized,
                         f"body is {len(raw)} bytes, limit {limits.max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection(RejectReason.not_utf8, f"not UTF-8 at byte {exc.start}")
    # Fewer opening brackets than the limit (in strings or not): it cannot be too deep,
    # and the scan is skipped. Most events have four or five.
    brackets = raw.count(b"{") + raw.count(b"[")
    if brackets > limits.max_depth and nesting_depth(raw, limits.max_depth) > limits.max_depth:
        return Rejection(RejectReason.too_deep,
                         f"nested more than {limits.max_depth} levels deep")
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        return Rejection(RejectReason.invalid_json, f"not JSON: {exc}"[:500])
    problem = _value_problem(doc, "")
    if problem:
        return Rejection(problem[0], problem[1][:1000])
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
    if now is not None:
        late_or_early = _time_problem(event, now, limits)
        if late_or_early:
            return Rejection(RejectReason.implausible_time, late_or_early)
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
