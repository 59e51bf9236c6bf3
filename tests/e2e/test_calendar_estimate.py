"""A working-day deadline reaching into a year without official holiday data, through the
real services: the case is opened and gets an estimated deadline (never an error); when
the year's schedule is supplied (holiday file + timer restart, or `aftersales calendar
recompute`), the deadline moves and the case's timeline says so."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from shared.db.session import Database
from tests.conftest import wait_for
from tests.estimated_year import (
    APPROVED_AT,
    ESTIMATED_DUE,
    FILE_DUE,
    HOLIDAY_FILE,
    MAX_FUTURE_S,
    YEAR,
)
from tests.harness import ROOT, System, publish_events

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def services(database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[System]:
    log_dir: Path = tmp_path_factory.mktemp("calendar-services")
    system = System({
        "AFTERSALES_DATABASE_URL": database_url,
        "AFTERSALES_AMQP_URL": amqp_url,
        "AFTERSALES_REDIS_PREFIX": f"aftersales-test:{log_dir.name}:",
        "AFTERSALES_EMAIL_TRANSPORT": "log",
        "AFTERSALES_TIMER_POLL_SECONDS": "0.2",
        "AFTERSALES_LOG_LEVEL": "INFO",
        "AFTERSALES_INTAKE_MAX_FUTURE_SECONDS": str(MAX_FUTURE_S),
    }, log_dir)
    system.start("intake", "timer")
    try:
        for service in ("intake", "timer"):
            wait_for(lambda s=service: system.metrics_ready(s), timeout=60,
                     what=f"{service} to serve metrics")
        yield system
    finally:
        system.stop()


def refund_case(case_id: str) -> list[dict[str, Any]]:
    """Opened the day before the approval; approved 31 December 10:00: money back within 7
    working days, all of them in YEAR."""
    base = {"platform": "kuaishou", "shop_id": "S1", "order_id": f"O-{case_id}",
            "case_id": case_id}
    return [
        {**base, "event_id": f"{case_id}-open", "type": "case.opened",
         "occurred_at": (APPROVED_AT - timedelta(days=1)).isoformat(),
         "data": {"kind": "refund_only", "amount_fen": 5000, "reason": "不想要了",
                  "buyer": {"phone": "13800000000"},
                  "merchant": {"email": "shop@example.com"}}},
        {**base, "event_id": f"{case_id}-ok", "type": "merchant.approved",
         "occurred_at": APPROVED_AT.isoformat(), "data": {}},
    ]


def aftersales(system: System, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aftersales_cli.cli", *args], cwd=ROOT,
                          env={**os.environ, **system.env}, capture_output=True, text=True,
                          timeout=120, check=True)


def pending_deadline(db: Database, case_id: str) -> Any:
    with db.transaction() as s:
        return s.execute(text(
            "SELECT deadline_at, calendar_source, fence FROM deadlines WHERE case_id = :c "
            "AND status = 'pending' AND purpose = 'deadline'"), {"c": case_id}).one_or_none()


def refund_deadline(db: Database, case_id: str) -> Any:
    """The pending deadline once the approval is applied. The two events are applied one
    after the other: until the second is, the pending deadline is the merchant's review
    (a fixed duration, no calendar), which is not the one this test is about."""
    row = pending_deadline(db, case_id)
    return row if row is not None and row.calendar_source is not None else None


def estimated_gauge(system: System) -> float | None:
    found = re.search(r"^aftersales_pending_deadlines_estimated (\S+)$",
                      system.metrics("timer"), re.M)
    return float(found.group(1)) if found else None


def test_estimated_deadline_then_official_data_moves_it(
    services: System, db: Database, amqp_url: str, tmp_path: Path
) -> None:
    # `db` starts from empty tables: the counts below are this test's cases only
    publish_events(amqp_url, refund_case("CAL-1"))
    row = wait_for(lambda: refund_deadline(db, "CAL-1"), timeout=60,
                   what="CAL-1's refund deadline")
    # opened and moved, not an error: its deadline stands on the estimate
    assert row.deadline_at == ESTIMATED_DUE
    assert row.calendar_source == "estimated"
    shown = json.loads(aftersales(services, "case", "show", "CAL-1", "--json").stdout)
    assert shown["case"]["calendar"] == {"source": "estimated", "estimated": True,
                                         "estimated_years": [YEAR]}
    assert "ESTIMATED" in aftersales(services, "case", "show", "CAL-1").stdout
    status = aftersales(services, "calendar", "status").stdout
    assert re.search(rf"^{YEAR}\s+estimated", status, re.M)
    assert f"{YEAR}: 1 deadline(s) in 1 case(s)" in status
    wait_for(lambda: estimated_gauge(services) == 1.0, timeout=30,
             what="the estimated-deadlines gauge to show CAL-1")

    # The schedule is published: the user adds it to the holiday file, restarts the timer.
    holiday_file = tmp_path / "holidays.toml"
    holiday_file.write_text(HOLIDAY_FILE, encoding="utf-8")
    services.env["AFTERSALES_HOLIDAYS"] = str(holiday_file)
    services.kill("timer", signal.SIGTERM)
    services.start("timer")
    moved = wait_for(lambda: (r := pending_deadline(db, "CAL-1")) is not None
                     and r.calendar_source == "file" and r, timeout=60,
                     what="the timer to recount CAL-1 on the holiday file")
    assert moved.deadline_at == FILE_DUE
    assert moved.fence == row.fence + 1
    shown = json.loads(aftersales(services, "case", "show", "CAL-1", "--json").stdout)
    notes = [t for t in shown["timeline"] if t["what"] == "note"]
    assert [n["type"] for n in notes] == ["calendar.recomputed"]
    assert datetime.fromisoformat(notes[0]["data"]["old_due_at"]) == row.deadline_at
    assert datetime.fromisoformat(notes[0]["data"]["new_due_at"]) == moved.deadline_at
    assert notes[0]["data"]["new_source"] == "file"
    assert shown["case"]["calendar"]["source"] == "file"
    assert shown["case"]["step_due_at"] is not None
    assert datetime.fromisoformat(shown["case"]["step_due_at"]) == moved.deadline_at
    wait_for(lambda: services.metrics_ready("timer") and estimated_gauge(services) == 0.0,
             timeout=60, what="the estimated-deadlines gauge to drop to 0")

    # Intake still runs with the old settings (no holiday file): its next case is again
    # estimated, and `aftersales calendar recompute` (with the file) recounts it.
    publish_events(amqp_url, refund_case("CAL-2"))
    second = wait_for(lambda: refund_deadline(db, "CAL-2"), timeout=60,
                      what="CAL-2's refund deadline")
    assert second.calendar_source == "estimated"
    out = aftersales(services, "calendar", "recompute").stdout
    assert "recounted on official data: 1 (earlier 1, later 0, same day 0)" in out
    assert f"moved {(FILE_DUE - ESTIMATED_DUE).days} day(s): 1" in out
    again = pending_deadline(db, "CAL-2")
    assert (again.deadline_at, again.calendar_source) == (
        FILE_DUE, "file")
    # nothing left to recount: a second run changes nothing
    assert "recounted on official data: 0" in aftersales(services, "calendar", "recompute").stdout
