"""A step keeps the rule version in force when it began, unless a newer version says it
applies to running steps; the what-if shows both."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from domain_support import Driver, cst

from shared.domain import Engine, RuleBook, WorkCalendar
from shared.domain.recompute import switch_running
from shared.domain.whatif import compare_case

VERSION = """[ruleset]
name = "acme"
version = "{version}"
effective = {effective}
{extra}
[[rule]]
id = "exchange.merchant_response"
kind = "exchange"
step = "merchant_response"
party = "merchant"
duration = "{duration}"
on_timeout = "auto_approve"
"""


def _engine(tmp_path: Path, applies: bool) -> Engine:
    folder = tmp_path / ("running" if applies else "kept")
    folder.mkdir()
    (folder / "v1.toml").write_text(VERSION.format(version="v1", effective="2026-01-01",
                                                   extra="", duration="48h"))
    (folder / "v2.toml").write_text(VERSION.format(
        version="v2", effective="2026-06-01", duration="24h",
        extra="applies_to_running = true\n" if applies else ""))
    return Engine(RuleBook.load(folder), WorkCalendar())


def _running_case(engine: Engine, opened: tuple[int, int, int, int]) -> Driver:
    driver = Driver(engine, platform="acme")
    driver.open("exchange", cst(*opened))
    assert driver.deadline.rule.version == "v1"  # the version in force when it began
    return driver


def test_a_version_for_running_steps_takes_over_a_step_still_running(tmp_path: Path) -> None:
    engine = _engine(tmp_path, applies=True)
    late = _running_case(engine, (2026, 5, 31, 12))  # v1: due 06-02 12:00
    assert late.case is not None
    switched = switch_running(engine, late.case, cst(2026, 6, 1, 8))
    assert switched is not None
    assert (switched.case.rule_version, switched.new_due_at) == ("v2", cst(2026, 6, 1, 12))
    assert switched.note()["reason"].startswith("rule version acme v2 applies to running")
    (deadline,) = switched.outcome.deadlines or ()
    assert deadline.rule.version == "v2" and deadline.fence == late.case.version + 1
    assert switched.outcome.notices[0].reason == "deadline.changed"
    # counted from the step's start, but never due before the version took effect
    early = _running_case(engine, (2026, 5, 30, 10))  # v1: due 06-01 10:00
    assert early.case is not None
    result = switch_running(engine, early.case, cst(2026, 6, 1, 8))
    assert result is not None and result.new_due_at == cst(2026, 6, 1, 0)
    # a step whose deadline passed before the version took effect keeps its version
    done = _running_case(engine, (2026, 5, 29, 10))
    assert done.case is not None and switch_running(engine, done.case, cst(2026, 6, 1, 8)) \
        is None
    # before the version takes effect, nothing happens
    assert switch_running(engine, late.case, cst(2026, 5, 31, 23)) is None


def test_without_the_flag_a_running_step_keeps_its_version(tmp_path: Path) -> None:
    engine = _engine(tmp_path, applies=False)
    driver = _running_case(engine, (2026, 5, 31, 12))
    assert driver.case is not None
    assert switch_running(engine, driver.case, cst(2026, 6, 1, 8)) is None
    new = Driver(engine, platform="acme")
    new.open("exchange", cst(2026, 6, 1, 8))
    assert new.deadline.rule.version == "v2"  # new steps take the new version


def test_what_if_shows_the_move_of_a_running_step(tmp_path: Path) -> None:
    current, proposed = _engine(tmp_path, applies=False), _engine(tmp_path, applies=True)
    driver = _running_case(current, (2026, 5, 31, 12))
    assert driver.case is not None
    now = cst(2026, 5, 31, 13)  # the version takes effect within the 7-day horizon
    compared = compare_case(current, proposed, driver.case, driver.deadline, now)
    assert (compared.old_due, compared.new_due) == (cst(2026, 6, 2, 12), cst(2026, 6, 1, 12))
    assert compared.shift_seconds == -timedelta(days=1).total_seconds()
    assert compared.after[0].at == cst(2026, 6, 1, 12)
    assert compared.before[0].at == cst(2026, 6, 2, 12)


def test_what_if_text_names_the_moves_the_decisions_and_an_example(tmp_path: Path) -> None:
    from aftersales_cli.whatif import render
    from shared.domain.whatif import WhatIfReport

    current, proposed = _engine(tmp_path, applies=False), _engine(tmp_path, applies=True)
    driver = _running_case(current, (2026, 5, 31, 12))
    assert driver.case is not None
    now = cst(2026, 5, 31, 13)
    report = WhatIfReport(now=now, open_cases=1)
    report.add(compare_case(current, proposed, driver.case, driver.deadline, now))
    text = render(report, "v2.toml", "rules")
    assert "pending deadlines that would move: 1 (earlier 1, later 0, unchanged 0)" in text
    assert "-1 day(s): 1" in text and "at most 24.0 h earlier" in text
    assert "next 24h: 0 -> 1" in text and "next 7d: 1 -> 1" in text
    assert "acme       exchange        merchant_response" in text
    assert "AS1 (acme exchange, merchant_response)" in text
