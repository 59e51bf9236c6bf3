"""Crashes and restarts under load: nothing lost, nothing done twice.

- intake SIGKILLed in the middle of a burst of 1,000 events;
- timer, resolver and the outbox relay SIGKILLed at random moments while 1,000
  deadlines come due;
- RabbitMQ and PostgreSQL restarted while 1,000 deadlines come due.
Each test reports its counts (events, kills, restarts, lost, duplicated).
"""

from __future__ import annotations

import glob
import random
import shutil
import subprocess
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text

from shared.db.models import CaseEventRow, CaseRow, DeadlineRow, DecisionRow
from shared.db.session import Database
from tests.conftest import wait_for
from tests.harness import DecisionTap, System, publish_events

pytestmark = pytest.mark.e2e

N = 1000


def scalar(db: Database, stmt: Any) -> Any:
    try:
        with db.transaction() as s:
            return s.execute(stmt).scalar_one()
    except Exception:  # the database may be restarting: "not yet"
        return None


def opened(case_id: str, due_at: datetime | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "event_id": f"{case_id}-open", "type": "case.opened",
        "occurred_at": datetime.now(UTC).isoformat(), "platform": "kuaishou",
        "shop_id": "S1", "order_id": f"O-{case_id}", "case_id": case_id,
        "data": {"kind": "exchange", "amount_fen": 5000,
                 "buyer": {"phone": "13800000000"}, "merchant": {"email": "s@example.com"}},
    }
    if due_at:
        doc["due_at"] = due_at.isoformat()
    return doc


def approved(case_id: str) -> dict[str, Any]:
    return {
        "event_id": f"{case_id}-approve", "type": "merchant.approved",
        "occurred_at": datetime.now(UTC).isoformat(), "platform": "kuaishou",
        "shop_id": "S1", "order_id": f"O-{case_id}", "case_id": case_id, "data": {},
    }


