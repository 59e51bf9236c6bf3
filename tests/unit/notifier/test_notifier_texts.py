"""Every message says the right thing in Chinese.

For every kind, every step of its flow, every automatic action the step allows (plus its
reminder), the engine makes the notices (so the parameters are the engine's own), the
policy expands them to every party and channel, and each text must be Chinese, name the
step's label (the missed step for a decision, not the step the case moved to), show the
next deadline, and contain no internal identifier. Labels are checked against the flows:
a new step without a label fails here.
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shared.domain import (
    Case,
    DeadlineSpec,
    Engine,
    Event,
    Kind,
    Notice,
    RuleBook,
    RuleRef,
    WorkCalendar,
)
from shared.domain.flows import (
    DECISION_OF_ACTION,
    FLOWS,
    INTERVENTION,
    all_event_types,
)
from shared.notifications.policy import NotificationPolicy, OpsContacts

ENGINE = Engine(RuleBook.load(None), WorkCalendar())
POLICY = NotificationPolicy.load()
AT = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
CONTACTS = {p: {"phone": "13812345678", "email": f"{p}@example.com"}
            for p in ("buyer", "merchant")}
OPS = OpsContacts(("ops@example.com",), ("13700000001",))
CJK = re.compile(r"[\u4e00-\u9fff]")
# any internal code: snake_case words, dotted names, or a lowercase word of 3+ letters
IDENTIFIER = re.compile(r"[a-z]+(?:[_.][a-z]+)+|\b[a-z]{3,}\b")
STEP_LABELS: dict[str, str] = POLICY._labels["step"]


def _case(kind: Kind, step: str) -> Case:
    """A case resting in `step` with the default rule's deadline one day ahead."""
    due = AT + timedelta(days=1)
    return Case(case_id="AS20261122001", platform="douyin", shop_id="S1", order_id="O1",
                kind=kind, status="open", step=step, resolution=None, version=3,
                step_started_at=AT - timedelta(days=1), step_due_at=due,
                paused_remaining_s=None, rule_set="", rule_version="", amount_fen=5000,
                refund_fen=None, contacts=CONTACTS, opened_at=AT - timedelta(days=2),
                closed_at=None, data={"visit_at": AT.isoformat(), "visit_until": AT.isoformat()})


def _notices() -> list[tuple[str, Notice]]:
    """(what, notice) for every kind x step x (each allowed action's decision, reminder)."""
    out = []
    for kind, flow in FLOWS.items():
        for step, definition in flow.steps.items():
            case = _case(kind, step)
            rule = ENGINE.rules.rule_for(case.platform, kind, step, case.step_started_at)
            ref = rule.ref if rule is not None else RuleRef("default", "1", step)
            assert case.step_due_at is not None
            spec = DeadlineSpec(case.case_id, step, "deadline", case.step_due_at, "",
                                definition.party.value, case.version, ref, case.step_due_at)
            for action in sorted(definition.allowed_actions):
                fired = ENGINE.fire(case, replace(spec, action=action), spec.due_at)
                assert fired.applied, (kind, step, action)
                out += [(f"{kind}/{step}/{action}", n) for n in fired.notices]
            reminder = replace(spec, purpose="reminder", action="remind",
                               due_at=spec.due_at - timedelta(hours=2))
            reminded = ENGINE.fire(case, reminder, reminder.due_at)
            out += [(f"{kind}/{step}/reminder", n) for n in reminded.notices]
    return out


def _superseded_notices() -> list[tuple[str, Notice]]:
    """A published first-step decision withdrawn by a late cancellation, for each kind."""
    out = []
    for kind, flow in FLOWS.items():
        opening = Event("ev-open", "case.opened", AT, "douyin", "S1", "O1", "AS20261122001",
                        None, {"kind": kind.value, "amount_fen": 5000, **CONTACTS})
        opened = ENGINE.apply(None, opening, AT)
        case = opened.case
        assert case is not None
        if case.step != flow.first_step:  # an immediate first step: nothing to withdraw
            continue
        spec = next(d for d in opened.deadlines or () if d.purpose == "deadline")
        fired = ENGINE.fire(case, spec, spec.due_at)
        assert fired.case is not None
        late = Event("ev-late", "buyer.cancelled", AT + timedelta(minutes=1), "douyin", "S1",
                     "O1", "AS20261122001", None, {})
        rebuilt = ENGINE.replay(fired.case, [opening, late], spec.due_at + timedelta(hours=1),
                                arrived=["ev-late"])
        out += [(f"{kind}/{flow.first_step}/superseded", n) for n in rebuilt.notices
                if n.reason == "decision.superseded"]
    assert out
    return out


