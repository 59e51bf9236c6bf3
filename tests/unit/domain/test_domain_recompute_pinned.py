"""Recounting estimated working-day deadlines and switching running steps to a new rule
version (shared/domain/recompute.py), pinned the way ops and the shop see them (issue 14):
which deadline moves and by how much, who hears of it and what the timeline note says."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from domain_support import Driver, cst

from shared.domain import Engine, RuleBook, WorkCalendar
from shared.domain.calendar import CALENDAR_KEY, ESTIMATED, FILE
from shared.domain.recompute import (
    NOTE_TYPE,
    SWITCH_NOTE_TYPE,
    needs_recount,
    recount,
    switch_running,
)
from shared.domain.timeutil import as_utc

HEADER = """[ruleset]
name = "acme"
version = "{version}"
effective = {effective}
{extra}
"""

RULE = """
[[rule]]
id = "{kind}.{step}"
kind = "{kind}"
step = "{step}"
party = "{party}"
duration = "{duration}"
on_timeout = "{on_timeout}"
{extra}
"""


def _merchant_rule(duration: str) -> str:
    return RULE.format(kind="exchange", step="merchant_response", party="merchant",
                       duration=duration, on_timeout="auto_approve", extra="")


def _rules(tmp_path: Path, *versions: tuple[str, str, bool, str]) -> Path:
    """A folder of acme versions: (version, effective, applies_to_running, rules)."""
    folder = tmp_path / "rules"
    folder.mkdir(exist_ok=True)
    for version, effective, running, rules in versions:
        extra = "applies_to_running = true" if running else ""
        (folder / f"{version}.toml").write_text(
            HEADER.format(version=version, effective=effective, extra=extra) + rules)
    return folder


def _holidays(tmp_path: Path, text: str) -> Path:
    holiday_file = tmp_path / "holidays.toml"
    holiday_file.write_text(text, encoding="utf-8")
    return holiday_file


# ---- recounting an estimated deadline ---------------------------------------------------

def _estimated_exchange(tmp_path: Path) -> tuple[Path, Driver]:
    """An acme exchange whose merchant has 3 working days, asked on Wednesday 2026-12-30:
    12-31, (2027-01-01 New Year, estimated), Monday 01-04, Tuesday 01-05."""
    folder = _rules(tmp_path, ("v1", "2026-01-01", False, _merchant_rule("3wd")))
    driver = Driver(Engine(RuleBook.load(folder), WorkCalendar()), platform="acme")
    driver.open("exchange", cst(2026, 12, 30, 10))
    assert driver.due_local() == cst(2027, 1, 5, 10)
    assert driver.deadline.calendar == {
        "source": ESTIMATED, "estimated": True, "estimated_years": [2027]}
    return folder, driver


def _official(tmp_path: Path, folder: Path, holidays: str) -> Engine:
    """The engine once the official schedule (a holiday file) is known."""
    return Engine(RuleBook.load(folder), WorkCalendar(_holidays(tmp_path, holidays)))


def test_a_recount_that_moves_the_merchants_deadline_tells_the_merchant(
    tmp_path: Path,
) -> None:
    folder, driver = _estimated_exchange(tmp_path)
    case = driver.case
    assert case is not None and needs_recount(case)
    # the official 2027 schedule: 01-04 and 01-05 are also days off
    official = _official(
        tmp_path, folder, "[2027]\nholidays = [2027-01-01, 2027-01-04, 2027-01-05]\n")
    now = cst(2026, 12, 30, 12)
    result = recount(official, case, now)
    assert result is not None
    # 12-31, then Wednesday 01-06 and Thursday 01-07: two days later
    assert (result.old_due_at, result.new_due_at) == (cst(2027, 1, 5, 10), cst(2027, 1, 7, 10))
    assert result.shift_seconds == 2 * 86400
    assert (result.old_source, result.new_source) == (ESTIMATED, FILE)
    assert result.note_type == NOTE_TYPE == "calendar.recomputed"
    assert result.outcome.applied and result.outcome.problem is None
    changed = result.case
    assert changed.version == case.version + 1 and changed.step_due_at == cst(2027, 1, 7, 10)
    assert changed.step == case.step and changed.rule == case.rule
    # the case keeps what a later recount needs, now on the official data
    assert changed.data[CALENDAR_KEY] == {
        "source": FILE, "estimated": False, "anchor": as_utc(cst(2026, 12, 30, 10)).isoformat(),
        "workdays": 3, "rule_due": as_utc(cst(2027, 1, 7, 10)).isoformat()}
    assert not needs_recount(changed)
    (deadline,) = result.outcome.deadlines or ()
    assert (deadline.purpose, deadline.due_at, deadline.fence) == (
        "deadline", cst(2027, 1, 7, 10), case.version + 1)
    assert deadline.calendar == {"source": FILE, "estimated": False}
    # the merchant hears of the new deadline, as for the platform's deadline.changed
    (notice,) = result.outcome.notices
    assert (notice.reason, notice.case_id, notice.step, notice.party, notice.due_at,
            notice.urgent) == ("deadline.changed", case.case_id, "merchant_response",
                               "merchant", cst(2027, 1, 7, 10), False)
    assert dict(notice.params) == {
        "kind": "exchange", "step": "merchant_response", "order_id": case.order_id,
        "shop_id": case.shop_id, "amount_fen": case.amount_fen,
        "refund_fen": case.refund_fen, "due_at_local": "2027-01-07 10:00",
        "cause": "calendar.recomputed"}


def test_the_recount_note_states_both_deadlines_the_shift_and_the_rule(
    tmp_path: Path,
) -> None:
    folder, driver = _estimated_exchange(tmp_path)
    assert driver.case is not None
    official = _official(
        tmp_path, folder, "[2027]\nholidays = [2027-01-01, 2027-01-04, 2027-01-05]\n")
    result = recount(official, driver.case, cst(2026, 12, 30, 12))
    assert result is not None
    note = result.note()
    reason = note.pop("reason")
    assert note == {
        "step": "merchant_response",
        "old_due_at": as_utc(cst(2027, 1, 5, 10)).isoformat(),
        "new_due_at": as_utc(cst(2027, 1, 7, 10)).isoformat(),
        "shift_s": 2 * 86400,
        "old_source": ESTIMATED, "new_source": FILE,
        "case_version": driver.case.version + 1,
        "rule": {"set": "acme", "version": "v1", "id": "exchange.merchant_response"},
    }
    assert type(note["shift_s"]) is int
    assert FILE in reason and ESTIMATED in reason  # on which calendar, and what it was


def test_a_deadline_brought_forward_says_so_with_a_negative_shift(tmp_path: Path) -> None:
    folder, driver = _estimated_exchange(tmp_path)
    assert driver.case is not None
    # the official schedule keeps 01-01 off but makes Saturday 01-02 a make-up workday
    official = _official(
        tmp_path, folder, "[2027]\nholidays = [2027-01-01]\nworkdays = [2027-01-02]\n")
    result = recount(official, driver.case, cst(2026, 12, 30, 12))
    assert result is not None and result.new_due_at == cst(2027, 1, 4, 10)
    assert result.note()["shift_s"] == -86400
    (notice,) = result.outcome.notices
    assert notice.due_at == cst(2027, 1, 4, 10)
    assert notice.params["due_at_local"] == "2027-01-04 10:00"


def test_official_data_that_keeps_the_day_still_records_the_official_source(
    tmp_path: Path,
) -> None:
    folder, driver = _estimated_exchange(tmp_path)
    case = driver.case
    assert case is not None
    # same day off as estimated: the due day stays, but it now stands on official data
    official = _official(tmp_path, folder, "[2027]\nholidays = [2027-01-01]\n")
    result = recount(official, case, cst(2026, 12, 30, 12))
    assert result is not None
    assert result.new_due_at == result.old_due_at == cst(2027, 1, 5, 10)
    assert result.shift_seconds == 0 and result.note()["shift_s"] == 0
    assert result.case.version == case.version + 1
    assert result.case.data[CALENDAR_KEY]["source"] == FILE
    assert result.outcome.notices == ()  # nobody needs to hear of an unchanged deadline
    (deadline,) = result.outcome.deadlines or ()
    assert deadline.fence == case.version + 1


def test_still_estimated_and_the_same_day_is_not_a_recount(tmp_path: Path) -> None:
    folder, driver = _estimated_exchange(tmp_path)
    assert driver.case is not None
    # a file for another year changes nothing about 2027
    other = Engine(RuleBook.load(folder), WorkCalendar(_holidays(
        tmp_path, "[2030]\nholidays = [2030-01-01]\n")))
    assert recount(other, driver.case, cst(2026, 12, 30, 12)) is None


def test_a_platform_step_hears_nothing_of_its_recount(tmp_path: Path) -> None:
    # refund_pending is the platform's step (it pays): it is recounted but nobody is told
    driver = Driver(Engine(RuleBook.load(None), WorkCalendar()))
    driver.open("refund_only", cst(2026, 12, 22, 9))
    driver.send("merchant.approved", cst(2026, 12, 23, 10))
    assert driver.case is not None and driver.step == "refund_pending"
    official = Engine(RuleBook.load(None), WorkCalendar(_holidays(
        tmp_path, "[2027]\nholidays = [2027-01-01, 2027-01-04]\n")))
    result = recount(official, driver.case, cst(2026, 12, 24, 8))
    assert result is not None and result.new_due_at == cst(2027, 1, 5, 10)
    assert result.outcome.notices == ()


def test_only_an_open_case_with_an_estimated_own_deadline_needs_a_recount(
    tmp_path: Path,
) -> None:
    folder, driver = _estimated_exchange(tmp_path)
    case = driver.case
    assert case is not None and needs_recount(case)
    official = _official(tmp_path, folder, "[2027]\nholidays = [2027-01-01, 2027-01-04]\n")
    now = cst(2026, 12, 30, 12)
    record = dict(case.data[CALENDAR_KEY])
    not_needed = {
        "closed": replace(case, status="closed"),
        "no deadline": replace(case, step_due_at=None),
        "no calendar record": replace(case, data={
            k: v for k, v in case.data.items() if k != CALENDAR_KEY}),
        "record not a table": replace(case, data={**case.data, CALENDAR_KEY: "estimated"}),
        "official already": replace(case, data={
            **case.data, CALENDAR_KEY: {**record, "estimated": False}}),
        "platform set it": replace(case, data={**case.data, "deadline_source": "platform"}),
    }
    for why, other in not_needed.items():
        assert not needs_recount(other), why
        assert recount(official, other, now) is None, why
    assert needs_recount(replace(case, data={**case.data, "deadline_source": "rule"}))


def test_a_record_without_what_a_recount_needs_is_left_alone(tmp_path: Path) -> None:
    # written by an older version: no anchor, no rule_due, or no whole number of workdays
    folder, driver = _estimated_exchange(tmp_path)
    case = driver.case
    assert case is not None
    official = _official(tmp_path, folder, "[2027]\nholidays = [2027-01-01, 2027-01-04]\n")
    now = cst(2026, 12, 30, 12)
    record = dict(case.data[CALENDAR_KEY])
    assert recount(official, case, now) is not None
    for key, value in (("anchor", None), ("rule_due", None), ("workdays", "3"),
                       ("workdays", None)):
        broken = {**record, key: value}
        assert needs_recount(replace(case, data={**case.data, CALENDAR_KEY: broken}))
        assert recount(official, replace(case, data={**case.data, CALENDAR_KEY: broken}),
                       now) is None, key


# ---- a new version that applies to running steps ----------------------------------------

def _switch_engine(tmp_path: Path, old: str, new: str, *, effective: str = "2026-06-01"
                   ) -> Engine:
    folder = _rules(tmp_path, ("v1", "2026-01-01", False, _merchant_rule(old)),
                    ("v2", effective, True, _merchant_rule(new)))
    return Engine(RuleBook.load(folder), WorkCalendar())


def _exchange(engine: Engine, opened_at: tuple[int, ...]) -> Driver:
    driver = Driver(engine, platform="acme")
    driver.open("exchange", cst(*opened_at))
    assert driver.deadline.rule.version == "v1"
    return driver


def test_a_switched_step_tells_the_merchant_and_notes_both_versions(tmp_path: Path) -> None:
    engine = _switch_engine(tmp_path, "48h", "24h")
    driver = _exchange(engine, (2026, 5, 31, 12))  # v1: due 06-02 12:00
    case = driver.case
    assert case is not None
    result = switch_running(engine, case, cst(2026, 6, 1, 8))
    assert result is not None
    assert (result.old_due_at, result.new_due_at) == (cst(2026, 6, 2, 12), cst(2026, 6, 1, 12))
    assert result.shift_seconds == -86400
    assert result.note_type == SWITCH_NOTE_TYPE == "rules.applied_to_running_step"
    assert (result.old_source, result.new_source) == ("", "")
    assert result.outcome.applied and result.outcome.problem is None
    changed = result.case
    assert (changed.rule_set, changed.rule_version, changed.rule_id) == (
        "acme", "v2", "exchange.merchant_response")
    assert changed.version == case.version + 1 and changed.step_due_at == cst(2026, 6, 1, 12)
    assert changed.step_started_at == case.step_started_at
    assert CALENDAR_KEY not in changed.data  # 24 h: no calendar involved
    note = result.note()
    reason = note.pop("reason")
    assert note == {
        "step": "merchant_response", "old_due_at": as_utc(cst(2026, 6, 2, 12)).isoformat(),
        "new_due_at": as_utc(cst(2026, 6, 1, 12)).isoformat(), "shift_s": -86400,
        "old_source": "", "new_source": "", "case_version": case.version + 1,
        "rule": {"set": "acme", "version": "v2", "id": "exchange.merchant_response"},
    }
    # the note says which version took over, from when, and which one the step had
    assert "acme v2" in reason and "acme v1" in reason
    assert as_utc(cst(2026, 6, 1)).isoformat() in reason
    (notice,) = result.outcome.notices
    assert (notice.reason, notice.party, notice.step, notice.due_at, notice.urgent) == (
        "deadline.changed", "merchant", "merchant_response", cst(2026, 6, 1, 12), False)
    assert notice.params["cause"] == "rules.applied_to_running_step"
    assert notice.params["due_at_local"] == "2026-06-01 12:00"


def test_a_switch_is_judged_by_until_and_its_timers_by_now(tmp_path: Path) -> None:
    # v1 48 h with a reminder 30 h before; v2 (applies to running steps) 72 h, same reminder
    reminder = 'reminders = ["30h"]'
    folder = _rules(
        tmp_path,
        ("v1", "2026-01-01", False, RULE.format(
            kind="exchange", step="merchant_response", party="merchant", duration="48h",
            on_timeout="auto_approve", extra=reminder)),
        ("v2", "2026-06-01", True, RULE.format(
            kind="exchange", step="merchant_response", party="merchant", duration="72h",
            on_timeout="auto_approve", extra=reminder)))
    engine = Engine(RuleBook.load(folder), WorkCalendar())
    driver = _exchange(engine, (2026, 5, 31, 12))
    case = driver.case
    assert case is not None
    before = cst(2026, 5, 31, 23)  # the version is not yet in effect at `now`
    assert switch_running(engine, case, before) is None
    result = switch_running(engine, case, before, until=cst(2026, 6, 1, 8))
    assert result is not None and result.new_due_at == cst(2026, 6, 3, 12)
    # timers from `now`: the reminder 30 h before the new deadline (06-02 06:00) is ahead
    assert [(d.purpose, d.due_at) for d in result.outcome.deadlines or ()] == [
        ("deadline", cst(2026, 6, 3, 12)), ("reminder", cst(2026, 6, 2, 6))]
    later = switch_running(engine, case, cst(2026, 6, 2, 7))
    assert later is not None
    assert [d.purpose for d in later.outcome.deadlines or ()] == ["deadline"]


def test_a_deadline_falling_exactly_when_the_version_takes_effect_keeps_its_version(
    tmp_path: Path,
) -> None:
    engine = _switch_engine(tmp_path, "48h", "24h")
    exact = _exchange(engine, (2026, 5, 30, 0))  # v1: due 06-01 00:00, the effective moment
    assert exact.case is not None
    assert switch_running(engine, exact.case, cst(2026, 6, 1, 8)) is None
    second_later = _exchange(engine, (2026, 5, 30, 0, 1))
    assert second_later.case is not None
    result = switch_running(engine, second_later.case, cst(2026, 6, 1, 8))
    assert result is not None and result.new_due_at == cst(2026, 6, 1, 0)


def test_a_switch_from_working_days_to_hours_drops_the_calendar_record(
    tmp_path: Path,
) -> None:
    engine = _switch_engine(tmp_path, "3wd", "24h")
    driver = _exchange(engine, (2026, 5, 29, 12))  # Friday: due Wednesday 06-03 12:00
    case = driver.case
    assert case is not None and CALENDAR_KEY in case.data
    assert driver.due_local() == cst(2026, 6, 3, 12)
    result = switch_running(engine, case, cst(2026, 6, 1, 8))
    assert result is not None and result.new_due_at == cst(2026, 6, 1, 0)
    assert CALENDAR_KEY not in result.case.data
    (deadline,) = result.outcome.deadlines or ()
    assert deadline.calendar is None


def test_a_switch_to_working_days_records_what_the_count_stood_on(tmp_path: Path) -> None:
    engine = _switch_engine(tmp_path, "96h", "2wd")
    driver = _exchange(engine, (2026, 5, 29, 12))  # Friday; v1: due Tuesday 06-02 12:00
    case = driver.case
    assert case is not None and CALENDAR_KEY not in case.data
    result = switch_running(engine, case, cst(2026, 6, 1, 8))
    assert result is not None
    # two working days after Friday: Monday 06-01, Tuesday 06-02 at 12:00
    assert result.new_due_at == cst(2026, 6, 2, 12)
    assert result.case.data[CALENDAR_KEY] == {
        "source": "library", "estimated": False,
        "anchor": as_utc(cst(2026, 5, 29, 12)).isoformat(), "workdays": 2,
        "rule_due": as_utc(cst(2026, 6, 2, 12)).isoformat()}
    (deadline,) = result.outcome.deadlines or ()
    assert deadline.calendar == {"source": "library", "estimated": False}
    # the day did not move: nobody is told, but the step runs under v2 now
    assert result.outcome.notices == ()
    assert result.case.rule_version == "v2"


def test_a_switched_visit_deadline_counts_from_the_agreed_slot(tmp_path: Path) -> None:
    def visit(duration: str) -> str:
        return RULE.format(kind="onsite_repair", step="visit_scheduled", party="merchant",
                           duration=duration, on_timeout="auto_refund",
                           extra='anchor = "visit_until"')

    folder = _rules(tmp_path, ("v1", "2026-01-01", False, visit("24h")),
                    ("v2", "2026-06-01", True, visit("2h")))
    engine = Engine(RuleBook.load(folder), WorkCalendar())
    driver = Driver(engine, platform="acme")
    driver.open("onsite_repair", cst(2026, 5, 28, 10))
    driver.send("repair.scheduled", cst(2026, 5, 29, 9), visit_at="2026-06-03T14:00:00+08:00",
                visit_until="2026-06-03T16:00:00+08:00")
    assert driver.step == "visit_scheduled" and driver.due_local() == cst(2026, 6, 4, 16)
    case = driver.case
    assert case is not None
    result = switch_running(engine, case, cst(2026, 6, 1, 8))
    assert result is not None
    assert result.new_due_at == cst(2026, 6, 3, 18)  # 2 h after the slot ends
    # a case recorded without the slot's end counts from the step's start (05-29 09:00),
    # and so is due when the version took effect
    bare = replace(case, data={k: v for k, v in case.data.items() if k != "visit_until"})
    fallback = switch_running(engine, bare, cst(2026, 6, 1, 8))
    assert fallback is not None and fallback.new_due_at == cst(2026, 6, 1, 0)


def test_only_an_open_step_on_its_own_rule_deadline_is_switched(tmp_path: Path) -> None:
    engine = _switch_engine(tmp_path, "48h", "24h")
    driver = _exchange(engine, (2026, 5, 31, 12))
    case = driver.case
    assert case is not None
    now = cst(2026, 6, 1, 8)
    assert switch_running(engine, case, now) is not None
    for why, other in {
        "closed": replace(case, status="closed"),
        "no deadline": replace(case, step_due_at=None),
        "no rule": replace(case, rule_id=None),
        "platform set it": replace(case, data={**case.data, "deadline_source": "platform"}),
    }.items():
        assert switch_running(engine, other, now) is None, why
    # a deadline the platform set through deadline.changed stays
    driver.send("deadline.changed", cst(2026, 5, 31, 13), due_at=cst(2026, 6, 2, 18))
    assert driver.case is not None
    assert switch_running(engine, driver.case, now) is None


def test_a_step_already_on_the_new_version_is_not_switched_again(tmp_path: Path) -> None:
    engine = _switch_engine(tmp_path, "48h", "24h")
    driver = _exchange(engine, (2026, 5, 31, 12))
    assert driver.case is not None
    result = switch_running(engine, driver.case, cst(2026, 6, 1, 8))
    assert result is not None
    assert switch_running(engine, result.case, cst(2026, 6, 1, 9)) is None
    assert result.shift_seconds == -timedelta(days=1).total_seconds()


def test_a_switch_from_the_default_set_names_the_platforms_set_and_rule(
    tmp_path: Path,
) -> None:
    # acme v1 says nothing about exchanges (the default set's 48 h applies); v2 does
    refund = RULE.format(kind="refund_only", step="merchant_response", party="merchant",
                         duration="48h", on_timeout="auto_approve", extra="")
    fast = RULE.format(kind="exchange", step="merchant_response", party="merchant",
                       duration="24h", on_timeout="auto_approve", extra="").replace(
        'id = "exchange.merchant_response"', 'id = "exchange.fast_answer"')
    folder = _rules(tmp_path, ("v1", "2026-01-01", False, refund),
                    ("v2", "2026-06-01", True, refund + fast))
    engine = Engine(RuleBook.load(folder), WorkCalendar())
    driver = Driver(engine, platform="acme")
    driver.open("exchange", cst(2026, 5, 31, 12))
    case = driver.case
    assert case is not None and case.rule_set == "default"
    result = switch_running(engine, case, cst(2026, 6, 1, 8))
    assert result is not None and result.new_due_at == cst(2026, 6, 1, 12)
    assert (result.case.rule_set, result.case.rule_version, result.case.rule_id) == (
        "acme", "v2", "exchange.fast_answer")
    assert result.note()["rule"] == {"set": "acme", "version": "v2",
                                     "id": "exchange.fast_answer"}
    assert "was default" in result.note()["reason"]
    (deadline,) = result.outcome.deadlines or ()
    assert deadline.rule == result.case.rule


def _shop_exchange_before_v2(tmp_path: Path) -> tuple[Engine, Driver]:
    """An exchange of shop S1 opened 2026-05-31 12:00 under acme v1 (48h); v2 (24h)
    applies to running steps from 2026-06-01; S1 promises 20 h, tighter than both."""
    folder = _rules(tmp_path, ("v1", "2026-01-01", False, _merchant_rule("48h")),
                    ("v2", "2026-06-01", True, _merchant_rule("24h")))
    (folder / "shop-S1.toml").write_text(
        '[shop_policy]\nplatform = "acme"\nshop_id = "S1"\nversion = "s1"\n'
        'effective = 2026-01-01\n\n[[rule]]\nkind = "exchange"\nstep = "merchant_response"\n'
        'duration = "20h"\n')
    engine = Engine(RuleBook.load(folder), WorkCalendar())
    driver = Driver(engine, platform="acme")
    driver.open("exchange", cst(2026, 5, 31, 12))
    return engine, driver


def test_a_shops_own_policy_still_holds_after_the_switch(tmp_path: Path) -> None:
    engine, driver = _shop_exchange_before_v2(tmp_path)
    case = driver.case
    assert case is not None and driver.due_local() == cst(2026, 6, 1, 8)
    assert case.rule_id == "acme/v1/exchange.merchant_response"
    result = switch_running(engine, case, cst(2026, 6, 1, 7))
    assert result is not None
    # the shop's rule now stands on v2, and the shop's 20 h still decides the deadline
    assert (result.case.rule_set, result.case.rule_id) == (
        "shop:acme:S1", "acme/v2/exchange.merchant_response")
    assert result.new_due_at == cst(2026, 6, 1, 8)
    assert result.outcome.notices == ()  # the day did not move: nobody is told


def test_the_note_of_a_shops_switched_step_names_the_platform_versions(
    tmp_path: Path,
) -> None:
    engine, driver = _shop_exchange_before_v2(tmp_path)
    assert driver.case is not None
    result = switch_running(engine, driver.case, cst(2026, 6, 1, 7))
    assert result is not None
    reason = result.note()["reason"]
    assert "acme v2" in reason and "acme v1" in reason
    assert reason.count("shop:acme:S1 s1") == 2  # the shop's policy shortens both
