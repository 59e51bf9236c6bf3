"""Platform deadline overrides, reminders, stale and early firings, decision keys."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from domain_support import Driver, cst

OPENED = cst(2026, 11, 2, 10)


def test_due_at_on_the_entering_event_overrides_the_rule(driver: Driver) -> None:
    driver.open("exchange", OPENED, due_at=cst(2026, 11, 3, 18))
    assert driver.due_local() == cst(2026, 11, 3, 18)
    assert driver.case is not None and driver.case.data["deadline_source"] == "platform"
    # reminders follow the platform's deadline
    assert [r.due_at for r in driver.reminders] == [cst(2026, 11, 2, 18), cst(2026, 11, 3, 16)]


def test_due_at_overrides_only_the_step_it_enters(driver: Driver) -> None:
    driver.open("exchange", OPENED, due_at=cst(2026, 11, 3, 18))
    driver.send("merchant.approved", cst(2026, 11, 3, 9))
    assert driver.due_local() == cst(2026, 11, 13, 9)
    assert driver.case is not None and "deadline_source" not in driver.case.data


def test_deadline_changed_replaces_the_current_deadline(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    out = driver.send("deadline.changed", cst(2026, 11, 2, 11), due_at=cst(2026, 11, 5, 10))
    assert out.applied
    assert driver.due_local() == cst(2026, 11, 5, 10)
    assert driver.deadline.due_at == cst(2026, 11, 5, 10)
    assert driver.case is not None and driver.deadline.fence == driver.case.version
    assert [n.party for n in out.notices] == ["merchant"]
    fired = driver.fire()
    assert fired.decisions[0].due_at == cst(2026, 11, 5, 10)


def test_deadline_changed_without_due_at_is_invalid(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    out = driver.send("deadline.changed", cst(2026, 11, 2, 11))
    assert not out.applied and out.problem is not None and out.problem.startswith("invalid:")


def test_deadline_changed_while_paused_is_out_of_state(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    driver.send("intervention.requested", cst(2026, 11, 2, 11))
    out = driver.send("deadline.changed", cst(2026, 11, 2, 12), due_at=cst(2026, 11, 9))
    assert not out.applied and out.problem is not None
    assert out.problem.startswith("out_of_state:")


def test_reminder_offsets_24h_and_2h_before_the_deadline(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    assert [r.due_at for r in driver.reminders] == [cst(2026, 11, 3, 10), cst(2026, 11, 4, 8)]
    assert all(r.action == "remind" and r.deadline_at == cst(2026, 11, 4, 10)
               for r in driver.reminders)


def test_only_reminders_still_in_the_future_are_set(driver: Driver) -> None:
    driver.open("exchange", OPENED, now=OPENED + timedelta(hours=30))
    assert [r.due_at for r in driver.reminders] == [cst(2026, 11, 4, 8)]


def test_firing_a_reminder_changes_nothing_and_tells_the_party(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    before = driver.case
    first, second = driver.reminders
    out = driver.fire(first)
    assert out.applied and out.case == before and out.deadlines is None and out.steps == ()
    assert [d.type for d in out.decisions] == ["reminder.due_soon"]
    assert out.decisions[0].data["action_on_timeout"] == "auto_approve"
    assert [(n.reason, n.party, n.urgent) for n in out.notices] == [
        ("reminder.due_soon", "merchant", False)]
    out2 = driver.fire(second)  # 2 h before: must not wait for quiet hours
    assert out2.notices[0].urgent is True
    assert out.decisions[0].key != out2.decisions[0].key


def test_decision_key_is_stable_for_the_same_missed_deadline(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    case, spec = driver.case, driver.deadline
    assert case is not None
    first = driver.engine.fire(case, spec, spec.due_at + timedelta(minutes=1))
    again = driver.engine.fire(case, spec, spec.due_at + timedelta(hours=3))
    assert first.decisions[0].key == again.decisions[0].key
    assert first.decisions[0].key == (
        f"AS1:merchant_response:deadline:{spec.deadline_at.isoformat()}")


def test_a_deadline_of_an_older_version_is_stale(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    old = driver.deadline
    driver.send("merchant.approved", cst(2026, 11, 3, 9))
    before = driver.case
    out = driver.fire(old)
    assert not out.applied and out.problem is not None and out.problem.startswith("stale:")
    assert out.case == before and out.decisions == ()


def test_a_deadline_on_a_closed_case_is_stale(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    spec = driver.deadline
    driver.send("buyer.cancelled", cst(2026, 11, 2, 11))
    assert driver.case is not None
    out = driver.engine.fire(driver.case, replace(spec, fence=driver.case.version),
                             spec.due_at)
    assert out.problem is not None and out.problem.startswith("stale:")


def test_a_deadline_fired_before_it_is_due_is_refused(driver: Driver) -> None:
    driver.open("exchange", OPENED)
    assert driver.case is not None
    out = driver.engine.fire(driver.case, driver.deadline, OPENED + timedelta(hours=1))
    assert not out.applied and out.problem is not None and out.problem.startswith("early:")