NOTICES = _notices() + _superseded_notices()


def test_every_step_of_every_flow_has_a_chinese_label() -> None:
    steps = {s for flow in FLOWS.values() for s in flow.steps} | {INTERVENTION, "closed"}
    missing = sorted(s for s in steps if s not in STEP_LABELS)
    assert missing == []
    assert all(CJK.search(STEP_LABELS[s]) for s in steps)


def test_every_action_and_kind_has_a_chinese_label() -> None:
    effects = POLICY._labels["effect"]
    assert set(DECISION_OF_ACTION) <= set(effects)
    assert {k.value for k in Kind} <= set(POLICY._labels["kind"])
    assert set(DECISION_OF_ACTION.values()) <= set(POLICY._labels["decision"])


def test_every_decision_and_every_event_notice_has_a_policy() -> None:
    reasons = {n.reason for _what, n in NOTICES}
    assert reasons <= POLICY.reasons
    assert set(DECISION_OF_ACTION.values()) | {"decision.superseded"} <= POLICY.reasons
    audience_events = {"case.opened", "merchant.approved", "merchant.rejected",
                       "merchant.reshipped", "buyer.received", "buyer.shipped"}
    assert audience_events <= set(all_event_types()) and audience_events <= POLICY.reasons


def _render_all() -> list[tuple[str, Notice, str, str, str]]:
    out = []
    for what, notice in NOTICES:
        for request in POLICY.expand(notice, CONTACTS, OPS):
            message = POLICY.render(request)
            text = (message.subject or "") + "\n" + message.body
            out.append((what, notice, request.party, request.channel, text))
    return out


RENDERED = _render_all()


def test_the_combinations_cover_every_kind_step_party_and_channel() -> None:
    kinds = {what.split("/")[0] for what, *_ in RENDERED}
    assert kinds == {k.value for k in Kind}
    assert {(party, channel) for _w, _n, party, channel, _t in RENDERED} >= {
        ("buyer", "sms"), ("buyer", "email"), ("merchant", "sms"), ("merchant", "email"),
        ("ops", "sms"), ("ops", "email")}
    steps = {what.split("/")[1] for what, *_ in RENDERED}
    assert steps == {s for flow in FLOWS.values() for s in flow.steps}


@pytest.mark.parametrize("index", range(0, len(RENDERED)))
def test_each_text_is_chinese_names_its_step_and_has_no_identifier(index: int) -> None:
    what, notice, party, channel, text = RENDERED[index]
    where = f"{what} -> {party}/{channel}: {text}"
    assert CJK.search(text), where
    leaked = IDENTIFIER.findall(text.replace(notice.case_id, ""))
    assert leaked == [], where
    # the step the notice is about: the missed one for a decision
    assert STEP_LABELS[notice.step] in text, where
    if notice.reason.startswith("decision."):
        assert notice.step == what.split("/")[1], where
    params: dict[str, Any] = dict(notice.params)
    next_due = params.get("next_due_at")
    if notice.reason.startswith("decision.") and next_due and party in ("buyer", "merchant"):
        from shared.notifications.policy import local_time
        assert "".join(local_time(next_due).split()) in "".join(text.split()), where
    if params.get("kind") in ("exchange", "repair", "onsite_repair") and \
            notice.reason in ("decision.auto_approved", "decision.auto_confirmed",
                              "decision.visit_required", "decision.deemed_received"):
        assert "退款" not in text, where


def test_require_visit_is_not_an_escalation_and_pages_nobody() -> None:
    visits = [(n, p, c) for what, n, p, c, _t in RENDERED if what.endswith("/require_visit")]
    assert visits
    assert {n.reason for n, _p, _c in visits} == {"decision.visit_required"}
    assert all(p != "ops" and not n.urgent for n, p, _c in visits)
