"""SIGTERM to every service in the middle of a burst (events arriving, deadlines coming
due, decisions and notifications in flight): each exits within its grace, and after a
restart nothing is lost: every event applied once, one decision per case on a queue of
our own bound to `aftersales.decisions`, no notification failed "unknown"."""

from __future__ import annotations

import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from shared.db.session import Database
from tests.conftest import wait_for
from tests.harness import DecisionTap, System, process_group_members, publish_events

pytestmark = pytest.mark.e2e

SERVICES = ("intake", "timer", "resolver", "notifier")
GRACE = 8.0
CASES = 400


def readyz(system: System, service: str) -> int:
    try:
        with urllib.request.urlopen(
                f"http://127.0.0.1:{system.ports[service]}/readyz", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


@pytest.fixture(scope="module")
def graceful_system(database_url: str, amqp_url: str,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    log_dir: Path = tmp_path_factory.mktemp("shutdown")
    system = System({
        "AFTERSALES_DATABASE_URL": database_url,
        "AFTERSALES_AMQP_URL": amqp_url,
        "AFTERSALES_REDIS_PREFIX": f"aftersales-test:{log_dir.name}:",
        "AFTERSALES_EMAIL_TRANSPORT": "log",
        "AFTERSALES_TIMER_POLL_SECONDS": "0.1",
        "AFTERSALES_OUTBOX_POLL_SECONDS": "0.1",
        "AFTERSALES_TIMER_REDISPATCH_SECONDS": "10",
        "AFTERSALES_QUIET_HOURS": "",
        "AFTERSALES_SHUTDOWN_GRACE_SECONDS": str(GRACE),
    }, log_dir)
    try:
        yield system
    finally:
        system.stop()


def count(db: Database, sql: str, **params: Any) -> int:
    try:
        with db.transaction() as s:
            return int(s.execute(text(sql), params).scalar_one())
    except Exception:
        return -1


def opened(case_id: str, due_in: float) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "event_id": f"{case_id}-open", "type": "case.opened", "occurred_at": now.isoformat(),
        "platform": "kuaishou", "shop_id": "S1", "order_id": f"O-{case_id}",
        "case_id": case_id, "due_at": (now + timedelta(seconds=due_in)).isoformat(),
        "data": {"kind": "exchange", "amount_fen": 5000, "reason": "质量问题",
                 "buyer": {"phone": "13800000000"}, "merchant": {"email": "s@example.com"}},
    }


def stop_all(system: System) -> dict[str, float]:
    """SIGTERM to each supervisor at once (as a container runtime sends it); how long each
    process tree took to be gone."""
    procs = {name: system.procs.pop(name) for name in SERVICES}
    started = time.monotonic()
    for proc in procs.values():
        proc.send_signal(signal.SIGTERM)
    took: dict[str, float] = {}
    for name, proc in procs.items():
        proc.wait(timeout=GRACE * 3)
        wait_for(lambda p=proc: not process_group_members(p.pid), timeout=GRACE * 3,
                 interval=0.02, what=f"{name}'s workers to be gone")
        took[name] = round(time.monotonic() - started, 2)
    return took


@pytest.mark.timeout(600)
def test_sigterm_during_a_burst_loses_nothing_and_exits_within_the_grace(
    graceful_system: System, db: Database, amqp_url: str
) -> None:
    system = graceful_system
    system.start(*SERVICES)
    for service in SERVICES:
        wait_for(lambda s=service: readyz(system, s) == 200, timeout=90,
                 what=f"{service} to be ready")
    cases = [f"TERM-{i:04d}" for i in range(CASES)]
    with DecisionTap(amqp_url) as tap:
        burst = threading.Thread(target=publish_events, args=(
            # Due over 16 s: on a slow host the events may take seconds to be logged, and
            # deadlines must still be coming due when the signal comes.
            amqp_url, [opened(c, due_in=2 + 16 * i / CASES) for i, c in enumerate(cases)]))
        burst.start()
        # Live work in every stage when the signal comes.
        wait_for(lambda: count(db, "SELECT count(*) FROM decisions") >= 20, timeout=120,
                 what="deadlines being decided")
        at_stop = {
            "events": count(db, "SELECT count(*) FROM case_events"),
            "decided": count(db, "SELECT count(*) FROM decisions"),
            "notified": count(db, "SELECT count(*) FROM notifications WHERE status = 'sent'"),
        }
        took = stop_all(system)
        burst.join(120)
        system.start(*SERVICES)
        wait_for(lambda: count(db, "SELECT count(*) FROM case_events") == CASES, timeout=180,
                 what="every event logged")
        wait_for(lambda: len({m["case_id"] for m in tap.snapshot()}) >= CASES, timeout=180,
                 what="a decision for every case")
        messages = tap.catch_up()
    per_case = Counter(m["case_id"] for m in messages)
    distinct = {m["decision_id"] for m in messages}
    unknown = count(db, "SELECT count(*) FROM notifications WHERE last_error LIKE 'unknown%'")
    print(f"\n[fault report] SIGTERM during a burst: cases={CASES}, grace_s={GRACE}, "
          f"exit_s={took}, at_stop={at_stop}, decisions={len(distinct)}, "
          f"on_wire={len(messages)}, duplicated_on_wire={len(messages) - len(distinct)}, "
          f"unknown_notifications={unknown}")
    # Deadlines still coming due (and, on a fast machine, events still arriving).
    assert at_stop["decided"] < CASES, "the burst was over before the signal"
    assert all(t < GRACE for t in took.values()), took
    assert count(db, "SELECT count(*) FROM case_events WHERE outcome = 'applied'") == CASES
    assert set(per_case) == set(cases) and len(distinct) == CASES
    assert count(db, "SELECT count(*) FROM decisions") == CASES
    assert unknown == 0
