"""Rule sets: versioned data files that say, per (kind, step), who must act, by when, what
happens on timeout and when to remind.

A rule-set file (TOML) holds one version of one set:

    [ruleset]
    name = "kuaishou"            # matched against Event.platform; "default" is the fallback
    version = "2022-09-30"
    effective = 2022-09-30       # 00:00 China time; a step that began earlier uses older rules
    source = "seed 004"          # optional
    description = "..."          # optional

    [[rule]]
    id = "exchange.merchant_response"
    kind = "exchange"            # a Kind, or "any" for every kind that has the step
    step = "merchant_response"
    party = "merchant"           # who must act
    duration = "48h"             # m / h / d (calendar days) / wd (working days); "0h" = immediate
    on_timeout = "auto_approve"  # see flows.DECISION_OF_ACTION and the step's allowed actions
    reminders = ["24h", "2h"]    # optional: before the deadline (m / h / d)
    anchor = "step_start"        # optional: or "visit_at" / "visit_until" (agreed visit slot)
    note = "..."                 # optional

Versions of a set accumulate: for a step that began at time t, the rule is the one from
the newest version of the set effective at t that has a rule for (kind, step) (a rule for
the exact kind wins over an "any" rule of the same version). So a later file may add or
replace rules without repeating the others. If the platform's set has no rule for the
step, the `default` set's applies.

The shipped sets (`shared/rules/`) are always loaded; the user's files (`AFTERSALES_RULES`,
a file or folder) are laid over them: a version adds to its set, or replaces the shipped
version of the same name and version (`RuleSetVersion.overrides` names the file it
replaced, `aftersales rules list` shows it). A shipped set is never dropped.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import date, datetime
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

from shared.domain.durations import Duration
from shared.domain.errors import RuleFileError
from shared.domain.flows import DECISION_OF_ACTION, FLOWS, timed_steps
from shared.domain.model import Case, Event, Kind, Party, RuleRef
from shared.domain.shops import (
    SHOP_SET_PREFIX,
    ShopPolicyVersion,
    ShopRule,
    not_looser,
    parse_shop_policy,
)
from shared.domain.timeutil import CHINA_TZ, as_utc, parse_moment
from shared.domain.tomlfiles import header_lines, key_line, toml_error_line

DEFAULT_SET = "default"
ANY_KIND = "any"
# In a shop variant's rule id: the kind its shop rule is for (not allowed in rule ids).
SHOP_KIND_MARK = "#"
STEP_START = "step_start"
# anchors other than the step start: the case.data key holding the moment, and where it exists
ANCHOR_STEPS: Mapping[str, frozenset[str]] = {
    "visit_at": frozenset({"visit_scheduled"}),
    # the end of the agreed visit slot (repair.scheduled's visit_until; else its visit_at)
    "visit_until": frozenset({"visit_scheduled"}),
}

_RULESET_KEYS = {"name", "version", "effective", "source", "description",
                 "rejection_needs_evidence", "after_sales_window", "applies_to_running"}
_RULE_REQUIRED = {"id", "kind", "step", "party", "duration", "on_timeout"}
_RULE_OPTIONAL = {"reminders", "anchor", "note", "sourced"}
SOURCED_FIELDS = ("party", "duration", "on_timeout", "reminders")


@dataclass(frozen=True)
class Rule:
    set_name: str
    version: str
    id: str
    kind: str  # a Kind value or "any"
    step: str
    party: Party
    duration: Duration
    on_timeout: str
    reminders: tuple[Duration, ...] = ()
    anchor: str = STEP_START
    note: str = ""
    # which of its values the platform published (a seed says so); the others are ours
    sourced: tuple[str, ...] = ()

    @property
    def ref(self) -> RuleRef:
        return RuleRef(self.set_name, self.version, self.id)

    @property
    def decision_type(self) -> str:
        return DECISION_OF_ACTION[self.on_timeout]

    @property
    def is_immediate(self) -> bool:
        return self.duration.is_zero and self.anchor == STEP_START


@dataclass(frozen=True)
class RuleSetVersion:
    name: str
    version: str
    effective: date
    source_file: str
    rules: tuple[Rule, ...]
    description: str = ""
    source: str = ""
    origin: str = "shipped"  # shipped | user (AFTERSALES_RULES)
    overrides: str = ""  # the shipped file a user version of the same name and version replaced
    # set-wide options (None = not said here: an older version's, else the default set's)
    rejection_needs_evidence: bool | None = None  # seed 004: 商户需上传驳回凭证
    after_sales_window: Duration | None = None  # seed 000: 购买商品后7天内可以申请售后服务
    # true: from its effective date it also governs steps that began earlier and still run
    applies_to_running: bool = False

    # Cached: the engine asks for these on every event and every fired deadline.
    @cached_property
    def effective_at(self) -> datetime:
        return as_utc(datetime(self.effective.year, self.effective.month, self.effective.day,
                               tzinfo=CHINA_TZ))

    @cached_property
    def _by_kind_step(self) -> dict[tuple[str, str], Rule]:
        found: dict[tuple[str, str], Rule] = {}
        for rule in self.rules:  # the first rule of a (kind, step) is the one in force
            found.setdefault((rule.kind, rule.step), rule)
        return found

    @cached_property
    def by_id(self) -> dict[str, Rule]:
        found: dict[str, Rule] = {}
        for rule in self.rules:
            found.setdefault(rule.id, rule)
        return found

    def find(self, kind: Kind, step: str) -> Rule | None:
        """The rule for this kind and step, else the set's rule for any kind."""
        return (self._by_kind_step.get((kind.value, step))
                or self._by_kind_step.get((ANY_KIND, step)))


