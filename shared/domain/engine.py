"""The engine: for a case and an event (or a deadline that came due) it computes the new
state, the full set of deadlines the state requires, and the decisions and notices.

Pure: no I/O, no clock of its own (`now` is passed in), deterministic.

Times used (event time, docs/design.md "Event time"):
- a case is a fold of its facts in event-time order. A fact is an event, placed at its
  `occurred_at` (ties: opening events first, then by event_id), or the expiry of a step's
  deadline, placed at its `deadline_at`;
- an event at exactly its step's deadline is in time: the deadline fires before an event
  only when it lies strictly before the event's `occurred_at`. So `apply` first fires the
  deadlines that passed before the event happened (however late the timer is), then
  applies the event to the state they left;
- an event that happened before facts already folded (it reached us late) cannot be
  applied on top: `needs_replay` says so and `replay` rebuilds the case from its whole
  log; the difference against what was published is new decisions and superseded ones;
- an event takes effect at its `occurred_at`, but never before the current step began
  (a skewed clock cannot make a step end before it started);
- a deadline takes effect at its `deadline_at` (the platform acts at its deadline, however
  late the timer fired), so the next step's clock starts there;
- `now` only decides which reminders are still in the future and stamps `decided_at`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from shared.domain.calendar import (
    CALENDAR_KEY,
    WorkCalendar,
    calendar_record,
    deadline_calendar,
)
from shared.domain.flows import (
    AFTER_REJECTION,
    CLOSED_STEP,
    DECISION_OF_ACTION,
    ESCALATE,
    FLOWS,
    INTERVENTION,
    INTERVENTION_OUTCOMES,
    NOT_CANCELLABLE,
    REFUND_PENDING,
    REMIND,
    Close,
    Go,
    Stay,
    opening_events,
    step_def,
)
from shared.domain.model import (
    CLOSED,
    OPEN,
    SUPERSEDED,
    Case,
    DeadlineSpec,
    Decision,
    Event,
    Kind,
    Notice,
    Outcome,
    Party,
    RuleRef,
    StepResult,
    decision_id,
    evolve,
)
from shared.domain.money import voucher_refund_fen
from shared.domain.ratings import RATED, rate
from shared.domain.rules import STEP_START, Rule, RuleBook
from shared.domain.timeutil import as_utc, local_text, parse_moment

# A reminder with less lead time than this cannot wait out a night of quiet hours.
URGENT_REMINDER_LEAD = timedelta(hours=12)
MAX_IMMEDIATE_CHAIN = 8  # immediate ("0h") steps entering immediate steps: a rule-file loop guard

# Who hears of an applied event (decisions and reminders have their own notices).
EVENT_AUDIENCE: Mapping[str, tuple[Party, ...]] = {
    "case.opened": (Party.merchant,),
    "voucher.expired": (Party.buyer,),
    "merchant.approved": (Party.buyer,),
    "merchant.rejected": (Party.buyer,),
    "merchant.received": (Party.buyer,),
    "merchant.inspected": (Party.buyer,),
    "merchant.reshipped": (Party.buyer,),
    "buyer.received": (Party.merchant,),
    "merchant.refused_repair": (Party.buyer,),
    "buyer.shipped": (Party.merchant,),
    "buyer.confirmed": (Party.merchant,),
    "buyer.cancelled": (Party.merchant,),
    "buyer.modified": (Party.merchant,),
    "repair.scheduled": (Party.buyer, Party.merchant),
    "repair.completed": (Party.buyer,),
    "intervention.requested": (Party.buyer, Party.merchant),
    "intervention.resolved": (Party.buyer, Party.merchant),
    "refund.completed": (Party.buyer,),
}

# Facts an event leaves in case.data: event data key -> case.data key.
EVENT_FACTS: Mapping[str, Mapping[str, str]] = {
    "merchant.rejected": {"reason": "rejection_reason", "evidence": "rejection_evidence"},
    "merchant.inspected": {"passed": "inspection_passed", "reason": "inspection_reason",
                           "evidence": "inspection_evidence"},
    "merchant.reshipped": {"carrier": "reship_carrier", "tracking_no": "reship_tracking_no"},
    "merchant.refused_repair": {"reason": "refusal_reason"},
    "buyer.shipped": {"carrier": "return_carrier", "tracking_no": "return_tracking_no"},
    "buyer.modified": {"reason": "reason", "evidence": "evidence"},
    "buyer.cancelled": {"reason": "cancel_reason"},
    "intervention.requested": {"requested_by": "intervention_requested_by",
                               "reason": "intervention_reason"},
    "intervention.resolved": {"outcome": "intervention_outcome"},
}
OPENING_FACTS = ("reason", "evidence", "voucher_total_count", "voucher_used_count", "used_fen",
                 "purchased_at")


# Bookkeeping the engine keeps in case.data (see docs/design.md "Event time").
FACTS_UNTIL = "facts_until"  # the latest fact folded: event occurred_at or deadline_at
TIMER_UNTIL = "timer_until"  # the latest deadline the timer fired: the clock passed it
DECIDED = "decided"  # automatic decisions in force: key -> {id, type, step, due_at, party, rule}
WITHDRAWN = "withdrawn"  # key -> how often a decision of that key was superseded
BOOKKEEPING = (FACTS_UNTIL, TIMER_UNTIL, DECIDED, WITHDRAWN)
MAX_CATCH_UP = 64  # deadlines fired before one event: a guard against a rule-file loop


def decision_key(case_id: str, step: str, fence: int, purpose: str, deadline_at: datetime,
                 remind_at: datetime | None = None) -> str:
    """Stable id of a decision: the same missed deadline (or reminder) gives the same key.

    The fence is not part of the key: a case rebuilt in event time numbers its versions
    differently, and its decisions must keep their ids (the parameter stays for callers
    that describe a deadline row)."""
    del fence
    key = f"{case_id}:{step}:{purpose}:{deadline_at.isoformat()}"
    return key if remind_at is None else f"{key}:{remind_at.isoformat()}"


def fact_order(event: Event) -> tuple[datetime, int, str]:
    """Where an event stands on the case's timeline: by occurred_at; at the same instant
    an opening event first, then by event_id (any stable key gives the same outcome
    whatever the arrival order)."""
    return (as_utc(event.occurred_at), 0 if event.type in opening_events() else 1,
            event.event_id)


def facts_of(case: Case | None) -> dict[str, Any] | None:
    """What a case says about the world: its state without the version (a rebuilt case
    counts its versions differently) and without the engine's bookkeeping. Two arrival
    orders of the same facts give equal `facts_of`."""
    if case is None:
        return None
    state = case.to_dict()
    del state["version"]
    state["data"] = {k: v for k, v in state["data"].items() if k not in BOOKKEEPING}
    return state


def _moment(case: Case, key: str) -> datetime | None:
    return parse_moment(case.data.get(key))


def _noted(case: Case, key: str, at: datetime) -> Case:
    """The case with bookkeeping time `key` moved forward to `at` (never back)."""
    known = _moment(case, key)
    if known is not None and known >= at:
        return case
    return evolve(case, data={**case.data, key: as_utc(at).isoformat()})


def _notice_key(notice: Notice) -> str | None:
    key = notice.params.get("decision_key")
    return key if isinstance(key, str) else None


def _whole_fen(value: object) -> bool:
    return type(value) is int and value >= 0


def _not_applied(case: Case | None, problem: str) -> Outcome:
    return Outcome(case=case, applied=False, problem=problem, deadlines=None)


class _Work:
    """The change being built for one outcome (the case advances one version per outcome)."""

    def __init__(self, case: Case, now: datetime) -> None:
        self.case = evolve(case, version=case.version + 1)
        self.now = now
        self.decisions: list[Decision] = []
        self.notices: list[Notice] = []
        self.steps: list[StepResult] = []

    def set_data(self, **changes: Any) -> None:
        self.case = evolve(self.case, data={**self.case.data, **changes})

    def end_step(self, met: bool, at: datetime) -> None:
        step = step_def(self.case.kind, self.case.step)
        if step is not None:
            seconds = (at - self.case.step_started_at).total_seconds()
            self.steps.append(StepResult(self.case.step, step.party.value, met, seconds))

    def close(self, resolution: str, at: datetime) -> None:
        self.case = evolve(
            self.case, status=CLOSED, step=CLOSED_STEP, resolution=resolution, closed_at=at,
            step_started_at=at, step_due_at=None, paused_remaining_s=None,
            rule_set="", rule_version="", rule_id=None,
            data={**self.case.data, "closed_at_step": self.case.step},
        )

    def notify(self, reason: str, party: Party, urgent: bool = False,
               due_at: datetime | None = None, step: str | None = None,
               **params: Any) -> None:
        """`step`: the step the notice is about (a decision: the step whose deadline was
        missed, not the one the case moved to); default the case's current step."""
        case = self.case
        due = due_at if due_at is not None else case.step_due_at
        about = step if step is not None else case.step
        self.notices.append(Notice(
            reason=reason, case_id=case.case_id, step=about, party=party.value, due_at=due,
            urgent=urgent, params={
                "kind": case.kind.value, "step": about, "order_id": case.order_id,
                "shop_id": case.shop_id, "amount_fen": case.amount_fen,
                "refund_fen": case.refund_fen,
                "due_at_local": local_text(due) if due is not None else None, **params,
            },
        ))


