"""Platform messages to our events, driven by the mapping files in `mappings/` (one TOML
file per platform, documented in docs/platforms.md).

Pure: no I/O besides reading the mapping files, no clock of its own (`received_at` is
passed in). Each platform's transport (services/gateway/platforms.py) turns what the
platform sent into `PlatformMessage`s; `map_message` gives each one a verdict:
`Mapped` (our events, ready to publish), `Unmapped` (kept for ops) or `Ignored`
(acknowledged: a message that by design changes nothing of ours).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from shared.domain.flows import FLOWS, INTERVENTION_OUTCOMES
from shared.domain.model import Kind
from shared.domain.timeutil import CHINA_TZ_NAME
from shared.errors import ConfigError
from shared.schemas.events import DATA_MODELS, Accepted, parse_event

MAPPINGS_DIR = Path(__file__).with_name("mappings")
PLATFORMS = ("douyin", "kuaishou", "taobao")
ACTORS = frozenset({"buyer", "merchant", "platform"})
TIME_FORMATS = frozenset({"unix_seconds", "unix_millis", "local_text"})
# Our event body limit is far above anything the gateway builds; the check is a safety net.
MAX_EVENT_BYTES = 64 * 1024


class MappingError(ConfigError, ValueError):
    """A mapping file is wrong: the gateway refuses to start."""


@dataclass(frozen=True)
class MessageRule:
    key: str
    name: str
    events: tuple[str, ...] = ()
    time_field: str | None = None
    actor: str | None = None
    platform_may_act: bool = False
    ignore: str | None = None
    reason: str | None = None
    requested_by: str | None = None
    outcome: str | None = None
    outcome_by: str | None = None
    outcomes: Mapping[str, str] = field(default_factory=dict)
    by_kind: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def events_for(self, kind: str | None) -> tuple[str, ...]:
        return self.by_kind.get(kind, self.events) if kind else self.events


@dataclass(frozen=True)
class PlatformMapping:
    platform: str
    case_prefix: str
    event_prefix: str
    timezone: ZoneInfo
    time_format: str
    fallback_time: str | None  # the data field to use when the rule's own time is missing
    platform_action_markers: tuple[str, ...]
    kinds: Mapping[str, str]
    steps: Mapping[str, str]
    messages: Mapping[str, MessageRule]


@dataclass(frozen=True)
class PlatformMessage:
    """One message as the platform sent it, its fields located but not yet interpreted."""

    platform: str
    message_id: str  # the platform's own id of this message: the idempotency key
    keys: tuple[str, ...]  # rule keys to try, most specific first (tag, topic, status)
    data: Mapping[str, Any]  # the decoded message data
    raw: bytes  # the message as received, kept for ops if it cannot be mapped
    case_ref: str | None = None
    order_ref: str | None = None
    shop_ref: str | None = None
    kind_code: str | None = None
    status_code: str | None = None
    amount_fen: int | None = None
    due_at: datetime | None = None  # the platform's deadline for the current step
    note: str = ""  # free text of the platform's (Douyin's latest_record)
    carrier: str | None = None
    tracking_no: str | None = None


@dataclass(frozen=True)
class Mapped:
    message: PlatformMessage
    rule: MessageRule
    events: tuple[Accepted, ...]


@dataclass(frozen=True)
class Unmapped:
    message: PlatformMessage
    detail: str


@dataclass(frozen=True)
class Ignored:
    message: PlatformMessage
    reason: str


Verdict = Mapped | Unmapped | Ignored


# ---- loading ------------------------------------------------------------------------------

def _str_table(doc: Mapping[str, Any], name: str, path: Path) -> dict[str, str]:
    table = doc.get(name, {})
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise MappingError(f"{path}: [{name}] must map codes to names")
    return {str(k): v for k, v in table.items()}


def _rule(key: str, raw: Any, path: Path) -> MessageRule:
    where = f"{path}: [messages.{key!r}]"
    if not isinstance(raw, dict):
        raise MappingError(f"{where} must be a table")
    known = {"name", "events", "time", "actor", "platform_may_act", "ignore", "reason",
             "requested_by", "outcome", "outcome_by", "outcomes", "by_kind"}
    unknown = set(raw) - known
    if unknown:
        raise MappingError(f"{where}: unknown keys {sorted(unknown)}")

    def events(value: Any, what: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise MappingError(f"{where}: {what} must be a list of event types")
        bad = [v for v in value if v not in DATA_MODELS]
        if bad:
            raise MappingError(f"{where}: unknown event types {bad}")
        return tuple(value)

    by_kind: dict[str, tuple[str, ...]] = {}
    for kind, table in (raw.get("by_kind") or {}).items():
        if kind not in Kind.__members__ or not isinstance(table, dict):
            raise MappingError(f"{where}: by_kind.{kind} is not one of our kinds")
        by_kind[kind] = events(table.get("events"), f"by_kind.{kind}.events")
    rule = MessageRule(
        key=key, name=str(raw.get("name", key)),
        events=events(raw.get("events", []), "events"),
        time_field=raw.get("time"), actor=raw.get("actor"),
        platform_may_act=bool(raw.get("platform_may_act", False)),
        ignore=raw.get("ignore"), reason=raw.get("reason"),
        requested_by=raw.get("requested_by"), outcome=raw.get("outcome"),
        outcome_by=raw.get("outcome_by"),
        outcomes={str(k): str(v) for k, v in (raw.get("outcomes") or {}).items()},
        by_kind=by_kind,
    )
    if not rule.events and not rule.ignore:
        raise MappingError(f"{where}: needs events or ignore")
    if rule.actor is not None and rule.actor not in ACTORS:
        raise MappingError(f"{where}: actor must be one of {sorted(ACTORS)}")
    outcomes = [rule.outcome, *rule.outcomes.values()]
    if any(o is not None and o not in INTERVENTION_OUTCOMES for o in outcomes):
        raise MappingError(f"{where}: outcomes must be among {sorted(INTERVENTION_OUTCOMES)}")
    if "intervention.resolved" in rule.events and not (rule.outcome or rule.outcome_by):
        raise MappingError(f"{where}: intervention.resolved needs outcome or outcome_by")
    return rule


def load_mapping(path: Path) -> PlatformMapping:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise MappingError(f"{path}: {exc}") from None
    kinds = _str_table(doc, "kinds", path)
    bad_kinds = [k for k in kinds.values() if k not in Kind.__members__]
    if bad_kinds:
        raise MappingError(f"{path}: [kinds] names unknown kinds {bad_kinds}")
    steps = _str_table(doc, "steps", path)
    known_steps = {s for flow in FLOWS.values() for s in flow.steps}
    bad_steps = [s for s in steps.values() if s not in known_steps]
    if bad_steps:
        raise MappingError(f"{path}: [steps] names unknown steps {bad_steps}")
    time_format = doc.get("time_format", "unix_seconds")
    if time_format not in TIME_FORMATS:
        raise MappingError(f"{path}: time_format must be one of {sorted(TIME_FORMATS)}")
    try:
        zone = ZoneInfo(str(doc.get("timezone", CHINA_TZ_NAME)))
    except (KeyError, ValueError):
        raise MappingError(f"{path}: unknown timezone {doc.get('timezone')!r}") from None
    messages = doc.get("messages")
    if not isinstance(messages, dict) or not messages:
        raise MappingError(f"{path}: no [messages.*] tables")
    return PlatformMapping(
        platform=str(doc.get("platform", path.stem)),
        case_prefix=str(doc.get("case_prefix", "")),
        event_prefix=str(doc.get("event_prefix", "")),
        timezone=zone, time_format=time_format,
        fallback_time=doc.get("fallback_time"),
        platform_action_markers=tuple(doc.get("platform_action_markers", ())),
        kinds=kinds, steps=steps,
        messages={str(k): _rule(str(k), v, path) for k, v in messages.items()},
    )


def load_mappings(folder: Path | None = None) -> dict[str, PlatformMapping]:
    """The mapping of every supported platform (`folder` replaces the shipped files)."""
    base = folder or MAPPINGS_DIR
    return {p: load_mapping(base / f"{p}.toml") for p in PLATFORMS}


# ---- times --------------------------------------------------------------------------------

def platform_time(value: Any, time_format: str, zone: ZoneInfo) -> datetime | None:
    """A platform's time field as an aware datetime; None when absent or unreadable."""
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, str) and not value.strip().isdigit():
            # whatever the platform's usual format: RFC 3339 (Go's time.Time), or
            # "yyyy-MM-dd HH:mm:ss" in the platform's zone
            text = value.strip()
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                moment = datetime.strptime(text, "%Y-%m-%d %H:%M:%S")
            return moment if moment.tzinfo is not None else moment.replace(tzinfo=zone)
        if time_format == "local_text":
            if not isinstance(value, str):
                return None
            return datetime.strptime(value.strip(), "%Y-%m-%d %H:%M:%S").replace(tzinfo=zone)
        number = int(value) if isinstance(value, (int, str)) else None
        if number is None or number <= 0:
            return None
        seconds = number / 1000 if time_format == "unix_millis" else number
        return datetime.fromtimestamp(seconds, UTC).astimezone(zone)
    except (ValueError, OverflowError, OSError):
        return None


