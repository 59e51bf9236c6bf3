"""Per-shop policies: a shop's own promise (its return policy) of shorter deadlines than its
platform's rules.

A shop-policy file (TOML) lies next to the rule sets (shipped in `shared/rules/`, or in
`AFTERSALES_RULES`) and holds one version of one shop's policy:

    [shop_policy]
    platform = "douyin"          # the shop's platform (shop ids are per platform)
    shop_id = "S1001"
    version = "2026-12-01"
    effective = 2026-12-01       # 00:00 China time; a step that began earlier uses older ones
    source = "店铺退换货承诺"      # optional
    description = "..."          # optional

    [[rule]]
    kind = "any"                 # a Kind, or "any"
    step = "merchant_response"
    duration = "24h"             # shorter than (or equal to) the platform rule's
    reminders = ["2h"]           # optional: else the platform rule's that still fit
    note = "..."                 # optional

A shop rule only shortens a deadline: who acts, the action on timeout and the anchor stay
the platform rule's. It may never be looser than the platform rule in force at any time
of the shop version's life (checked at load: a looser one stops the start, naming file
and line). Comparing: fixed durations by length; working days by count; a fixed duration
of at most N days is never looser than N working days; a working-day count against a
fixed platform duration cannot be guaranteed and is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from shared.domain.durations import Duration
from shared.domain.errors import RuleFileError
from shared.domain.flows import FLOWS
from shared.domain.model import Kind
from shared.domain.timeutil import CHINA_TZ, as_utc
from shared.domain.tomlfiles import header_lines, key_line

SHOP_SET_PREFIX = "shop"
_HEADER_KEYS = {"platform", "shop_id", "version", "effective", "source", "description"}
_RULE_KEYS = {"kind", "step", "duration", "reminders", "note"}


@dataclass(frozen=True)
class ShopRule:
    kind: str  # a Kind value or "any"
    step: str
    duration: Duration
    reminders: tuple[Duration, ...] | None  # None: the platform rule's
    note: str
    line: int  # of its [[rule]] header, for errors found after parsing


@dataclass(frozen=True)
class ShopPolicyVersion:
    platform: str
    shop_id: str
    version: str
    effective: date
    source_file: str
    rules: tuple[ShopRule, ...]
    source: str = ""
    description: str = ""
    origin: str = "shipped"

    @property
    def set_name(self) -> str:
        """How deadlines and decisions name it (`rule.set`)."""
        return f"{SHOP_SET_PREFIX}:{self.platform}:{self.shop_id}"

    @property
    def effective_at(self) -> datetime:
        return as_utc(datetime(self.effective.year, self.effective.month, self.effective.day,
                               tzinfo=CHINA_TZ))

    def find(self, kind: Kind, step: str) -> ShopRule | None:
        exact = [r for r in self.rules if r.kind == kind.value and r.step == step]
        general = [r for r in self.rules if r.kind == "any" and r.step == step]
        found = exact or general
        return found[0] if found else None


def not_looser(shop: Duration, platform: Duration) -> bool:
    if shop.is_fixed and platform.is_fixed:
        return shop.as_timedelta() <= platform.as_timedelta()
    if not shop.is_fixed and not platform.is_fixed:
        return shop.amount <= platform.amount
    if shop.is_fixed:  # N working days always span at least N calendar days
        return shop.as_timedelta() <= timedelta(days=platform.amount)
    return False  # working days against a fixed length: may span longer (Spring Festival)


def parse_shop_policy(path: Path, text: str, doc: Mapping[str, Any],
                      origin: str) -> ShopPolicyVersion:
    rule_lines = header_lines(text, "[[rule]]")

    def fail(reason: str, key: str | None = None, index: int | None = None) -> NoReturn:
        start = rule_lines[index] if index is not None and index < len(rule_lines) else 1
        end = rule_lines[index + 1] if index is not None and index + 1 < len(rule_lines) \
            else None
        line = key_line(text, key, start, end) if key else None
        raise RuleFileError(path, line or (start if index is not None else None), reason)

    unknown = set(doc) - {"shop_policy", "rule"}
    if unknown:
        fail(f"unknown top-level keys {sorted(unknown)}", key=sorted(unknown)[0])
    header = doc["shop_policy"]
    if not isinstance(header, Mapping):
        fail("[shop_policy] must be a table")
    for key in sorted(set(header) - _HEADER_KEYS):
        fail(f"unknown key {key!r} in [shop_policy]", key=key)
    for key in ("platform", "shop_id", "version"):
        if not isinstance(header.get(key), str) or not header[key]:
            fail(f"[shop_policy] {key} must be a non-empty string", key=key)
    if type(header.get("effective")) is not date:
        fail("[shop_policy] effective must be a date like 2026-12-01", key="effective")
    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list) or not raw_rules:
        fail("no [[rule]] tables")
    rules = []
    seen: set[tuple[str, str]] = set()
    for i, raw in enumerate(raw_rules):
        for key in sorted(set(raw) - _RULE_KEYS):
            fail(f"unknown key {key!r} in a shop rule (a shop may only shorten a deadline: "
                 f"{sorted(_RULE_KEYS)})", key=key, index=i)
        for key in ("kind", "step", "duration"):
            if key not in raw:
                fail(f"shop rule is missing {key!r}", index=i)
        kind, step = raw["kind"], raw["step"]
        kinds = list(Kind) if kind == "any" else [k for k in Kind if k.value == kind]
        if not kinds:
            fail(f"unknown kind {kind!r}", key="kind", index=i)
        if not any(step in FLOWS[k].steps for k in kinds):
            fail(f"kind {kind} has no step {step!r}", key="step", index=i)
        if (kind, step) in seen:
            fail(f"a second shop rule for kind {kind}, step {step}", key="step", index=i)
        seen.add((kind, step))
        try:
            duration = Duration.parse(raw["duration"])
        except (ValueError, TypeError) as exc:
            fail(str(exc), key="duration", index=i)
        try:
            reminders = None if "reminders" not in raw else tuple(
                Duration.parse(r) for r in raw["reminders"])
        except (ValueError, TypeError) as exc:
            # its own line: every parse error says "bad duration", also a reminder's
            fail(str(exc), key="reminders", index=i)
        if reminders and any(not r.is_fixed or r.is_zero for r in reminders):
            fail("reminder offsets must be positive m/h/d durations", key="reminders", index=i)
        rules.append(ShopRule(kind, step, duration, reminders, str(raw.get("note", "")),
                              rule_lines[i] if i < len(rule_lines) else 1))
    return ShopPolicyVersion(
        platform=header["platform"], shop_id=header["shop_id"], version=header["version"],
        effective=header["effective"], source_file=str(path), rules=tuple(rules),
        source=str(header.get("source", "")), description=str(header.get("description", "")),
        origin=origin,
    )