class RuleBook:
    def __init__(self, versions: Iterable[RuleSetVersion],
                 shops: Iterable[ShopPolicyVersion] = ()) -> None:
        self._sets: dict[str, list[RuleSetVersion]] = {}
        for version in versions:
            self._sets.setdefault(version.name, []).append(version)
        for history in self._sets.values():
            history.sort(key=lambda v: v.effective)
        self._shops: dict[str, list[ShopPolicyVersion]] = {}
        for policy in shops:
            self._shops.setdefault(policy.set_name, []).append(policy)
        for shop_history in self._shops.values():
            shop_history.sort(key=lambda v: v.effective)
        # `get` runs for every deadline a case holds: a lookup, not a scan of the sets.
        # The first version of a name and version number is the one `get` answers with.
        self._versions: dict[tuple[str, str], RuleSetVersion] = {}
        for history in self._sets.values():
            for version in history:
                self._versions.setdefault((version.name, version.version), version)

    @classmethod
    def load(cls, path: Path | None = None, *more: Path) -> RuleBook:
        """The shipped sets, with the sets in `path` (a file or folder of *.toml, the
        user's `AFTERSALES_RULES`) laid over them: a user version adds to its set, or
        replaces the shipped version of the same name and version (recorded in
        `overrides`). A shipped set is never dropped. `more` are laid over in turn (a
        proposed file, for `aftersales rules what-if`)."""
        versions, shops = load_files(shipped_files(), "shipped")
        for layer in (p for p in (path, *more) if p is not None):
            user_versions, user_shops = load_files(user_files(Path(layer)), "user")
            versions = overlay(versions, user_versions)
            shops = list({(policy.set_name, policy.version): policy
                          for policy in [*shops, *user_shops]}.values())
        book = cls(versions, shops)
        book._check_default_covers_every_step()
        book._check_shops_never_looser()
        return book

    def running_switch(self, platform: str, kind: Kind, step: str, started_at: datetime,
                       current: RuleRef | None, until: datetime,
                       shop: str | None = None) -> tuple[Rule, datetime] | None:
        """A version that says it applies to running steps and took effect after this
        step began (by `until`): its rule, and when it took effect. None if the step keeps
        the version in force when it began."""
        moments = sorted({v.effective_at for name in (platform, DEFAULT_SET)
                          for v in self._sets.get(name, [])
                          if v.applies_to_running and started_at < v.effective_at <= until},
                         reverse=True)
        for moment in moments:
            rule = self.rule_for(platform, kind, step, moment, shop)
            if rule is None:
                continue
            if rule.ref == current:
                # Already on the newest running version's rule: an older moment's rule
                # must not take the step back (the timer runs this at every start).
                return None
            named = shortened_rule(rule.ref)
            base = self.get(named[0]) if named is not None else rule
            if base is None:
                continue
            version = next((v for v in self._sets.get(base.set_name, [])
                            if v.version == base.version), None)
            if version is not None and version.applies_to_running \
                    and version.effective_at == moment:
                return rule, moment
        return None

    @property
    def switch_moments(self) -> list[datetime]:
        """When versions that apply to running steps take effect (for the timer)."""
        return sorted({v.effective_at for history in self._sets.values() for v in history
                       if v.applies_to_running})

    def option(self, platform: str, name: str, at: datetime) -> Any:
        """A set-wide option in force at `at`: the newest version of the platform's set
        effective then that says it, else the default set's; None if nobody says."""
        for set_name in (platform, DEFAULT_SET):
            for version in reversed(self._sets.get(set_name, [])):
                value = getattr(version, name)
                if version.effective_at <= at and value is not None:
                    return value
        return None

    def refusal(self, case: Case, event: Event) -> str | None:
        """Why the rules in force refuse an event that the flow would take, or None.
        A rejection without evidence where the set requires it (seed 004) does not fit:
        the merchant's step goes on."""
        if event.type == "merchant.rejected" and not event.data.get("evidence") and \
                self.option(case.platform, "rejection_needs_evidence", case.step_started_at):
            return ("out_of_state: merchant.rejected without evidence: the "
                    f"{case.platform} rules require the merchant to upload rejection "
                    "evidence (驳回凭证); the merchant's step goes on")
        return None

    def window_flag(self, platform: str, data: Mapping[str, Any], at: datetime
                    ) -> dict[str, Any] | None:
        """A request made after the set's after-sales window (counted from
        `data.purchased_at`) is flagged, not refused: the platform accepted it."""
        window = self.option(platform, "after_sales_window", at)
        purchased = parse_moment(data.get("purchased_at"))
        if window is None or purchased is None or at <= purchased + window.as_timedelta():
            return None
        return {"window": window.text, "purchased_at": purchased.isoformat(),
                "late_by_s": int((at - purchased - window.as_timedelta()).total_seconds())}

    @property
    def shop_policies(self) -> list[ShopPolicyVersion]:
        return [v for name in sorted(self._shops) for v in self._shops[name]]

    @property
    def set_names(self) -> list[str]:
        return sorted(self._sets, key=lambda n: (n != DEFAULT_SET, n))

    def versions(self, name: str) -> list[RuleSetVersion]:
        return list(self._sets.get(name, []))

    def rule_for(self, platform: str, kind: Kind, step: str, at: datetime,
                 shop: str | None = None) -> Rule | None:
        """The rule in force at `at` (when the step began) for this platform's case; a
        shop's own policy in force then shortens it (`shop` = the case's shop_id)."""
        rule = self._platform_rule(platform, kind, step, at)
        if rule is None or shop is None:
            return rule
        history = self._shops.get(f"{SHOP_SET_PREFIX}:{platform}:{shop}", [])
        for policy in reversed(history):
            if policy.effective_at <= at:
                shop_rule = policy.find(kind, step)
                return rule if shop_rule is None else _shop_variant(rule, policy, shop_rule)
        return rule

    def _platform_rule(self, platform: str, kind: Kind, step: str, at: datetime
                       ) -> Rule | None:
        for name in (platform, DEFAULT_SET):
            for version in reversed(self._sets.get(name, [])):
                if version.effective_at > at:
                    continue
                rule = version.find(kind, step)
                if rule is not None:
                    return rule
        return None

    def get(self, ref: RuleRef) -> Rule | None:
        if ref.set.startswith(f"{SHOP_SET_PREFIX}:"):
            return self._get_shop_variant(ref)
        version = self._versions.get((ref.set, ref.version))
        return None if version is None else version.by_id.get(ref.id)

    def _get_shop_variant(self, ref: RuleRef) -> Rule | None:
        """A shop rule's id names the platform rule it shortens: set/version/id, and
        `#kind` when the shop's rule is for one kind of a general platform rule."""
        named = shortened_rule(ref)
        policy = next((p for p in self._shops.get(ref.set, []) if p.version == ref.version),
                      None)
        if named is None or policy is None:
            return None
        platform_ref, kind_name = named
        base = self.get(platform_ref)
        if base is None:
            return None
        if kind_name:
            candidates = [r for r in policy.rules if r.kind == kind_name and r.step == base.step]
        elif base.kind == ANY_KIND:
            # The shop's general rule; a reference written before the kind mark may also
            # name one kind's rule: then the first kind the shop shortens.
            candidates = [r for r in policy.rules if r.kind == ANY_KIND and r.step == base.step]
            candidates += [r for k in Kind if (r := policy.find(k, base.step)) is not None]
        else:
            candidates = [r for r in [policy.find(Kind(base.kind), base.step)] if r is not None]
        return _shop_variant(base, policy, candidates[0]) if candidates else None

    def _check_shops_never_looser(self) -> None:
        """A shop may promise less time than its platform, never more: checked against
        every platform rule that can be in force during the shop version's life."""
        for history in self._shops.values():
            for i, policy in enumerate(history):
                until = history[i + 1].effective_at if i + 1 < len(history) else None
                moments = {policy.effective_at} | {
                    v.effective_at for name in (policy.platform, DEFAULT_SET)
                    for v in self._sets.get(name, [])
                    if v.effective_at > policy.effective_at
                    and (until is None or v.effective_at < until)}
                for shop_rule in policy.rules:
                    kinds = list(Kind) if shop_rule.kind == ANY_KIND else [Kind(shop_rule.kind)]
                    for kind in kinds:
                        if shop_rule.step not in FLOWS[kind].steps:
                            continue
                        for at in sorted(moments):
                            base = self._platform_rule(policy.platform, kind, shop_rule.step, at)
                            if base is not None and not not_looser(shop_rule.duration,
                                                                   base.duration):
                                raise RuleFileError(
                                    policy.source_file, shop_rule.line,
                                    f"shop {policy.shop_id} promises {shop_rule.duration.text} "
                                    f"for {kind.value} step {shop_rule.step}, looser than the "
                                    f"platform rule {base.set_name}/{base.version}/{base.id} "
                                    f"({base.duration.text}): a shop may only shorten it")

    def _check_default_covers_every_step(self) -> None:
        defaults = self._sets.get(DEFAULT_SET)
        if not defaults:
            raise RuleFileError(
                "shared/rules", None, f'no rule set named "{DEFAULT_SET}": it is the fallback '
                "for every step the platform sets leave open"
            )
        for kind in Kind:
            for step in timed_steps(kind):
                if not any(v.find(kind, step) for v in defaults):
                    raise RuleFileError(
                        defaults[0].source_file, None,
                        f'the "{DEFAULT_SET}" set has no rule for kind {kind.value}, step {step}',
                    )