# ---- mapping ------------------------------------------------------------------------------

def _find_rule(mapping: PlatformMapping, message: PlatformMessage) -> MessageRule | None:
    for key in message.keys:
        rule = mapping.messages.get(key)
        if rule is not None:
            return rule
    return None


def _actor(mapping: PlatformMapping, rule: MessageRule, message: PlatformMessage) -> str | None:
    if rule.platform_may_act and any(m and m in message.note
                                     for m in mapping.platform_action_markers):
        return "platform"
    return rule.actor


def _data_for(event_type: str, rule: MessageRule, message: PlatformMessage,
              kind: str | None, mapping: PlatformMapping) -> dict[str, Any] | str:
    """The event's `data`, or why it cannot be built."""
    data: dict[str, Any] = {}
    if event_type == "case.opened":
        if kind is None:
            return f"{mapping.platform} after-sales type {message.kind_code!r} is not supported"
        if message.amount_fen is None:
            return "no refund amount in the message"
        data = {"kind": kind, "amount_fen": message.amount_fen}
    elif event_type == "merchant.rejected":
        data = {"reason": rule.reason or "rejected on the platform"}
    elif event_type == "buyer.shipped":
        # Some platforms' messages carry no waybill; the case records that it was not given.
        data = {"carrier": message.carrier or "unknown",
                "tracking_no": message.tracking_no or "unknown"}
    elif event_type in ("refund.completed", "buyer.modified"):
        if message.amount_fen is not None:
            data = {"amount_fen": message.amount_fen}
    elif event_type == "intervention.requested":
        if rule.requested_by:
            data = {"requested_by": rule.requested_by}
    elif event_type == "intervention.resolved":
        outcome = rule.outcome
        if rule.outcome_by:
            code = message.data.get(rule.outcome_by)
            outcome = rule.outcomes.get(str(code))
            if outcome is None:
                return f"{rule.outcome_by} {code!r} has no outcome of ours"
        data = {"outcome": outcome}
    elif event_type == "deadline.changed":
        step = mapping.steps.get(message.status_code or "")
        if step is None:
            return f"status {message.status_code!r} names no step of ours"
        if message.due_at is None:
            return "no deadline in the message"
        data = {"step": step}
    return data