class Engine:
    def __init__(self, rules: RuleBook, calendar: WorkCalendar) -> None:
        self.rules = rules
        self.calendar = calendar

    # ---- the API ------------------------------------------------------------------------

    def apply(self, case: Case | None, event: Event, now: datetime) -> Outcome:
        """Apply an event that happened after every fact of the case (see `needs_replay`):
        the deadlines that passed before it happened fire first, then it applies.

        `applied` says whether the case changed (deadlines that fired count); `problem`
        and `verdicts` say what became of the event itself. An event that does not apply
        still moves the case's fact time: the case of an unapplied event is returned with
        that bookkeeping (same version) so a later-arriving earlier fact rebuilds it."""
        now = as_utc(now)
        at = as_utc(event.occurred_at)
        if case is None:
            opened = self._open(event, now)
            if opened.case is None:
                return opened
            return replace(opened, case=_noted(opened.case, FACTS_UNTIL, at),
                           verdicts={event.event_id: opened.problem})
        if event.case_id != case.case_id:
            raise ValueError(f"event {event.event_id} is for case {event.case_id}, "
                             f"not {case.case_id}")
        fired = self._catch_up(case, at, now, inclusive=False)
        current = fired[-1].case if fired else case
        assert current is not None
        single = self._apply_one(current, event, now)
        parts = [*fired, single] if single.applied else fired
        if not parts:  # nothing changed but the fact time
            return replace(single, case=_noted(case, FACTS_UNTIL, at),
                           verdicts={event.event_id: single.problem})
        final = parts[-1].case
        assert final is not None
        final = _noted(final, FACTS_UNTIL, at)
        return Outcome(
            case=final, applied=True, problem=single.problem,
            deadlines=self.deadlines_for(final, now),
            decisions=tuple(d for o in parts for d in o.decisions),
            notices=tuple(n for o in parts for n in o.notices),
            steps=tuple(s for o in parts for s in o.steps),
            verdicts={event.event_id: single.problem},
        )

    def _apply_one(self, case: Case, event: Event, now: datetime) -> Outcome:
        if event.type == RATED:  # after completion: the one event a closed case takes
            return rate(case, event, now)
        if not case.is_open:
            return _not_applied(case, f"out_of_state: the case is closed ({case.resolution}); "
                                      f"{event.type} does not apply")
        at = max(as_utc(event.occurred_at), case.step_started_at)
        handlers = {
            "buyer.cancelled": self._cancel,
            "intervention.requested": self._request_intervention,
            "intervention.resolved": self._resolve_intervention,
            "deadline.changed": self._change_deadline,
        }
        result = handlers.get(event.type, self._flow_event)(case, event, at, now)
        if isinstance(result, str):
            return _not_applied(case, result)
        return self._finish(result)

    def fire(self, case: Case, deadline: DeadlineSpec, now: datetime) -> Outcome:
        now = as_utc(now)
        if deadline.case_id != case.case_id:
            raise ValueError(f"deadline of case {deadline.case_id} fired on {case.case_id}")
        if not case.is_open:
            return _not_applied(case, f"stale: the case is closed ({case.resolution})")
        if deadline.fence != case.version or deadline.step != case.step:
            return _not_applied(case, f"stale: deadline for {deadline.step} at version "
                                      f"{deadline.fence}, case is in {case.step} at version "
                                      f"{case.version}")
        if now < deadline.due_at:
            return _not_applied(case, f"early: due at {deadline.due_at.isoformat()}")
        if deadline.purpose == "reminder":
            return self._remind(case, deadline, now)
        if deadline.purpose != "deadline":
            raise ValueError(f"unknown deadline purpose {deadline.purpose!r}")
        outcome = self._expire(case, deadline, now)
        # the timer fired it: the clock has passed this moment (a rebuild keeps that fact)
        assert outcome.case is not None
        return replace(outcome, case=_noted(outcome.case, TIMER_UNTIL, deadline.deadline_at))

    def _expire(self, case: Case, deadline: DeadlineSpec, now: datetime) -> Outcome:
        """The step's deadline passed (in event time): take its automatic action."""
        work = _Work(case, now)
        self._time_out(work, deadline.action, Party(deadline.party), deadline.rule,
                       deadline.deadline_at, deadline.fence, immediate=False)
        work.case = _noted(work.case, FACTS_UNTIL, deadline.deadline_at)
        return self._finish(work)

    def _pending_deadline(self, case: Case, now: datetime) -> DeadlineSpec | None:
        return next((d for d in self.deadlines_for(case, now) if d.purpose == "deadline"),
                    None)

    def _catch_up(self, case: Case, until: datetime, now: datetime, *,
                  inclusive: bool) -> list[Outcome]:
        """Fire, in order, the deadlines that passed before `until` in event time (also at
        `until` when `inclusive`: the timer's horizon, where the clock has passed it)."""
        fired: list[Outcome] = []
        while case.is_open and case.step_due_at is not None and (
                case.step_due_at < until or (inclusive and case.step_due_at == until)):
            if len(fired) >= MAX_CATCH_UP:
                raise RuntimeError(f"deadlines keep falling due at step {case.step} "
                                   "(check the rule files)")
            spec = self._pending_deadline(case, now)
            if spec is None:
                break
            outcome = self._expire(case, spec, now)
            assert outcome.case is not None
            fired.append(outcome)
            case = outcome.case
        return fired

    def needs_replay(self, case: Case | None, event: Event) -> bool:
        """True when the event happened at or before a fact already folded into the case:
        applying it on top would put it out of event-time order, so the case must be
        rebuilt from its log (`replay`)."""
        if case is None:
            return False
        until = _moment(case, FACTS_UNTIL)
        return until is not None and as_utc(event.occurred_at) <= until

    def replay(self, before: Case | None, log: Sequence[Event], now: datetime, *,
               arrived: Sequence[str] = ()) -> Outcome:
        """Rebuild a case from its whole log in event-time order (`fact_order`), with the
        deadlines that passed in event time (before a later event, or at or before the
        latest deadline the timer fired) fired in their place.

        `before` is the case as stored (None if never opened); `arrived` the ids of the
        events that are new to it. The outcome is the difference against `before`: the
        rebuilt case (one version past `before`, so deadlines set for it are stale), its
        deadlines, the automatic decisions `before` had not published, a
        `decision.superseded` for each published one the rebuilt history no longer
        reaches, the notices of what is new, and a verdict for every event of the log."""
        now = as_utc(now)
        facts = sorted({e.event_id: e for e in log}.values(), key=fact_order)
        verdicts: dict[str, str | None] = {}
        folded: list[tuple[Outcome, bool]] = []  # (outcome, is it news to `before`?)
        fresh = set(arrived)
        case: Case | None = None
        waiting: list[Event] = []  # events that happened before the case was opened
        for event in facts:
            if case is None:
                out = self.apply(None, event, now)
                if out.case is None:
                    waiting.append(event)
                    verdicts[event.event_id] = out.problem
                    continue
                case = out.case
                folded.append((out, event.event_id in fresh))
                verdicts[event.event_id] = None
                # like intake's parked events: they take effect as the case opens
                pending, waiting = waiting, []
                for early in pending:
                    out = self.apply(case, early, now)
                    case = out.case if out.case is not None else case
                    if out.applied:
                        folded.append((out, early.event_id in fresh))
                    verdicts[early.event_id] = out.problem
                continue
            out = self.apply(case, event, now)
            if out.case is not None:
                case = out.case
            if out.applied:
                folded.append((out, event.event_id in fresh))
            verdicts[event.event_id] = out.problem
        if case is None:
            return Outcome(case=before, applied=False,
                           problem="out_of_state: no event of the log opens the case",
                           deadlines=None, verdicts=verdicts, rebuilt=True)
        timer_until = _moment(before, TIMER_UNTIL) if before is not None else None
        if timer_until is not None:  # the clock passed these: the timer would fire them
            for out in self._catch_up(case, timer_until, now, inclusive=True):
                folded.append((out, False))
                assert out.case is not None
                case = out.case
            case = _noted(case, TIMER_UNTIL, timer_until)
        return self._difference(before, case, folded, now, verdicts, facts, fresh)

    def _difference(self, before: Case | None, case: Case, folded: list[tuple[Outcome, bool]],
                    now: datetime, verdicts: dict[str, str | None], facts: list[Event],
                    fresh: set[str]) -> Outcome:
        if before is not None:
            case = evolve(case, version=before.version + 1)
        published: Mapping[str, Mapping[str, Any]] = \
            (before.data.get(DECIDED) or {}) if before is not None else {}
        withdrawn: dict[str, int] = dict((before.data.get(WITHDRAWN) or {})
                                         if before is not None else {})
        in_force: dict[str, dict[str, Any]] = {
            k: dict(v) for k, v in (case.data.get(DECIDED) or {}).items()}
        decisions = []
        for out, _new in folded:
            for d in out.decisions:
                if d.key in published:  # still reached: it keeps the id it was published with
                    in_force[d.key]["id"] = published[d.key].get("id", decision_id(d.key))
                    continue
                if d.key in withdrawn:  # withdrawn earlier and reached again: a new id
                    d = replace(d, key=f"{d.key}:again:{withdrawn[d.key]}")
                    in_force[d.key.split(":again:")[0]]["id"] = decision_id(d.key)
                decisions.append(d)
        new_keys = {d.key.split(":again:")[0] for d in decisions}
        notices = [n for out, new in folded for n in out.notices
                   if new or (n.reason in DECISION_OF_ACTION.values()
                   and _notice_key(n) in new_keys)]
        steps = [s for out, new in folded if new for s in out.steps]
        late = [{"event_id": e.event_id, "type": e.type,
                 "occurred_at": as_utc(e.occurred_at).isoformat()}
                for e in facts if e.event_id in fresh]
        for key, record in published.items():
            if key in in_force:
                continue
            superseded = self._superseded(case, key, record, late, now,
                                          withdrawn.get(key, 0))
            withdrawn[key] = withdrawn.get(key, 0) + 1
            decisions.append(superseded)
            for party in (Party.ops, Party(record.get("party", Party.merchant.value))):
                if party != Party.platform:
                    notices.append(Notice(
                        reason=SUPERSEDED, case_id=case.case_id, step=superseded.step,
                        party=party.value, due_at=superseded.due_at, urgent=False,
                        params={"kind": case.kind.value, "step": superseded.step,
                                "missed_step": superseded.step, "next_step": case.step,
                                "next_due_at": case.step_due_at.isoformat()
                                if case.step_due_at is not None else None,
                                "superseded_type": record.get("type"),
                                "order_id": case.order_id, "shop_id": case.shop_id,
                                "amount_fen": case.amount_fen, "refund_fen": case.refund_fen,
                                "supersedes": superseded.data["supersedes"],
                                "due_at_local": local_text(superseded.due_at)}))
        case = evolve(case, data={**case.data, DECIDED: in_force, WITHDRAWN: withdrawn})
        return Outcome(
            case=case, applied=True, problem=verdicts.get(next(iter(fresh), ""), None),
            deadlines=self.deadlines_for(case, now), decisions=tuple(decisions),
            notices=tuple(notices), steps=tuple(steps), verdicts=verdicts, rebuilt=True)

    @staticmethod
    def _superseded(case: Case, key: str, record: Mapping[str, Any],
                    late: list[dict[str, str]], now: datetime, times: int) -> Decision:
        rule = record.get("rule") or ["", "", ""]
        due = parse_moment(record.get("due_at")) or now
        reason = ("late_fact: facts that reached us after this decision was published show "
                  "the deadline did not pass unmet; the case was rebuilt in event time")
        return Decision(
            type=SUPERSEDED, case_id=case.case_id, step=str(record.get("step", "")),
            rule=RuleRef(str(rule[0]), str(rule[1]), str(rule[2])), due_at=due,
            decided_at=now,
            data={"supersedes": record.get("id", decision_id(key)),
                  "superseded_type": record.get("type"),
                  "reason": reason, "late_facts": late, "case_step": case.step},
            key=f"{key}:superseded" + (f":{times}" if times else ""),
        )

    def deadlines_for(self, case: Case, now: datetime) -> tuple[DeadlineSpec, ...]:
        """Exactly the pending deadlines the case's state requires."""
        if not case.is_open or case.step_due_at is None:
            return ()
        rule = self._rule_of(case)
        if rule is None:
            return ()
        due = case.step_due_at
        now = as_utc(now)

        def spec(purpose: str, at: datetime, action: str) -> DeadlineSpec:
            return DeadlineSpec(case_id=case.case_id, step=case.step, purpose=purpose, due_at=at,
                                action=action, party=rule.party.value, fence=case.version,
                                rule=rule.ref, deadline_at=due,
                                calendar=deadline_calendar(case.data))

        reminder_times = sorted({due - offset.as_timedelta() for offset in rule.reminders})
        return (spec("deadline", due, rule.on_timeout),
                *(spec("reminder", at, REMIND) for at in reminder_times if at > now))

    # ---- opening a case ---------------------------------------------------------------------

    def _open(self, event: Event, now: datetime) -> Outcome:
        if event.type not in opening_events():
            return _not_applied(None, f"out_of_state: {event.type} for case {event.case_id}, "
                                      "which was never opened (case.opened comes first)")
        data = event.data
        default_kind = Kind.voucher_refund.value if event.type == "voucher.expired" else None
        kind_value = data.get("kind", default_kind)
        if kind_value not in {k.value for k in Kind}:
            return _not_applied(None, f"invalid: unknown kind {kind_value!r}")
        kind = Kind(kind_value)
        first_step = FLOWS[kind].opened_by.get(event.type)
        if first_step is None:
            return _not_applied(None, f"invalid: {event.type} cannot open a {kind} case")
        amount = data.get("amount_fen")
        if not _whole_fen(amount):
            return _not_applied(None, f"invalid: amount_fen must be a whole number of fen "
                                      f">= 0, got {amount!r}")
        assert isinstance(amount, int)
        refund_fen = None
        if kind == Kind.voucher_refund:
            refund = self._voucher_refund(amount, data)
            if isinstance(refund, str):
                return _not_applied(None, refund)
            refund_fen = refund
        at = as_utc(event.occurred_at)
        skeleton = Case(
            case_id=event.case_id, platform=event.platform, shop_id=event.shop_id,
            order_id=event.order_id, kind=kind, status=OPEN, step=first_step, resolution=None,
            version=0, step_started_at=at, step_due_at=None, paused_remaining_s=None,
            rule_set="", rule_version="", amount_fen=amount, refund_fen=refund_fen,
            contacts={p: {str(k): str(v) for k, v in data[p].items()}
                      for p in ("buyer", "merchant") if isinstance(data.get(p), Mapping)},
            opened_at=at, closed_at=None,
            data={k: data[k] for k in OPENING_FACTS if k in data},
        )
        outside = self.rules.window_flag(event.platform, data, at)
        if outside is not None:  # flagged, not refused: the platform accepted the request
            skeleton = evolve(skeleton, data={**skeleton.data, "outside_window": outside})
        work = _Work(skeleton, now)
        if refund_fen == 0:  # a fully used voucher: nothing can be refunded
            work.close("nothing_to_refund", at)
        else:
            self._enter(work, first_step, at, due_override=event.due_at)
        self._notify_event(work, event)
        return self._finish(work)

    @staticmethod
    def _voucher_refund(amount: int, data: Mapping[str, Any]) -> int | str:
        counts = {k: data.get(k) for k in ("voucher_total_count", "voucher_used_count",
                                           "used_fen")}
        bad = [k for k, v in counts.items() if v is not None and not _whole_fen(v)]
        if bad:
            return f"invalid: {bad[0]} must be a whole number >= 0"
        try:
            return voucher_refund_fen(amount, total_count=counts["voucher_total_count"],
                                      used_count=counts["voucher_used_count"],
                                      used_fen=counts["used_fen"])
        except ValueError as exc:
            return f"invalid: {exc}"

    # ---- events of the flow tables --------------------------------------------------------

    def _flow_event(self, case: Case, event: Event, at: datetime, now: datetime) -> _Work | str:
        if event.type in opening_events():
            return f"out_of_state: {event.type}: case {case.case_id} is already open"
        key = event.type
        if event.type == "merchant.inspected":
            passed = event.data.get("passed")
            if not isinstance(passed, bool):
                return "invalid: merchant.inspected needs data.passed true or false"
            key = f"merchant.inspected.{'passed' if passed else 'failed'}"
        step = step_def(case.kind, case.step)
        target = step.on.get(key) if step is not None else None
        if target is None:
            return (f"out_of_state: {event.type} does not fit a {case.kind} case in step "
                    f"{case.step}")
        problem = self._check_data(event) or self.rules.refusal(case, event)
        if problem:
            return problem
        work = _Work(case, now)
        self._record_facts(work, event, at)
        # The platform taking the step's action itself (its own timer) means the party missed it.
        met = (case.step_due_at is None or at <= case.step_due_at) \
            and not self._by_platform(event)
        if isinstance(target, Go):
            if target.step != case.step:  # re-entering a step restarts it, it did not end
                work.end_step(met, at)
            self._enter(work, target.step, at, due_override=event.due_at)
        elif isinstance(target, Close):
            work.end_step(met, at)
            work.close(target.resolution, at)
        else:
            assert isinstance(target, Stay)
        self._notify_event(work, event)
        return work

    @staticmethod
    def _check_data(event: Event) -> str | None:
        if event.type == "repair.scheduled" and parse_moment(event.data.get("visit_at")) is None:
            return "invalid: repair.scheduled needs data.visit_at (RFC 3339)"
        amount = event.data.get("amount_fen")
        if event.type in ("refund.completed", "buyer.modified") and amount is not None \
                and not _whole_fen(amount):
            return f"invalid: amount_fen must be a whole number of fen >= 0, got {amount!r}"
        return None

    @staticmethod
    def _record_facts(work: _Work, event: Event, at: datetime) -> None:
        data = event.data
        facts = {dst: data[src] for src, dst in EVENT_FACTS.get(event.type, {}).items()
                 if src in data}
        if event.type == "repair.scheduled":
            visit_at = parse_moment(data["visit_at"])
            assert visit_at is not None  # checked by _check_data
            facts["visit_at"] = visit_at.isoformat()
            # the agreed time is a slot: it ends at visit_until (a bare visit_at is both)
            visit_until = parse_moment(data.get("visit_until"))
            facts["visit_until"] = max(visit_until or visit_at, visit_at).isoformat()
        elif event.type == "repair.visited":
            facts["visits"] = int(work.case.data.get("visits", 0)) + 1
            facts.setdefault("first_visit_at", work.case.data.get("first_visit_at",
                                                                  at.isoformat()))
        work.set_data(**facts)
        if event.type == "buyer.modified" and "amount_fen" in data:
            work.case = evolve(work.case, amount_fen=data["amount_fen"])
        if event.type == "refund.completed":
            paid = data.get("amount_fen", work.case.refund_fen)
            work.case = evolve(work.case, refund_fen=paid if paid is not None
                               else work.case.amount_fen)

    # ---- events every flow shares -----------------------------------------------------------

    # The resolution of a case the platform closed itself (e.g. Douyin's auto-close on timeout).
    PLATFORM_CLOSED = "closed_by_platform"

    @staticmethod
    def _by_platform(event: Event) -> bool:
        """The event says the platform itself took the action (data.actor = "platform")."""
        return event.data.get("actor") == Party.platform.value

    def _cancel(self, case: Case, event: Event, at: datetime, now: datetime) -> _Work | str:
        if case.step in NOT_CANCELLABLE:
            return f"out_of_state: buyer.cancelled in step {case.step}: the refund is under way"
        work = _Work(case, now)
        self._record_facts(work, event, at)
        if self._by_platform(event):
            # The platform closed it on its own timeout: the party missed the step; the
            # platform has told both sides already, "buyer cancelled" would be wrong.
            work.end_step(False, at)
            work.close(self.PLATFORM_CLOSED, at)
            return work
        # no StepResult: the step was neither met nor missed by the party who had to act
        work.close("cancelled", at)
        self._notify_event(work, event)
        return work

    def _request_intervention(self, case: Case, event: Event, at: datetime,
                              now: datetime) -> _Work | str:
        if case.step == INTERVENTION:
            return "out_of_state: intervention.requested: the platform is already intervening"
        work = _Work(case, now)
        self._record_facts(work, event, at)
        self._pause(work, at, restart_clock=False)
        self._notify_event(work, event)
        return work

    def _resolve_intervention(self, case: Case, event: Event, at: datetime,
                              now: datetime) -> _Work | str:
        if case.step != INTERVENTION:
            return f"out_of_state: intervention.resolved but no intervention (step {case.step})"
        outcome = event.data.get("outcome")
        if outcome not in INTERVENTION_OUTCOMES:
            return (f"invalid: intervention.resolved outcome {outcome!r} is not one of "
                    f"{sorted(INTERVENTION_OUTCOMES)}")
        work = _Work(case, now)
        self._record_facts(work, event, at)
        work.end_step(True, at)
        interrupted = dict(case.data.get("interrupted") or {})
        work.case = evolve(work.case, data={k: v for k, v in work.case.data.items()
                                            if k != "interrupted"})
        paused_step = interrupted.get("step", REFUND_PENDING)
        if outcome == "resume":
            self._resume(work, interrupted, at, event.due_at)
        elif outcome == "merchant":
            work.close("merchant_upheld", at)
        elif outcome == "refund":
            self._enter(work, REFUND_PENDING, at, due_override=event.due_at)
        else:  # "buyer": go where the step's approval leads (for a rejection: the rejected step)
            base = case.data.get("rejected_at_step", paused_step) \
                if paused_step == AFTER_REJECTION else paused_step
            base_def = step_def(case.kind, base)
            upheld = base_def.upheld_to if base_def is not None else REFUND_PENDING
            self._enter(work, upheld, at, due_override=event.due_at)
        self._notify_event(work, event, outcome=outcome)
        return work

    def _change_deadline(self, case: Case, event: Event, at: datetime,
                         now: datetime) -> _Work | str:
        if event.due_at is None:
            return "invalid: deadline.changed needs due_at"
        # A platform deadline belongs to its step: one naming another step, or (without a
        # step) one issued before the current step began, never moves this step.
        for_step = event.data.get("step")
        if for_step is not None and for_step != case.step:
            return (f"out_of_state: deadline.changed is for step {for_step}; the case is in "
                    f"{case.step}")
        if for_step is None and as_utc(event.occurred_at) < case.step_started_at:
            return (f"out_of_state: deadline.changed happened before step {case.step} "
                    "began (it was for an earlier step)")
        if case.step == INTERVENTION:
            return "out_of_state: deadline.changed while the clock is paused (intervention)"
        if self._rule_of(case) is None:
            return f"out_of_state: deadline.changed: step {case.step} has no deadline"
        work = _Work(case, now)
        work.case = evolve(work.case, step_due_at=as_utc(event.due_at),
                           data={**work.case.data, "deadline_source": "platform"})
        self._notify_event(work, event)
        return work

    # ---- steps, clocks and timeouts -------------------------------------------------------

    def _enter(self, work: _Work, step: str, at: datetime,
               due_override: datetime | None = None, depth: int = 0) -> None:
        """Start `step` at `at`: pick the rule in force, set the deadline (the platform's
        own `due_override` wins over the rule's), resolve immediate ("0h") rules at once."""
        case = work.case
        rule = self.rules.rule_for(case.platform, case.kind, step, at, shop=case.shop_id)
        data = dict(case.data)
        data.pop("deadline_source", None)
        data.pop(CALENDAR_KEY, None)
        if step == AFTER_REJECTION and case.step not in (AFTER_REJECTION, INTERVENTION):
            data["rejected_at_step"] = case.step  # where an upheld buyer goes back to
        refund_fen = case.refund_fen
        if step == REFUND_PENDING and refund_fen is None:
            refund_fen = case.amount_fen
        due = None
        if rule is not None:
            if due_override is not None:
                due = as_utc(due_override)
                data["deadline_source"] = "platform"
            else:
                due = self._rule_due(rule, at, data)
        work.case = evolve(
            case, step=step, step_started_at=at, step_due_at=due, paused_remaining_s=None,
            rule_set=rule.set_name if rule else "", rule_version=rule.version if rule else "",
            rule_id=rule.id if rule else None, refund_fen=refund_fen, data=data,
        )
        if rule is not None and rule.is_immediate and due_override is None:
            if depth >= MAX_IMMEDIATE_CHAIN:
                raise RuntimeError(f"immediate rules loop at step {step} (check the rule files)")
            self._time_out(work, rule.on_timeout, rule.party, rule.ref, at, work.case.version,
                           immediate=True, depth=depth + 1)

    def _rule_due(self, rule: Rule, at: datetime, data: dict[str, Any]) -> datetime:
        anchor = at if rule.anchor == STEP_START else (parse_moment(data.get(rule.anchor)) or at)
        due = rule.duration.add_to(anchor, self.calendar)
        if not rule.duration.is_fixed:  # working days: record the calendar data used
            data[CALENDAR_KEY] = calendar_record(self.calendar, rule, anchor, due)
        return due

    def _time_out(self, work: _Work, action: str, party: Party, rule: RuleRef,
                  deadline_at: datetime, fence: int, *, immediate: bool, depth: int = 0) -> None:
        """The deadline of the current step passed: take the rule's automatic action."""
        case = work.case
        step = step_def(case.kind, case.step)
        target = None if step is None else step.timeout.get(action)
        if action != ESCALATE and target is None:
            raise ValueError(f"action {action!r} is not defined for step {case.step} of "
                             f"{case.kind}")
        position = len(work.decisions)  # this decision precedes any it triggers
        if not immediate:  # an immediate step is a rule, not a party missing a deadline
            work.end_step(False, deadline_at)
        data: dict[str, Any] = {"action": action, "missed_step": case.step}
        basis = deadline_calendar(case.data)
        if basis is not None:  # a working-day deadline: on which calendar data it stood
            data["calendar"] = basis
        if action == ESCALATE:
            self._pause(work, deadline_at, restart_clock=True)
        elif isinstance(target, Go):
            self._enter(work, target.step, deadline_at, depth=depth)
        elif isinstance(target, Close):
            work.close(target.resolution, deadline_at)
            data["resolution"] = target.resolution
        data["next_step"] = work.case.step
        if work.case.step == REFUND_PENDING or action == "auto_refund":
            data["refund_fen"] = work.case.refund_fen if work.case.refund_fen is not None \
                else work.case.amount_fen
        decision_type = DECISION_OF_ACTION[action]
        key = decision_key(case.case_id, case.step, fence, "deadline", deadline_at)
        # a decision withdrawn earlier and reached again is published again, with a new id
        times = (work.case.data.get(WITHDRAWN) or {}).get(key)
        published_key = key if not times else f"{key}:again:{times}"
        work.decisions.insert(position, Decision(
            type=decision_type, case_id=case.case_id, step=case.step, rule=rule,
            due_at=deadline_at, decided_at=work.now, data=data, key=published_key,
        ))
        decided = dict(work.case.data.get(DECIDED) or {})
        decided[key] = {"id": decision_id(published_key), "type": decision_type,
                        "step": case.step,
                        "party": party.value,
                        "due_at": deadline_at.isoformat(),
                        "rule": [rule.set, rule.version, rule.id]}
        work.set_data(**{DECIDED: decided})
        # the party who missed the deadline hears of it; a decision of the platform's own
        # (immediate rules, voucher refunds) answers the buyer; escalations page ops
        if action == ESCALATE:
            audience, urgent = Party.ops, True
        elif party in (Party.buyer, Party.merchant):
            audience, urgent = party, False
        else:
            audience, urgent = Party.buyer, False
        # what comes next: the step the case moved to and its deadline
        after = work.case
        next_def = step_def(after.kind, after.step) if after.is_open else None
        work.notify(decision_type, audience, urgent=urgent, due_at=deadline_at,
                    step=case.step, missed_step=case.step, missed_party=party.value,
                    action=action, decision_key=key,
                    next_step=after.step,
                    next_party=next_def.party.value if next_def is not None else None,
                    next_due_at=after.step_due_at.isoformat()
                    if after.step_due_at is not None else None,
                    resolution=after.resolution)

    def _pause(self, work: _Work, at: datetime, *, restart_clock: bool) -> None:
        """Hand the case to the platform; keep what is left of the step's clock.

        After an escalation (`restart_clock`) the step's deadline has already passed, so a
        "resume" restarts the step with a fresh clock instead of firing again at once."""
        case = work.case
        remaining = None
        if not restart_clock and case.step_due_at is not None:
            remaining = max(0, int((case.step_due_at - at).total_seconds()))
        interrupted = {"step": case.step, "started_at": case.step_started_at.isoformat(),
                       "restart_clock": restart_clock}
        work.case = evolve(
            case, step=INTERVENTION, step_started_at=at, step_due_at=None,
            paused_remaining_s=remaining, rule_set="", rule_version="", rule_id=None,
            data={**case.data, "interrupted": interrupted},
        )

    def _resume(self, work: _Work, interrupted: Mapping[str, Any], at: datetime,
                due_override: datetime | None) -> None:
        step = interrupted.get("step", REFUND_PENDING)
        started = parse_moment(interrupted.get("started_at")) or at
        if interrupted.get("restart_clock"):
            self._enter(work, step, at, due_override=due_override)
            return
        case = work.case
        remaining = case.paused_remaining_s
        rule = self.rules.rule_for(case.platform, case.kind, step, started, shop=case.shop_id)
        due = None
        if rule is not None and due_override is not None:
            due = as_utc(due_override)
        elif rule is not None and remaining is not None:
            due = at + timedelta(seconds=remaining)
        work.case = evolve(
            case, step=step, step_started_at=started, step_due_at=due, paused_remaining_s=None,
            rule_set=rule.set_name if rule else "", rule_version=rule.version if rule else "",
            rule_id=rule.id if rule else None,
        )

    def _rule_of(self, case: Case) -> Rule | None:
        ref = case.rule
        found = self.rules.get(ref) if ref is not None else None
        return found or self.rules.rule_for(case.platform, case.kind, case.step,
                                            case.step_started_at, shop=case.shop_id)

    # ---- reminders and notices -------------------------------------------------------------

    def _remind(self, case: Case, reminder: DeadlineSpec, now: datetime) -> Outcome:
        """A reminder changes nothing: one reminder.due_soon decision and a notice."""
        rule = self.rules.get(reminder.rule)
        lead = reminder.deadline_at - reminder.due_at
        decision = Decision(
            type="reminder.due_soon", case_id=case.case_id, step=case.step, rule=reminder.rule,
            due_at=reminder.deadline_at, decided_at=now,
            data={"remind_at": reminder.due_at.isoformat(),
                  "lead_s": int(lead.total_seconds()),
                  "action_on_timeout": rule.on_timeout if rule else None},
            key=decision_key(case.case_id, case.step, reminder.fence, "reminder",
                             reminder.deadline_at, reminder.due_at),
        )
        party = Party(reminder.party)
        work = _Work(case, now)
        work.case = case  # nothing changes, not even the version
        work.notify("reminder.due_soon", Party.ops if party == Party.platform else party,
                    urgent=lead <= URGENT_REMINDER_LEAD, due_at=reminder.deadline_at,
                    action_on_timeout=decision.data["action_on_timeout"])
        return Outcome(case=case, applied=True, problem=None, deadlines=None,
                       decisions=(decision,), notices=tuple(work.notices))

    @staticmethod
    def _notify_event(work: _Work, event: Event, **params: Any) -> None:
        audience = EVENT_AUDIENCE.get(event.type)
        if event.type == "deadline.changed":
            current = step_def(work.case.kind, work.case.step)
            audience = (current.party,) if current is not None else ()
        for party in audience or ():
            if party != Party.platform:  # the platform is upstream: it already knows
                work.notify(event.type, party, event_id=event.event_id, **params)

    def _finish(self, work: _Work) -> Outcome:
        return Outcome(
            case=work.case, applied=True, problem=None,
            deadlines=self.deadlines_for(work.case, work.now),
            decisions=tuple(work.decisions), notices=tuple(work.notices),
            steps=tuple(work.steps),
        )