def shortened_rule(ref: RuleRef) -> tuple[RuleRef, str] | None:
    """For a shop variant's reference, the platform rule it shortens and the kind its
    shop rule is for ("" for all kinds); None for any other reference. The variant's id is
    `set/version/id`, and `#kind` after it (`_shop_variant`)."""
    if not ref.set.startswith(f"{SHOP_SET_PREFIX}:"):
        return None
    named, _, kind_name = ref.id.partition(SHOP_KIND_MARK)
    parts = named.split("/", 2)
    return (RuleRef(*parts), kind_name) if len(parts) == 3 else None


def _read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleFileError(path, None, f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:  # saved as GBK, say: name the file, not a traceback
        raise RuleFileError(path, None, f"not UTF-8 text (byte {exc.start}): save the file "
                            "as UTF-8") from exc
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line, reason = toml_error_line(exc, text)
        raise RuleFileError(path, line, f"not valid TOML: {reason}") from exc


class _RuleFileParser:
    """Checks a parsed rule file; every complaint names the file and the offending line."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.text = text
        self.rule_lines = header_lines(text, "[[rule]]")

    def fail(self, reason: str, key: str | None = None, rule_index: int | None = None) -> NoReturn:
        start, end = 1, None
        if rule_index is not None and rule_index < len(self.rule_lines):
            start = self.rule_lines[rule_index]
            if rule_index + 1 < len(self.rule_lines):
                end = self.rule_lines[rule_index + 1]
        line = key_line(self.text, key, start, end) if key else None
        raise RuleFileError(self.path, line or (start if rule_index is not None else None), reason)

    def parse(self, doc: Mapping[str, Any]) -> RuleSetVersion:
        unknown = set(doc) - {"ruleset", "rule"}
        if unknown:
            self.fail(f"unknown top-level keys {sorted(unknown)}", key=sorted(unknown)[0])
        header = doc.get("ruleset")
        if not isinstance(header, Mapping):
            self.fail("missing the [ruleset] table (name, version, effective)")
        for key in sorted(set(header) - _RULESET_KEYS):
            self.fail(f"unknown key {key!r} in [ruleset]", key=key)
        for key in ("name", "version"):
            if not isinstance(header.get(key), str) or not header[key]:
                self.fail(f"[ruleset] {key} must be a non-empty string", key=key)
        effective = header.get("effective")
        if type(effective) is not date:
            self.fail("[ruleset] effective must be a date like 2022-09-30", key="effective")
        needs_evidence = header.get("rejection_needs_evidence")
        if needs_evidence is not None and not isinstance(needs_evidence, bool):
            self.fail("[ruleset] rejection_needs_evidence must be true or false",
                      key="rejection_needs_evidence")
        window = header.get("after_sales_window")
        window_duration = None
        if window is not None:
            try:
                window_duration = Duration.parse(window)
            except ValueError as exc:
                self.fail(str(exc), key="after_sales_window")
            if not window_duration.is_fixed:
                self.fail("[ruleset] after_sales_window must be in m/h/d", key="after_sales_window")
        running = header.get("applies_to_running", False)
        if not isinstance(running, bool):
            self.fail("[ruleset] applies_to_running must be true or false",
                      key="applies_to_running")
        raw_rules = doc.get("rule", [])
        if not isinstance(raw_rules, list) or not raw_rules:
            self.fail("no [[rule]] tables")
        rules = [self._rule(header["name"], header["version"], i, raw)
                 for i, raw in enumerate(raw_rules)]
        self._check_duplicates(rules)
        return RuleSetVersion(
            name=header["name"], version=header["version"], effective=effective,
            source_file=str(self.path), rules=tuple(rules),
            description=str(header.get("description", "")), source=str(header.get("source", "")),
            rejection_needs_evidence=needs_evidence, after_sales_window=window_duration,
            applies_to_running=running,
        )

    def _rule(self, set_name: str, version: str, i: int, raw: Mapping[str, Any]) -> Rule:
        missing = _RULE_REQUIRED - set(raw)
        if missing:
            self.fail(f"rule is missing {sorted(missing)}", rule_index=i)
        for key in sorted(set(raw) - _RULE_REQUIRED - _RULE_OPTIONAL):
            self.fail(f"unknown key {key!r} in rule {raw.get('id')!r}", key=key, rule_index=i)
        rule_id = raw["id"]
        if SHOP_KIND_MARK in str(rule_id):
            self.fail(f"rule id {rule_id!r} may not contain {SHOP_KIND_MARK!r}", key="id",
                      rule_index=i)
        kind, step = raw["kind"], raw["step"]
        kinds = [k for k in Kind if k.value == kind] if kind != ANY_KIND else list(Kind)
        if not kinds:
            self.fail(f"rule {rule_id!r}: unknown kind {kind!r} (one of "
                      f"{[k.value for k in Kind] + [ANY_KIND]})", key="kind", rule_index=i)
        having_step = [k for k in kinds if step in FLOWS[k].steps]
        if not having_step:
            self.fail(f"rule {rule_id!r}: kind {kind} has no step {step!r}", key="step",
                      rule_index=i)
        if raw["party"] not in {p.value for p in Party}:
            self.fail(f"rule {rule_id!r}: unknown party {raw['party']!r}", key="party",
                      rule_index=i)
        duration = self._duration(raw["duration"], "duration", i)
        action = raw["on_timeout"]
        for k in having_step:
            allowed = FLOWS[k].steps[step].allowed_actions
            if action not in allowed:
                self.fail(f"rule {rule_id!r}: unknown action {action!r} for step {step} of "
                          f"{k.value} (allowed: {sorted(allowed)})", key="on_timeout",
                          rule_index=i)
        reminders = raw.get("reminders", [])
        if not isinstance(reminders, list):
            self.fail(f"rule {rule_id!r}: reminders must be a list", key="reminders",
                      rule_index=i)
        offsets = tuple(self._duration(r, "reminders", i) for r in reminders)
        if any(not o.is_fixed or o.is_zero for o in offsets):
            self.fail(f"rule {rule_id!r}: reminder offsets must be positive m/h/d durations",
                      key="reminders", rule_index=i)
        anchor = raw.get("anchor", STEP_START)
        if anchor != STEP_START and step not in ANCHOR_STEPS.get(anchor, frozenset()):
            self.fail(f"rule {rule_id!r}: anchor {anchor!r} is not available for step {step}",
                      key="anchor", rule_index=i)
        sourced = raw.get("sourced", [])
        if not isinstance(sourced, list) or any(f not in SOURCED_FIELDS for f in sourced):
            self.fail(f"rule {rule_id!r}: sourced lists the values a platform published, "
                      f"among {list(SOURCED_FIELDS)}", key="sourced", rule_index=i)
        return Rule(set_name, version, str(rule_id), kind, step, Party(raw["party"]), duration,
                    action, offsets, anchor, str(raw.get("note", "")), tuple(sourced))

    def _duration(self, value: object, key: str, i: int) -> Duration:
        try:
            return Duration.parse(value)  # type: ignore[arg-type]
        except ValueError as exc:
            self.fail(str(exc), key=key, rule_index=i)

    def _check_duplicates(self, rules: list[Rule]) -> None:
        seen_ids: set[str] = set()
        seen_steps: set[tuple[str, str]] = set()
        for i, rule in enumerate(rules):
            if rule.id in seen_ids:
                self.fail(f"duplicate rule id {rule.id!r}", key="id", rule_index=i)
            if (rule.kind, rule.step) in seen_steps:
                self.fail(f"a second rule for kind {rule.kind}, step {rule.step}", key="step",
                          rule_index=i)
            seen_ids.add(rule.id)
            seen_steps.add((rule.kind, rule.step))


def shipped_files() -> list[Path]:
    folder = resources.files("shared.rules")
    return sorted((Path(str(f)) for f in folder.iterdir() if f.name.endswith(".toml")),
                  key=lambda p: p.name)


def user_files(path: Path) -> list[Path]:
    files = sorted(path.rglob("*.toml")) if path.is_dir() else [path]
    if path.is_dir() and not files:
        raise RuleFileError(path, None, "no rule files (*.toml) found")
    return files


def load_files(files: list[Path], origin: str
               ) -> tuple[list[RuleSetVersion], list[ShopPolicyVersion]]:
    """Rule-set versions and shop policies (told apart by their header table)."""
    versions, shops = [], []
    for f in files:
        text, doc = _read_toml(f)
        if "shop_policy" in doc:
            shops.append(parse_shop_policy(f, text, doc, origin))
        else:
            versions.append(replace(_RuleFileParser(f, text).parse(doc), origin=origin))
    _check_unique_versions(versions)
    seen: dict[tuple[str, str], str] = {}
    for p in shops:
        other = seen.setdefault((p.set_name, p.version), p.source_file)
        if other != p.source_file:
            raise RuleFileError(p.source_file, None, f"shop policy {p.set_name} version "
                                f"{p.version} is also defined in {other}")
    return versions, shops


def _shop_variant(base: Rule, policy: ShopPolicyVersion, shop_rule: ShopRule) -> Rule:
    """The platform rule with the shop's shorter duration (and its reminders, or the
    platform's that still fall inside the shorter deadline)."""
    reminders = shop_rule.reminders if shop_rule.reminders is not None else tuple(
        r for r in base.reminders
        if not shop_rule.duration.is_fixed or r.as_timedelta() < shop_rule.duration.as_timedelta())
    rule_id = f"{base.set_name}/{base.version}/{base.id}"
    if base.kind == ANY_KIND and shop_rule.kind != ANY_KIND:
        # The shop's rule for one kind beside, maybe, its general one for the same step:
        # the reference names the kind, or it would be found again as the general one.
        rule_id += f"{SHOP_KIND_MARK}{shop_rule.kind}"
    return Rule(policy.set_name, policy.version, rule_id,
                base.kind, base.step, base.party, shop_rule.duration, base.on_timeout,
                reminders, base.anchor, shop_rule.note or f"shop policy of {policy.shop_id}")


def overlay(shipped: list[RuleSetVersion], user: list[RuleSetVersion]) -> list[RuleSetVersion]:
    """The shipped versions with the user's laid over them, by (name, version)."""
    merged = {(v.name, v.version): v for v in shipped}
    for v in user:
        replaced = merged.get((v.name, v.version))
        merged[(v.name, v.version)] = replace(
            v, overrides=replaced.source_file if replaced is not None else "")
    return list(merged.values())


def _check_unique_versions(versions: list[RuleSetVersion]) -> None:
    seen: dict[tuple[str, str], str] = {}
    for v in versions:
        other = seen.setdefault((v.name, v.version), v.source_file)
        if other != v.source_file:
            raise RuleFileError(v.source_file, None,
                                f"set {v.name} version {v.version} is also defined in {other}")