def report(name: str, **counts: Any) -> None:
    print(f"\n[fault report] {name}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


def test_intake_killed_mid_burst_loses_and_duplicates_nothing(
    system: System, db: Database, amqp_url: str
) -> None:
    cases = [f"KILL-I-{i:04d}" for i in range(N // 2)]
    events = [e for c in cases for e in (opened(c), approved(c))]
    publisher = threading.Thread(target=publish_events, args=(amqp_url, events))
    publisher.start()
    logged = select(func.count()).select_from(CaseEventRow)
    at_kill = wait_for(lambda: (n := scalar(db, logged)) and n >= 100 and n, timeout=60,
                       what="intake to be part-way through the burst")
    system.kill("intake")
    assert at_kill < N, "the kill came after the burst: the test proved nothing"
    system.start("intake")
    publisher.join(120)
    wait_for(lambda: scalar(db, logged) == N, timeout=180, what="all 1,000 events logged")

    with db.transaction() as s:
        outcomes = Counter(s.execute(select(CaseEventRow.outcome)).scalars())
        versions = Counter(s.execute(select(CaseRow.version)).scalars())
        steps = Counter(s.execute(select(CaseRow.step)).scalars())
        open_deadlines = s.execute(
            select(DeadlineRow.case_id, func.count())
            .where(DeadlineRow.status == "pending", DeadlineRow.purpose == "deadline")
            .group_by(DeadlineRow.case_id)).all()
    report("intake SIGKILL", events=N, kills=1, at_kill=at_kill,
           lost=N - sum(outcomes.values()),
           duplicated=sum(v * n for v, n in versions.items()) - 2 * len(cases))
    assert outcomes == {"applied": N}
    assert versions == {2: len(cases)}  # opened + approved, each applied exactly once
    assert steps == {"buyer_return_shipping": len(cases)}
    assert len(open_deadlines) == len(cases)
    assert all(count == 1 for _case, count in open_deadlines)


def check_decisions(db: Database, tap: DecisionTap, cases: list[str]) -> dict[str, int]:
    messages = tap.catch_up()
    by_id: dict[str, list[dict[str, Any]]] = {}
    for m in messages:
        by_id.setdefault(m["decision_id"], []).append(m)
    # A relay (or broker) dying between RabbitMQ's confirms and the relay's commit
    # publishes that batch again: the very same decision, which upstream deduplicates on
    # `decision_id`. Repeats are counted and reported; a repeat that differs is a bug.
    for copies in by_id.values():
        assert all(c == copies[0] for c in copies[1:]), copies
    per_case = Counter(m[0]["case_id"] for m in by_id.values())
    assert per_case == dict.fromkeys(cases, 1)
    assert {m[0]["type"] for m in by_id.values()} == {"decision.auto_approved"}
    with db.transaction() as s:
        rows = s.execute(select(func.count()).select_from(DecisionRow)).scalar_one()
        left = s.execute(select(func.count()).select_from(DeadlineRow).where(
            DeadlineRow.status.in_(("pending", "dispatched")),
            DeadlineRow.due_at <= func.now())).scalar_one()
        outbox = s.execute(text("SELECT count(*) FROM outbox WHERE exchange <> ''")).scalar_one()
    assert rows == len(cases)
    assert left == 0
    assert outbox == 0
    return {"decisions": len(by_id), "duplicated": len(messages) - len(by_id)}


def open_cases_due_soon(system: System, db: Database, amqp_url: str, prefix: str,
                        spread: float) -> list[str]:
    """1,000 open cases whose platform deadlines fall over the next `spread` seconds."""
    cases = [f"{prefix}-{i:04d}" for i in range(N)]
    start = datetime.now(UTC) + timedelta(seconds=8)
    publish_events(amqp_url, [
        opened(c, start + timedelta(seconds=spread * i / N)) for i, c in enumerate(cases)
    ])
    wait_for(lambda: scalar(db, select(func.count()).select_from(CaseRow)
                            .where(CaseRow.case_id.like(f"{prefix}-%"))) == N,
             timeout=120, what="the 1,000 cases opened")
    return cases


def test_timer_resolver_and_relay_killed_at_random_still_one_decision_each(
    system: System, db: Database, amqp_url: str
) -> None:
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    with DecisionTap(amqp_url) as tap:
        cases = open_cases_due_soon(system, db, amqp_url, "KILL-D", spread=20)
        kills = Counter[str]()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.5, 2.5))  # a random moment, not a condition to await
            victim = rng.choice(["timer", "resolver", "outbox"])
            if victim == "outbox":
                system.kill_worker("resolver", "as-outbox")  # its supervisor restarts it
            else:
                system.kill(victim)
                system.start(victim)
            kills[victim] += 1
        wait_for(lambda: len({m["decision_id"] for m in tap.snapshot()}) >= N, timeout=240,
                 what="1,000 distinct decisions on aftersales.decisions")
        wait_for(lambda: scalar(db, text("SELECT count(*) FROM outbox WHERE exchange <> ''"))
                 == 0, timeout=60, what="the outbox to drain")
        counts = check_decisions(db, tap, cases)
    report("timer/resolver/outbox SIGKILL", seed=seed, deadlines=N, kills=dict(kills),
           lost=N - counts["decisions"], duplicated_on_wire=counts["duplicated"])


def _restart_rabbitmq() -> None:
    ctl = shutil.which("rabbitmqctl")
    assert ctl, "rabbitmqctl is needed to restart RabbitMQ"
    subprocess.run([ctl, "-q", "stop_app"], check=True, timeout=120)
    subprocess.run([ctl, "-q", "start_app"], check=True, timeout=120)


def _restart_postgresql() -> None:
    versions = sorted(glob.glob("/etc/postgresql/*/main"))
    assert versions, "no local PostgreSQL cluster to restart"
    version = versions[-1].split("/")[3]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
                   check=True, timeout=120, capture_output=True)


@pytest.mark.timeout(900)
def test_rabbitmq_and_postgresql_restarts_lose_no_decision(
    system: System, db: Database, amqp_url: str
) -> None:
    with DecisionTap(amqp_url) as tap:
        cases = open_cases_due_soon(system, db, amqp_url, "RESTART-D", spread=20)
        wait_for(lambda: len({m["decision_id"] for m in tap.snapshot()}) >= 50, timeout=120,
                 what="the first decisions")
        _restart_rabbitmq()
        wait_for(lambda: len({m["decision_id"] for m in tap.snapshot()}) >= 300, timeout=180,
                 what="decisions flowing again after the RabbitMQ restart")
        _restart_postgresql()
        wait_for(lambda: len({m["decision_id"] for m in tap.snapshot()}) >= N, timeout=300,
                 what="1,000 distinct decisions after both restarts")
        wait_for(lambda: scalar(db, text("SELECT count(*) FROM outbox WHERE exchange <> ''"))
                 == 0, timeout=60, what="the outbox to drain")
        counts = check_decisions(db, tap, cases)
    report("RabbitMQ + PostgreSQL restart", deadlines=N, restarts=2,
           lost=N - counts["decisions"], duplicated_on_wire=counts["duplicated"])