def map_message(mapping: PlatformMapping, message: PlatformMessage,
                received_at: datetime) -> Verdict:
    rule = _find_rule(mapping, message)
    if rule is None:
        return Unmapped(message, f"{mapping.platform} message {' / '.join(message.keys)!r} "
                                 "is not supported")
    if rule.ignore:
        return Ignored(message, rule.ignore)
    missing = [name for name, value in (("case id", message.case_ref),
                                        ("order id", message.order_ref),
                                        ("shop id", message.shop_ref)) if not value]
    if missing:
        return Unmapped(message, f"{rule.key}: missing {', '.join(missing)}")
    kind = mapping.kinds.get(message.kind_code or "")
    occurred = None
    for name in (rule.time_field, mapping.fallback_time):
        if name and occurred is None:
            occurred = platform_time(message.data.get(name), mapping.time_format,
                                     mapping.timezone)
    # Without any time in the message, when the gateway received it. A retry of such a
    # message then differs from the first delivery in occurred_at (see docs/platforms.md).
    occurred = (occurred or received_at).astimezone(mapping.timezone)
    actor = _actor(mapping, rule, message)
    events: list[Accepted] = []
    types = rule.events_for(kind)
    for index, event_type in enumerate(types):
        data = _data_for(event_type, rule, message, kind, mapping)
        if isinstance(data, str):
            return Unmapped(message, f"{rule.key}: {data}")
        if actor and event_type != "deadline.changed":
            data["actor"] = actor
        data["source"] = {"platform": mapping.platform, "message": rule.key,
                          "message_id": message.message_id, "status": message.status_code}
        suffix = "" if index == 0 else f"-{index + 1}"
        doc: dict[str, Any] = {
            "event_id": f"{mapping.event_prefix}{message.message_id}{suffix}",
            "type": event_type,
            "occurred_at": occurred.isoformat(),
            "platform": mapping.platform,
            "shop_id": message.shop_ref,
            "order_id": message.order_ref,
            "case_id": f"{mapping.case_prefix}{message.case_ref}",
            "data": data,
        }
        if message.due_at is not None and index == len(types) - 1:
            # the platform's deadline is for the state after the message: the step the
            # last of its events enters
            doc["due_at"] = message.due_at.isoformat()
        checked = parse_event(json.dumps(doc, ensure_ascii=False).encode(), MAX_EVENT_BYTES)
        if not isinstance(checked, Accepted):
            return Unmapped(message, f"{rule.key}: {event_type} would be invalid: "
                                     f"{checked.detail}")
        events.append(checked)
    return Mapped(message, rule, tuple(events))
