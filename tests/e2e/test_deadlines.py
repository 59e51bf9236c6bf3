"""Timer and resolver on the real services: deadlines fire once, on time, and only while
their step is still open."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from shared.db.session import Database
from tests.conftest import wait_for
from tests.harness import DecisionTap, System, process_group_members, publish_events

pytestmark = pytest.mark.e2e


def now() -> datetime:
    return datetime.now(UTC)


def event(event_id: str, type_: str, case_id: str, *, due_in: float | None = None,
          data: dict[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "event_id": event_id, "type": type_, "occurred_at": now().isoformat(),
        "platform": "kuaishou", "shop_id": "S1", "order_id": f"O-{case_id}",
        "case_id": case_id, "data": data or {},
    }
    if due_in is not None:
        doc["due_at"] = (now() + timedelta(seconds=due_in)).isoformat()
    return doc


def opened(case_id: str, due_in: float | None, kind: str = "exchange") -> dict[str, Any]:
    return event(f"{case_id}-open", "case.opened", case_id, due_in=due_in, data={
        "kind": kind, "amount_fen": 5000, "reason": "质量问题",
        "buyer": {"phone": "13800000000"}, "merchant": {"email": "shop@example.com"},
    })


def decisions_for(tap: DecisionTap, case_id: str) -> list[dict[str, Any]]:
    return [m for m in tap.snapshot() if m["case_id"] == case_id]


def test_a_case_past_its_platform_deadline_is_auto_approved(
    system: System, db: Database, amqp_url: str
) -> None:
    with DecisionTap(amqp_url) as tap:
        publish_events(amqp_url, [opened("E2E-A1", due_in=3)])
        got = wait_for(lambda: decisions_for(tap, "E2E-A1"), timeout=60,
                       what="a decision for E2E-A1")
    decision = got[0]
    assert decision["type"] == "decision.auto_approved"
    assert decision["step"] == "merchant_response"
    assert decision["rule"] == {"set": "kuaishou", "version": "2022-09-30",
                                "id": "exchange.merchant_response"}
    assert datetime.fromisoformat(decision["decided_at"]) >= datetime.fromisoformat(
        decision["due_at"])
    assert {"decision_id", "order_id", "shop_id", "platform", "data"} <= decision.keys()


def test_a_case_approved_in_time_gets_no_decision(
    system: System, db: Database, amqp_url: str
) -> None:
    with DecisionTap(amqp_url) as tap:
        publish_events(amqp_url, [
            opened("E2E-B1", due_in=3),
            event("E2E-B1-ok", "merchant.approved", "E2E-B1"),
            opened("E2E-B2-marker", due_in=5),  # comes due after E2E-B1's old deadline
        ])
        wait_for(lambda: decisions_for(tap, "E2E-B2-marker"), timeout=60,
                 what="the marker's decision")
        assert decisions_for(tap, "E2E-B1") == []


def test_deadline_changed_moves_the_firing(
    system: System, db: Database, amqp_url: str
) -> None:
    with DecisionTap(amqp_url) as tap:
        publish_events(amqp_url, [
            opened("E2E-C1", due_in=3),
            # Well after the marker's: on a slow host the marker may be decided seconds late.
            event("E2E-C1-move", "deadline.changed", "E2E-C1", due_in=20),
            opened("E2E-C2-marker", due_in=5),
        ])
        wait_for(lambda: decisions_for(tap, "E2E-C2-marker"), timeout=60,
                 what="the marker's decision")
        assert decisions_for(tap, "E2E-C1") == []  # the old time passed: nothing
        got = wait_for(lambda: decisions_for(tap, "E2E-C1"), timeout=60,
                       what="the moved deadline's decision")
    assert len(got) == 1
    assert datetime.fromisoformat(got[0]["decided_at"]) >= datetime.fromisoformat(
        got[0]["due_at"])


def test_an_exchange_approved_but_never_shipped_is_auto_closed(
    system: System, db: Database, amqp_url: str
) -> None:
    with DecisionTap(amqp_url) as tap:
        publish_events(amqp_url, [
            opened("E2E-D1", due_in=3600),
            # The platform's own deadline for the next step (buyer ships back) wins.
            event("E2E-D1-ok", "merchant.approved", "E2E-D1", due_in=3),
        ])
        got = wait_for(lambda: decisions_for(tap, "E2E-D1"), timeout=60,
                       what="the auto-close")
    assert [d["type"] for d in got] == ["decision.auto_closed"]
    assert got[0]["step"] == "buyer_return_shipping"


def test_the_notifier_runs_at_a_lower_cpu_priority_than_the_rest(system: System) -> None:
    """Where the services share CPUs, a notification waits before an intake commit does
    (AFTERSALES_NOTIFIER_NICE, 10 by default)."""

    def niceness(service: str, worker: str) -> set[int]:
        pgid = system.procs[service].pid
        wait_for(lambda: any(comm == worker for _pid, comm in process_group_members(pgid)),
                 timeout=30, what=f"{service}'s worker process")
        # field 19 of proc(5) is the nice value
        return {int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
                for pid, _comm in process_group_members(pgid)}

    assert niceness("notifier", "as-notifier") == {10}  # supervisor and workers
    assert niceness("intake", "as-intake") == {0}
    assert niceness("resolver", "as-resolver") == {0}

    # Each service runs in a session of its own, and Linux's autogroups share the CPU
    # between sessions before niceness counts: the notifier's session must be lowered too,
    # or its niceness changes nothing against intake.
    def session_niceness(service: str) -> int:
        group = Path(f"/proc/{system.procs[service].pid}/autogroup").read_text()
        return int(group.rsplit("nice", 1)[1])

    if not Path("/proc/self/autogroup").exists():
        return  # a kernel without autogroups: the niceness above is all that counts
    assert session_niceness("notifier") == 10
    assert session_niceness("intake") == 0
    assert session_niceness("resolver") == 0
