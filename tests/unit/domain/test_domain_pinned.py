"""Behaviour the mutation run showed unpinned (issue 14): each test states one rule."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, timedelta
from pathlib import Path

import pytest
from domain_support import Driver, cst, default_engine, make_event

from shared.domain import Engine, decision_id, facts_of
from shared.domain.engine import EVENT_AUDIENCE, decision_key, fact_order

OPENED = cst(2026, 11, 2, 10)
PROOF = ["https://img.example/proof.jpg"]  # the kuaishou rules want evidence with a rejection


# ---- at the deadline --------------------------------------------------------------------

def test_an_act_exactly_at_its_deadline_is_in_time(driver: Driver) -> None:
    driver.open("refund_only", OPENED)
    due = driver.deadline.deadline_at
    out = driver.send("merchant.rejected", due, reason="no", evidence=PROOF)
    assert out.decisions == () and out.problem is None
    assert [(s.step, s.met) for s in out.steps] == [("merchant_response", True)]
    assert driver.step == "buyer_after_rejection"


def test_an_act_one_second_after_its_deadline_comes_after_the_automatic_action(
    driver: Driver,
) -> None:
    driver.open("refund_only", OPENED)
    due = driver.deadline.deadline_at
    out = driver.send("merchant.rejected", due + timedelta(seconds=1), reason="no",
                      evidence=PROOF)
    assert out.applied and out.problem is not None
    assert out.problem.startswith("out_of_state: merchant.rejected does not fit")
    assert [d.type for d in out.decisions] == ["decision.auto_approved"]
    assert out.decisions[0].due_at == due
    assert [(s.step, s.met) for s in out.steps] == [("merchant_response", False)]
    assert driver.step == "refund_pending"
    assert driver.case is not None and driver.case.step_started_at == due


def test_an_act_after_its_deadline_that_fits_the_next_step_applies_there(
    driver: Driver,
) -> None:
    driver.open("exchange", OPENED)
    due = driver.deadline.deadline_at
    out = driver.send("buyer.shipped", due + timedelta(hours=1), tracking_no="SF1")
    assert out.problem is None and out.verdicts == {next(iter(out.verdicts)): None}
    assert [d.type for d in out.decisions] == ["decision.auto_approved"]
    assert driver.step == "return_in_transit"
    assert driver.case is not None and driver.case.version == 3


def test_fact_order_puts_opening_events_first_at_one_instant() -> None:
    opening = make_event("case.opened", OPENED)
    other = replace(make_event("merchant.approved", OPENED), event_id="a")
    assert sorted([other, opening], key=fact_order) == [opening, other]
    later = make_event("merchant.approved", OPENED + timedelta(seconds=1))
    assert fact_order(opening) < fact_order(later)


# ---- working days across New Year ------------------------------------------------------

def test_seven_working_days_across_new_year_2026(driver: Driver) -> None:
    driver.open("refund_only", cst(2025, 12, 29, 9))
    driver.send("merchant.approved", cst(2025, 12, 29, 10))  # Monday
    # 12-30, 12-31, (1-1..1-3 off), Sunday 1-4 make-up workday, 1-5, 1-6, 1-7, 1-8
    assert driver.due_local() == cst(2026, 1, 8, 10)


# ---- stale timers ----------------------------------------------------------------------

def test_the_old_timer_of_a_step_whose_deadline_changed_is_stale(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    old = driver.deadline
    driver.send("deadline.changed", OPENED + timedelta(hours=1),
                due_at=OPENED + timedelta(hours=72))
    assert driver.case is not None
    out = driver.engine.fire(driver.case, old, old.due_at + timedelta(minutes=1))
    assert not out.applied and out.problem is not None and out.problem.startswith("stale")
    assert driver.deadline.due_at == OPENED + timedelta(hours=72)


def test_a_timer_for_another_step_at_the_same_version_is_stale(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    spec = replace(driver.deadline, step="buyer_return_shipping")
    assert driver.case is not None
    out = driver.engine.fire(driver.case, spec, spec.due_at)
    assert not out.applied and out.problem is not None
    assert "deadline for buyer_return_shipping" in out.problem


def test_a_fired_deadline_records_the_clock_it_proves(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    spec = driver.deadline
    out = driver.fire(late=timedelta(hours=5))
    assert out.case is not None
    assert out.case.data["timer_until"] == spec.deadline_at.isoformat()
    assert out.case.data["facts_until"] == spec.deadline_at.isoformat()
    assert out.decisions[0].decided_at == spec.due_at + timedelta(hours=5)


# ---- amounts ---------------------------------------------------------------------------

def test_a_partial_refund_records_what_was_paid(driver: Driver) -> None:
    driver.open("refund_only", OPENED, amount_fen=5000)
    driver.send("merchant.approved", OPENED + timedelta(hours=1))
    assert driver.case is not None and driver.case.refund_fen == 5000
    driver.send("refund.completed", OPENED + timedelta(hours=2), amount_fen=3000)
    assert driver.case.refund_fen == 3000 and driver.case.resolution == "refunded"
    assert driver.case.amount_fen == 5000


def test_a_refund_without_an_amount_pays_the_refund_due(driver: Driver) -> None:
    driver.open("refund_only", OPENED, amount_fen=5000)
    driver.send("refund.completed", OPENED + timedelta(hours=2))
    assert driver.case is not None and driver.case.refund_fen == 5000


def test_a_changed_amount_is_what_the_automatic_refund_pays(driver: Driver) -> None:
    driver.open("refund_only", OPENED, amount_fen=5000)
    driver.send("buyer.modified", OPENED + timedelta(hours=1), amount_fen=4200)
    assert driver.case is not None and driver.case.amount_fen == 4200
    out = driver.fire()
    assert out.decisions[0].data["refund_fen"] == 4200
    assert driver.case.refund_fen == 4200


@pytest.mark.parametrize("amount", [-1, "12", 1.5])
def test_a_bad_refund_amount_is_invalid(driver: Driver, amount: object) -> None:
    driver.open("refund_only", OPENED)
    out = driver.send("refund.completed", OPENED + timedelta(hours=1), amount_fen=amount)
    assert not out.applied and out.problem is not None and out.problem.startswith("invalid")


# ---- the platform's due_at --------------------------------------------------------------

def test_the_platform_due_at_on_a_flow_event_sets_the_next_step(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    platform_due = OPENED + timedelta(days=3)
    driver.send("merchant.approved", OPENED + timedelta(hours=1), due_at=platform_due)
    assert driver.step == "buyer_return_shipping"
    assert driver.case is not None and driver.case.step_due_at == platform_due
    assert driver.case.data["deadline_source"] == "platform"
    driver.send("buyer.shipped", OPENED + timedelta(hours=2))
    assert "deadline_source" not in driver.case.data  # the next step is the rule's again


def test_the_platform_due_at_on_resume_wins_over_the_time_left(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    driver.send("intervention.requested", OPENED + timedelta(hours=1), requested_by="buyer")
    platform_due = OPENED + timedelta(days=5)
    driver.send("intervention.resolved", OPENED + timedelta(days=2), outcome="resume",
                due_at=platform_due)
    assert driver.step == "merchant_response"
    assert driver.case is not None and driver.case.step_due_at == platform_due


def test_resume_without_due_at_keeps_the_time_left(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    left = driver.deadline.deadline_at - (OPENED + timedelta(hours=1))
    driver.send("intervention.requested", OPENED + timedelta(hours=1), requested_by="buyer")
    assert driver.case is not None and driver.case.paused_remaining_s == left.total_seconds()
    resumed_at = OPENED + timedelta(days=2)
    driver.send("intervention.resolved", resumed_at, outcome="resume")
    assert driver.case.step_due_at == resumed_at + left
    assert driver.case.step_started_at == OPENED  # the step did not restart


# ---- who hears of each event ------------------------------------------------------------

def _reach(engine: Engine, kind: str, events: list[tuple[str, dict[str, object]]]
           ) -> dict[str, set[str | None]]:
    driver = Driver(engine)
    driver.open(kind, OPENED)
    heard = {"case.opened": {n.party for n in driver.last.notices}} if driver.last else {}
    at = OPENED
    for type_, data in events:
        at += timedelta(hours=1)
        out = driver.send(type_, at, **data)
        assert out.problem is None, (type_, out.problem)
        heard[type_] = {n.party for n in out.notices if n.reason == type_}
    return heard


def test_each_event_is_told_to_the_party_it_concerns(engine: Engine) -> None:
    heard = _reach(engine, "exchange", [
        ("merchant.approved", {}), ("buyer.shipped", {}), ("merchant.received", {}),
        ("merchant.inspected", {"passed": True}), ("merchant.reshipped", {}),
        ("buyer.received", {}), ("buyer.confirmed", {})])
    heard |= _reach(engine, "onsite_repair", [
        ("repair.scheduled", {"visit_at": "2026-11-03T10:00:00+08:00"}),
        ("repair.visited", {}), ("repair.completed", {})])
    heard |= _reach(engine, "refund_only", [
        ("intervention.requested", {"requested_by": "buyer"}),
        ("intervention.resolved", {"outcome": "refund"}), ("refund.completed", {})])
    heard |= _reach(engine, "return_refund", [
        ("merchant.rejected", {"reason": "no", "evidence": PROOF}),
        ("buyer.modified", {}), ("buyer.cancelled", {})])
    heard |= _reach(engine, "repair", [("merchant.refused_repair", {})])
    for type_, parties in heard.items():
        expected = {p.value for p in EVENT_AUDIENCE.get(type_, ())}
        assert parties == expected, type_
    assert heard["repair.visited"] == set()  # nobody: the visit is reported, not news


def test_a_deadline_change_is_told_to_the_party_who_must_act(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    driver.send("merchant.approved", OPENED + timedelta(hours=1))
    out = driver.send("deadline.changed", OPENED + timedelta(hours=2),
                      due_at=OPENED + timedelta(days=4))
    assert [(n.reason, n.party) for n in out.notices] == [("deadline.changed", "buyer")]


# ---- decision keys ----------------------------------------------------------------------

def test_decision_keys_ignore_the_fence_and_name_the_reminder_time() -> None:
    at = OPENED
    assert decision_key("C", "s", 1, "deadline", at) == decision_key("C", "s", 9, "deadline", at)
    assert decision_key("C", "s", 1, "reminder", at, at - timedelta(hours=2)).endswith(
        (at - timedelta(hours=2)).isoformat())


def test_an_unapplied_event_still_moves_the_fact_time(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    before = driver.case
    late = OPENED + timedelta(hours=5)
    out = driver.send("buyer.confirmed", late)
    assert not out.applied and out.case is not None
    assert facts_of(out.case) == facts_of(before)
    assert out.case.data["facts_until"] == late.astimezone(UTC).isoformat()
    assert driver.engine.needs_replay(out.case, make_event("merchant.approved", late))


# ---- resume, case snapshots, calendars and rule files (mutation gaps) -------------------

def test_resume_restores_the_rule_of_the_interrupted_step(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    assert driver.case is not None
    rule = (driver.case.rule_set, driver.case.rule_version, driver.case.rule_id)
    driver.send("intervention.requested", OPENED + timedelta(hours=1), requested_by="buyer")
    assert driver.case.rule_set == "" and driver.case.rule_id is None
    driver.send("intervention.resolved", OPENED + timedelta(hours=5), outcome="resume")
    assert (driver.case.rule_set, driver.case.rule_version, driver.case.rule_id) == rule
    assert rule == ("kuaishou", "2022-09-30", "exchange.merchant_response")


def test_resume_after_an_escalation_takes_the_platform_due_at(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    driver.send("merchant.approved", OPENED + timedelta(hours=1))
    driver.send("buyer.shipped", OPENED + timedelta(hours=2))
    driver.send("merchant.received", OPENED + timedelta(hours=3))
    driver.send("merchant.inspected", OPENED + timedelta(hours=4), passed=True)
    driver.fire()  # merchant_reship escalates
    assert driver.step == "intervention"
    platform_due = OPENED + timedelta(days=9)
    driver.send("intervention.resolved", OPENED + timedelta(days=5), outcome="resume",
                due_at=platform_due)
    assert driver.step == "merchant_reship"
    assert driver.case is not None and driver.case.step_due_at == platform_due
    assert driver.case.step_started_at == OPENED + timedelta(days=5)  # a fresh clock


def test_a_case_snapshot_round_trips_with_typed_fields(driver: Driver) -> None:
    from shared.domain import Case, Kind

    driver.open("exchange", OPENED)
    assert driver.case is not None
    again = Case.from_dict(driver.case.to_dict())
    assert again == driver.case
    assert type(again.kind) is Kind and again.step_started_at.tzinfo is not None
    assert again.contacts == {"buyer": {"phone": "13800000000"},
                              "merchant": {"email": "shop@example.com"}}


def test_seconds_to_resolution_only_for_the_change_that_closed() -> None:
    from shared.domain import seconds_to_resolution

    d = Driver(default_engine())
    d.open("refund_only", OPENED)
    opened_case = d.case
    d.send("buyer.cancelled", OPENED + timedelta(hours=3))
    closed = d.case
    assert opened_case is not None and closed is not None
    assert seconds_to_resolution(opened_case, closed) == 3 * 3600
    assert seconds_to_resolution(None, closed) == 3 * 3600
    assert seconds_to_resolution(closed, closed) is None
    assert seconds_to_resolution(None, opened_case) is None


def test_the_calendar_says_how_far_it_knows(tmp_path: Path) -> None:
    from datetime import date

    import chinese_calendar

    from shared.domain import WorkCalendar

    # The last year the library knows, counted from one it has always known (not from
    # today: from 1 January of a year it does not know yet, that would be a year too far).
    last = 2024
    while True:
        try:
            chinese_calendar.is_workday(date(last + 1, 1, 1))
        except NotImplementedError:
            break
        last += 1
    during_last = date(last, 6, 1)
    assert WorkCalendar().covered_until(during_last) == date(last, 12, 31)
    holidays = tmp_path / "holidays.toml"
    holidays.write_text(f"[{last + 1}]\nholidays = [{last + 1}-01-01]\n", encoding="utf-8")
    assert WorkCalendar(holidays).covered_until(during_last) == date(last + 1, 12, 31)
    assert WorkCalendar(holidays).holiday_file == holidays


def test_key_line_looks_only_inside_the_block() -> None:
    from shared.domain.tomlfiles import header_lines, key_line

    text = "a = 1\n[[rule]]\nid = 'x'\nstep = 's'\n[[rule]]\nid = 'y'\nstep = 't'\n"
    assert header_lines(text, "[[rule]]") == [2, 5]
    assert key_line(text, "step") == 4
    assert key_line(text, "step", 5) == 7
    assert key_line(text, "step", 2, 4) is None  # the end line is outside
    assert key_line(text, "id", 3, 6) == 3  # the start line is inside
    assert key_line(text, "missing") is None


# ---- replay: what a superseded decision says, and decisions reached again --------------



def test_a_superseded_decision_names_the_one_it_withdraws(engine: Engine) -> None:
    opening = make_event("case.opened", OPENED, kind="refund_only", amount_fen=500)
    opened = engine.apply(None, opening, OPENED)
    assert opened.case is not None and opened.deadlines
    spec = next(s for s in opened.deadlines if s.purpose == "deadline")
    fired = engine.fire(opened.case, spec, spec.due_at + timedelta(minutes=3))
    approval = fired.decisions[0]
    assert fired.case is not None
    late = make_event("merchant.rejected", OPENED + timedelta(hours=1), reason="no",
    evidence=["https://img.example/proof.jpg"])
    now = spec.due_at + timedelta(hours=1)
    out = engine.replay(fired.case, [opening, late], now, arrived=[late.event_id])
    (withdrawn,) = out.decisions
    assert withdrawn.type == "decision.superseded" and withdrawn.case_id == "AS1"
    assert withdrawn.step == approval.step == "merchant_response"
    assert withdrawn.rule == approval.rule and withdrawn.due_at == approval.due_at
    assert withdrawn.decided_at == now
    assert withdrawn.key == f"{approval.key}:superseded"
    assert withdrawn.data == {
        "supersedes": decision_id(approval.key),
        "superseded_type": "decision.auto_approved",
        "reason": withdrawn.data["reason"],
        "late_facts": [{"event_id": late.event_id, "type": "merchant.rejected",
                        "occurred_at": late.occurred_at.astimezone(UTC).isoformat()}],
        "case_step": "buyer_after_rejection",
    }
    assert withdrawn.data["reason"].startswith("late_fact: ")
    assert out.verdicts == {opening.event_id: None, late.event_id: None}
    # the rejection is news (the buyer hears of it), the approval's notice is not repeated
    assert sorted((n.reason, n.party) for n in out.notices) == [
        ("decision.superseded", "merchant"), ("decision.superseded", "ops"),
        ("merchant.rejected", "buyer")]
    notice = next(n for n in out.notices if n.reason == "decision.superseded")
    assert notice.step == "merchant_response" and notice.due_at == approval.due_at
    assert notice.params["next_step"] == "buyer_after_rejection"
    assert out.case is not None and out.case.version == fired.case.version + 1
    assert out.case.data["withdrawn"] == {approval.key: 1}
    assert out.case.data["decided"] == {}


def test_a_withdrawn_decision_reached_again_is_published_under_a_new_id(
    engine: Engine,
) -> None:
    opening = make_event("case.opened", OPENED, kind="refund_only", amount_fen=500)
    opened = engine.apply(None, opening, OPENED)
    assert opened.case is not None and opened.deadlines
    spec = next(s for s in opened.deadlines if s.purpose == "deadline")
    fired = engine.fire(opened.case, spec, spec.due_at)
    assert fired.case is not None
    key = fired.decisions[0].key
    now = spec.due_at + timedelta(hours=1)
    # a modification in time restarts the merchant's step: the approval is withdrawn
    modified = make_event("buyer.modified", OPENED + timedelta(hours=1))
    first = engine.replay(fired.case, [opening, modified], now, arrived=[modified.event_id])
    assert first.case is not None
    assert [d.type for d in first.decisions] == ["decision.superseded"]
    # the platform then puts the step's deadline back where it was: reached again
    back = make_event("deadline.changed", OPENED + timedelta(hours=2),
                      due_at=spec.deadline_at, step="merchant_response")
    again = engine.replay(first.case, [opening, modified, back], now,
                          arrived=[back.event_id])
    assert again.case is not None
    assert [d.key for d in again.decisions] == [f"{key}:again:1"]
    assert again.case.data["decided"][key]["id"] == decision_id(f"{key}:again:1")
    # and withdrawn a second time, the withdrawal names the id it was published with
    late = make_event("merchant.rejected", OPENED + timedelta(hours=3), reason="no",
    evidence=["https://img.example/proof.jpg"])
    third = engine.replay(again.case, [opening, modified, back, late], now,
                          arrived=[late.event_id])
    (withdrawn,) = third.decisions
    assert withdrawn.data["supersedes"] == decision_id(f"{key}:again:1")
    assert withdrawn.key == f"{key}:superseded:1"
    assert third.case is not None and third.case.data["withdrawn"] == {key: 2}


def test_a_deadline_change_naming_the_step_applies_even_if_issued_before_it(
    driver: Driver,
) -> None:
    driver.open("exchange", OPENED)
    approved = OPENED + timedelta(hours=2)
    driver.send("merchant.approved", approved)
    new_due = approved + timedelta(days=3)
    out = driver.send("deadline.changed", approved + timedelta(minutes=1), due_at=new_due,
                      step="buyer_return_shipping")
    assert out.problem is None and driver.case is not None
    assert driver.case.step_due_at == new_due
    # without a step, exactly at the step's start is within the step
    at_start = driver.send("deadline.changed", approved, due_at=new_due + timedelta(days=1))
    assert at_start.problem is None


# ---- rule files: every refusal names its line and reason ---------------------------------

RULE_A = """[[rule]]
id = "return_refund.merchant_response"
kind = "return_refund"
step = "merchant_response"
party = "merchant"
duration = "48h"
on_timeout = "auto_approve"
reminders = ["1h"]
"""
RULE_B = RULE_A.replace("return_refund", "exchange")
HEADER = '[ruleset]\nname = "acme"\nversion = "v1"\neffective = 2026-01-01\n'


def _refusal(tmp_path: Path, text: str) -> tuple[int | None, str]:
    import shutil

    from shared.domain import RuleBook, RuleFileError

    folder = tmp_path / "rules"
    folder.mkdir()
    shutil.copy(Path(__file__).resolve().parents[3] / "shared" / "rules" / "default.toml",
                folder / "default.toml")
    (folder / "acme.toml").write_text(text, encoding="utf-8")
    with pytest.raises(RuleFileError) as info:
        RuleBook.load(folder)
    assert info.value.path.endswith("acme.toml")
    return info.value.line, str(info.value)


def _line_of(text: str, needle: str, nth: int = 0) -> int:
    return [i for i, line in enumerate(text.splitlines(), 1) if line.startswith(needle)][nth]


@pytest.mark.parametrize(("text", "needle", "nth", "reason"), [
    ("extra = 1\n" + HEADER + RULE_A, "extra", 0, "unknown top-level keys ['extra']"),
    (HEADER.replace('version = "v1"\n', 'version = "v1"\nowner = "x"\n') + RULE_A,
     "owner", 0, "unknown key 'owner' in [ruleset]"),
    (HEADER.replace('name = "acme"', 'name = ""') + RULE_A, "name", 0,
     "[ruleset] name must be a non-empty string"),
    (HEADER + RULE_A + RULE_B.replace('reminders = ["1h"]', 'reminders = "1h"'),
     "reminders", 1, "reminders must be a list"),
    (HEADER + RULE_A + RULE_B.replace('id = "exchange.merchant_response"',
                                      'id = "return_refund.merchant_response"'),
     "id", 1, "duplicate rule id 'return_refund.merchant_response'"),
    (HEADER + RULE_A + RULE_B.replace('kind = "exchange"', 'kind = "return_refund"'),
     "step", 1, "a second rule for kind return_refund, step merchant_response"),
    (HEADER + RULE_A + RULE_B.replace('party = "merchant"\n', ''), "[[rule]]", 1,
     "rule is missing ['party']"),
    (HEADER + RULE_A + RULE_B + 'colour = "red"\n', "colour", 0,
     "unknown key 'colour' in rule 'exchange.merchant_response'"),
])
def test_each_rule_file_refusal_names_the_line(tmp_path: Path, text: str, needle: str,
                                               nth: int, reason: str) -> None:
    line, message = _refusal(tmp_path, text)
    key = needle if needle == "[[rule]]" else f"{needle} ="
    assert line == _line_of(text, key, nth), message
    assert reason in message


def test_a_second_rule_for_a_step_is_refused_on_its_step_line(tmp_path: Path) -> None:
    text = HEADER + RULE_A + RULE_B.replace('kind = "exchange"', 'kind = "return_refund"')
    line, _message = _refusal(tmp_path, text)
    assert line is not None and line > _line_of(text, "[[rule]]", 1)


def test_no_rule_files_is_refused(tmp_path: Path) -> None:
    from shared.domain import RuleBook, RuleFileError

    with pytest.raises(RuleFileError, match="no rule files") as info:
        RuleBook.load(tmp_path)
    assert info.value.path == str(tmp_path)


def test_pro_rata_refuses_a_zero_whole_and_a_negative_total() -> None:
    from shared.domain.money import pro_rata_fen

    with pytest.raises(ValueError, match="whole must be positive, got 0"):
        pro_rata_fen(100, 0, 0)
    with pytest.raises(ValueError, match="total_fen must not be negative, got -1"):
        pro_rata_fen(-1, 1, 2)
    with pytest.raises(ValueError, match=r"part must be within 0\.\.2, got 3"):
        pro_rata_fen(100, 3, 2)
    assert pro_rata_fen(0, 0, 1) == 0


# ---- what decisions, reminders and their notices carry, in full --------------------------

def test_a_reminder_decision_and_notice_in_full(driver: Driver) -> None:
    from shared.domain import RuleRef

    driver.open("exchange", OPENED)
    reminder = driver.reminders[0]  # 24 h before
    now = reminder.due_at + timedelta(minutes=1)
    assert driver.case is not None
    out = driver.engine.fire(driver.case, reminder, now)
    (decision,) = out.decisions
    rule = RuleRef("kuaishou", "2022-09-30", "exchange.merchant_response")
    assert (decision.type, decision.case_id, decision.step, decision.rule) == (
        "reminder.due_soon", "AS1", "merchant_response", rule)
    assert decision.due_at == reminder.deadline_at and decision.decided_at == now
    assert decision.data == {"remind_at": reminder.due_at.isoformat(), "lead_s": 24 * 3600,
                             "action_on_timeout": "auto_approve"}
    assert decision.key == (f"AS1:merchant_response:reminder:"
                            f"{reminder.deadline_at.isoformat()}:{reminder.due_at.isoformat()}")
    (notice,) = out.notices
    assert (notice.reason, notice.party, notice.due_at, notice.urgent) == (
        "reminder.due_soon", "merchant", reminder.deadline_at, False)
    assert notice.params["action_on_timeout"] == "auto_approve"
    assert out.case == driver.case and out.deadlines is None


def test_a_platform_step_reminder_goes_to_ops_and_a_short_one_is_urgent(
    driver: Driver,
) -> None:
    driver.open("refund_only", OPENED)
    driver.send("merchant.approved", OPENED + timedelta(hours=1))
    assert driver.step == "refund_pending" and driver.case is not None
    spec = replace(driver.deadline, purpose="reminder", action="remind",
                   due_at=driver.deadline.deadline_at - timedelta(hours=12))
    out = driver.engine.fire(driver.case, spec, spec.due_at)
    assert [(n.party, n.urgent) for n in out.notices] == [("ops", True)]
    longer = replace(spec, due_at=spec.deadline_at - timedelta(hours=12, seconds=1))
    out = driver.engine.fire(driver.case, longer, longer.due_at)
    assert [(n.party, n.urgent) for n in out.notices] == [("ops", False)]


def test_an_automatic_close_decision_and_its_notice_in_full(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    driver.send("merchant.approved", OPENED + timedelta(hours=1))
    spec = driver.deadline
    now = spec.due_at + timedelta(minutes=2)
    assert driver.case is not None
    out = driver.engine.fire(driver.case, spec, now)
    (decision,) = out.decisions
    assert decision.type == "decision.auto_closed" and decision.case_id == "AS1"
    assert decision.data == {"action": "auto_close", "missed_step": "buyer_return_shipping",
                             "resolution": "auto_closed", "next_step": "closed"}
    assert decision.key == f"AS1:buyer_return_shipping:deadline:{spec.deadline_at.isoformat()}"
    (notice,) = out.notices
    assert (notice.reason, notice.party, notice.step, notice.due_at, notice.urgent) == (
        "decision.auto_closed", "buyer", "buyer_return_shipping", spec.deadline_at, False)
    assert {k: notice.params[k] for k in (
        "kind", "step", "missed_step", "missed_party", "action", "decision_key", "next_step",
        "next_party", "next_due_at", "resolution", "order_id", "shop_id", "amount_fen")} == {
        "kind": "exchange", "step": "buyer_return_shipping",
        "missed_step": "buyer_return_shipping", "missed_party": "buyer",
        "action": "auto_close", "decision_key": decision.key, "next_step": "closed",
        "next_party": None, "next_due_at": None, "resolution": "auto_closed",
        "order_id": "O1", "shop_id": "S1", "amount_fen": 10000}
    assert out.case is not None
    assert out.case.data["decided"][decision.key] == {
        "id": decision_id(decision.key), "type": "decision.auto_closed",
        "step": "buyer_return_shipping", "party": "buyer",
        "due_at": spec.deadline_at.isoformat(),
        "rule": ["kuaishou", "2022-09-30", "exchange.buyer_return_shipping"]}
    assert out.case.closed_at == spec.deadline_at
    assert out.case.data["closed_at_step"] == "buyer_return_shipping"


def test_an_automatic_refund_names_the_amount_and_who_acts_next(driver: Driver) -> None:
    driver.open("return_refund", OPENED, amount_fen=7300)
    driver.send("merchant.approved", OPENED + timedelta(hours=1))
    driver.send("buyer.shipped", OPENED + timedelta(hours=2))
    driver.send("merchant.received", OPENED + timedelta(hours=3))
    out = driver.fire()
    (decision,) = out.decisions
    assert decision.data == {"action": "auto_refund", "missed_step": "merchant_inspection",
                             "next_step": "refund_pending", "refund_fen": 7300}
    (notice,) = out.notices
    assert notice.params["next_party"] == "platform"
    assert driver.case is not None
    assert notice.params["next_due_at"] == driver.case.step_due_at.isoformat()


def test_the_superseded_notice_carries_what_the_templates_need(engine: Engine) -> None:
    opening = make_event("case.opened", OPENED, kind="refund_only", amount_fen=500)
    opened = engine.apply(None, opening, OPENED)
    assert opened.case is not None and opened.deadlines
    spec = next(s for s in opened.deadlines if s.purpose == "deadline")
    fired = engine.fire(opened.case, spec, spec.due_at)
    assert fired.case is not None
    late = make_event("merchant.rejected", OPENED + timedelta(hours=1), reason="no",
    evidence=["https://img.example/proof.jpg"])
    out = engine.replay(fired.case, [opening, late], spec.due_at, arrived=[late.event_id])
    assert out.case is not None
    notices = [n for n in out.notices if n.reason == "decision.superseded"]
    assert [n.party for n in notices] == ["ops", "merchant"]
    for notice in notices:
        assert notice.case_id == "AS1" and notice.urgent is False
        assert notice.step == "merchant_response" and notice.due_at == spec.deadline_at
        assert notice.params == {
            "kind": "refund_only", "step": "merchant_response",
            "missed_step": "merchant_response", "next_step": "buyer_after_rejection",
            "next_due_at": out.case.step_due_at.isoformat() if out.case.step_due_at else None,
            "superseded_type": "decision.auto_approved", "order_id": "O1", "shop_id": "S1",
            "amount_fen": 500, "refund_fen": None,
            "supersedes": decision_id(fired.decisions[0].key),
            "due_at_local": "2026-11-04 10:00"}


def test_replay_fires_a_deadline_exactly_at_the_timers_horizon(engine: Engine) -> None:
    opening = make_event("case.opened", OPENED, kind="refund_only", amount_fen=500)
    opened = engine.apply(None, opening, OPENED)
    assert opened.case is not None and opened.deadlines
    spec = next(s for s in opened.deadlines if s.purpose == "deadline")
    fired = engine.fire(opened.case, spec, spec.due_at)
    assert fired.case is not None
    # a late fact that changes nothing about that deadline: it stays decided, not re-sent
    note = make_event("intervention.requested", spec.deadline_at + timedelta(hours=1))
    seen = engine.replay(fired.case, [opening, note], spec.due_at, arrived=[note.event_id])
    assert seen.case is not None and seen.decisions == ()
    assert seen.case.data["decided"] == fired.case.data["decided"]
    assert seen.case.data["timer_until"] == spec.deadline_at.isoformat()
    assert seen.rebuilt and seen.applied


def test_replay_judges_early_events_as_the_case_opens(engine: Engine) -> None:
    fits = make_event("merchant.approved", OPENED - timedelta(minutes=5))
    misfit = make_event("buyer.confirmed", OPENED - timedelta(minutes=4))
    opening = make_event("case.opened", OPENED, kind="exchange", amount_fen=500)
    out = engine.replay(None, [fits, misfit, opening], OPENED,
                        arrived=[fits.event_id, misfit.event_id, opening.event_id])
    assert out.case is not None and out.case.step == "buyer_return_shipping"
    assert out.verdicts[fits.event_id] is None and out.verdicts[opening.event_id] is None
    assert (out.verdicts[misfit.event_id] or "").startswith("out_of_state")
    assert sorted(n.reason for n in out.notices) == ["case.opened", "merchant.approved"]
    quiet = engine.replay(None, [fits, opening], OPENED, arrived=[])
    assert quiet.notices == ()  # nothing is news


# ---- closing, interventions, visits, vouchers: the state in full -------------------------

def test_a_closed_case_keeps_no_clock_and_no_rule(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    at = OPENED + timedelta(hours=2)
    driver.send("buyer.cancelled", at)
    case = driver.case
    assert case is not None
    assert (case.status, case.step, case.resolution, case.closed_at) == (
        "closed", "closed", "cancelled", at)
    assert case.step_started_at == at and case.step_due_at is None
    assert case.paused_remaining_s is None
    assert (case.rule_set, case.rule_version, case.rule_id) == ("", "", None)
    assert case.data["closed_at_step"] == "merchant_response"


def test_a_closed_paused_case_drops_the_paused_clock(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    driver.send("intervention.requested", OPENED + timedelta(hours=1))
    assert driver.case is not None and driver.case.paused_remaining_s is not None
    driver.send("intervention.resolved", OPENED + timedelta(hours=2), outcome="merchant")
    case = driver.case
    assert case.resolution == "merchant_upheld" and case.paused_remaining_s is None
    assert "interrupted" not in case.data
    assert case.data["closed_at_step"] == "intervention"


def test_the_end_of_an_intervention_is_a_step_the_platform_met(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    driver.send("intervention.requested", OPENED + timedelta(hours=1))
    out = driver.send("intervention.resolved", OPENED + timedelta(hours=4), outcome="refund")
    assert [(s.step, s.party, s.met, s.seconds) for s in out.steps] == [
        ("intervention", "platform", True, 3 * 3600.0)]
    assert driver.step == "refund_pending" and driver.case is not None
    assert "interrupted" not in driver.case.data


def test_entering_a_step_records_its_rule(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    driver.send("merchant.approved", OPENED + timedelta(hours=1))
    case = driver.case
    assert case is not None
    assert (case.rule_set, case.rule_version, case.rule_id) == (
        "kuaishou", "2022-09-30", "exchange.buyer_return_shipping")
    assert "rejected_at_step" not in case.data


def test_a_rejection_after_a_rejection_keeps_where_it_was_rejected(driver: Driver) -> None:
    driver.open("return_refund", OPENED)
    driver.send("merchant.rejected", OPENED + timedelta(hours=1), reason="no",
    evidence=["https://img.example/proof.jpg"])
    assert driver.case is not None
    assert driver.case.data["rejected_at_step"] == "merchant_response"


def test_a_scheduled_visit_records_its_slot(driver: Driver) -> None:
    driver.open("onsite_repair", OPENED)
    driver.send("repair.scheduled", OPENED + timedelta(hours=1),
                visit_at="2026-11-04T14:00:00+08:00", visit_until="2026-11-04T16:00:00+08:00")
    case = driver.case
    assert case is not None
    assert case.data["visit_at"] == "2026-11-04T06:00:00+00:00"
    assert case.data["visit_until"] == "2026-11-04T08:00:00+00:00"
    assert driver.due_local() == cst(2026, 11, 4, 18)  # slot end + the set's 2 h grace
    # a slot that ends before it starts is read as the start
    driver.send("repair.scheduled", OPENED + timedelta(hours=2),
                visit_at="2026-11-05T14:00:00+08:00", visit_until="2026-11-05T10:00:00+08:00")
    assert driver.case is not None
    assert driver.case.data["visit_until"] == "2026-11-05T06:00:00+00:00"


@pytest.mark.parametrize(("kwargs", "refund"), [
    ({}, 9000), ({"used_fen": 0}, 9000), ({"used_fen": 9000}, 0), ({"used_fen": 1}, 8999),
    ({"total_count": 3}, 9000), ({"used_count": 0}, 9000), ({"used_count": 1}, 0),
    ({"total_count": 3, "used_count": 1}, 6000), ({"total_count": 3, "used_count": 3}, 0),
])
def test_voucher_refunds_by_count_or_value(kwargs: dict[str, int], refund: int) -> None:
    from shared.domain.money import voucher_refund_fen

    assert voucher_refund_fen(9000, **kwargs) == refund


@pytest.mark.parametrize("kwargs", [{"used_fen": -1}, {"used_fen": 9001},
                                    {"used_count": 2}, {"total_count": 1, "used_count": 2}])
def test_voucher_refunds_refuse_impossible_use(kwargs: dict[str, int]) -> None:
    from shared.domain.money import voucher_refund_fen

    with pytest.raises(ValueError, match="must be within"):
        voucher_refund_fen(9000, **kwargs)


def test_more_rule_file_refusals_name_their_line(tmp_path: Path) -> None:
    cases = [
        (HEADER.replace("effective = 2026-01-01", 'effective = "soon"') + RULE_A,
         "effective =", 0, "[ruleset] effective must be a date like 2022-09-30"),
        (HEADER + RULE_A + RULE_B.replace('reminders = ["1h"]', 'reminders = ["1h", "2wd"]'),
         "reminders =", 1, "reminder offsets"),
        (HEADER + RULE_A + RULE_B + 'name = "x"\n', "name =", 1,
         "unknown key 'name' in rule 'exchange.merchant_response'"),
    ]
    for n, (text, key, nth, reason) in enumerate(cases):
        folder = tmp_path / str(n)
        folder.mkdir()
        line, message = _refusal(folder, text)
        assert line == _line_of(text, key, nth), message
        assert reason in message


def test_rule_files_without_a_default_set_are_laid_over_the_shipped_ones(
        tmp_path: Path) -> None:
    from shared.domain import RuleBook

    (tmp_path / "acme.toml").write_text(HEADER + RULE_A, encoding="utf-8")
    book = RuleBook.load(tmp_path)
    assert [v.version for v in book.versions("acme")] == ["v1"]
    assert book.versions("default")  # the shipped default set is never dropped


def test_a_platform_decision_tells_the_buyer_without_urgency(driver: Driver) -> None:
    out = driver.open("voucher_refund", OPENED, amount_fen=3000)
    decision_notices = [n for n in out.notices if n.reason == "decision.auto_approved"]
    assert [(n.party, n.urgent) for n in decision_notices] == [("buyer", False)]


def test_the_timer_reaching_a_withdrawn_decision_publishes_it_anew(driver: Driver) -> None:
    driver.open("refund_only", OPENED)
    assert driver.case is not None
    spec = driver.deadline
    key = decision_key("AS1", "merchant_response", 0, "deadline", spec.deadline_at)
    withdrawn = replace(driver.case, data={**driver.case.data, "withdrawn": {key: 2}})
    out = driver.engine.fire(withdrawn, spec, spec.due_at)
    assert [d.key for d in out.decisions] == [f"{key}:again:2"]
    assert out.case is not None
    assert out.case.data["decided"][key]["id"] == decision_id(f"{key}:again:2")


def test_a_withdrawn_buyer_decision_tells_ops_and_the_buyer(engine: Engine) -> None:
    opening = make_event("case.opened", OPENED, kind="exchange", amount_fen=500)
    approved = make_event("merchant.approved", OPENED + timedelta(hours=1))
    case = engine.apply(None, opening, OPENED).case
    assert case is not None
    out = engine.apply(case, approved, approved.occurred_at)
    assert out.case is not None and out.deadlines
    spec = next(s for s in out.deadlines if s.purpose == "deadline")
    closed = engine.fire(out.case, spec, spec.due_at)
    assert closed.case is not None and closed.case.resolution == "auto_closed"
    shipped = make_event("buyer.shipped", OPENED + timedelta(days=2), tracking_no="SF1")
    rebuilt = engine.replay(closed.case, [opening, approved, shipped], spec.due_at,
                            arrived=[shipped.event_id])
    assert rebuilt.problem is None and rebuilt.steps != ()
    assert [(s.step, s.met) for s in rebuilt.steps] == [("buyer_return_shipping", True)]
    assert sorted(n.party for n in rebuilt.notices if n.reason == "decision.superseded") == [
        "buyer", "ops"]
    late_misfit = make_event("buyer.confirmed", OPENED + timedelta(days=3))
    assert rebuilt.case is not None
    again = engine.replay(rebuilt.case, [opening, approved, shipped, late_misfit],
                          spec.due_at, arrived=[late_misfit.event_id])
    assert (again.problem or "").startswith("out_of_state")
    assert again.decisions == () and again.steps == ()


# ---- small value objects ------------------------------------------------------------------

def test_data_file_errors_carry_path_line_and_reason() -> None:
    from shared.domain import RuleFileError

    with_line = RuleFileError("r.toml", 3, "bad")
    assert (with_line.path, with_line.line, with_line.reason, str(with_line)) == (
        "r.toml", 3, "bad", "r.toml:3: bad")
    without = RuleFileError(Path("r.toml"), None, "bad")
    assert str(without) == "r.toml: bad" and without.line is None


def test_durations_parse_units_and_refuse_the_rest() -> None:
    from datetime import timedelta as td

    from shared.domain.durations import Duration

    assert Duration.parse(" 30m ").as_timedelta() == td(minutes=30)
    assert Duration.parse("2h").as_timedelta() == td(hours=2)
    assert Duration.parse("3d").as_timedelta() == td(days=3)
    with pytest.raises(ValueError, match="working days have no fixed length"):
        Duration.parse("7wd").as_timedelta()
    for bad in ("7", "h", "1.5h", 48):
        with pytest.raises(ValueError, match="bad duration"):
            Duration.parse(bad)  # type: ignore[arg-type]


def test_times_come_out_in_utc() -> None:
    from datetime import datetime as dt

    from shared.domain.timeutil import as_utc, parse_moment

    moment = parse_moment(dt(2026, 11, 2, 10, tzinfo=cst(2026, 1, 1).tzinfo))
    assert moment is not None and moment.utcoffset() == timedelta(0) and moment.hour == 2
    assert as_utc(dt(2026, 11, 2, 10)).tzinfo == UTC  # naive = China time
    assert as_utc(dt(2026, 11, 2, 10)).hour == 2


def test_a_case_snapshot_is_plain_json(driver: Driver) -> None:
    import json

    driver.open("exchange", OPENED)
    assert driver.case is not None
    snapshot = driver.case.to_dict()
    assert json.loads(json.dumps(snapshot)) == snapshot
    assert type(snapshot["contacts"]) is dict and type(snapshot["data"]) is dict
    assert snapshot["contacts"] is not driver.case.contacts
    assert snapshot["data"]["evidence"] == ["https://img/1.jpg"]
    again = type(driver.case).from_dict(snapshot)
    assert again.contacts == driver.case.contacts and again.contacts is not snapshot["contacts"]


def test_an_unreadable_holiday_file_names_itself(tmp_path: Path) -> None:
    from shared.domain import HolidayFileError, WorkCalendar

    missing = tmp_path / "nope.toml"
    with pytest.raises(HolidayFileError, match="cannot read") as info:
        WorkCalendar(missing)
    assert info.value.path == str(missing) and info.value.line is None
