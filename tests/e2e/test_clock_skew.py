"""One clock decides: the database's. The timer and the resolver run under libfaketime
with their host clock minutes behind, then minutes ahead; every deadline is still decided
exactly once, counted on a queue of our own bound to `aftersales.decisions`.

Before the fix the resolver judged due-ness by its host clock: five minutes behind, each
deadline the timer handed over looked early and was recorded stale for good."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from shared.db.session import Database
from tests.conftest import wait_for
from tests.harness import DecisionTap, System, publish_events

pytestmark = pytest.mark.e2e

FAKETIME_LIBS = ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                 "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
                 "/usr/lib/faketime/libfaketime.so.1")
CASES = 30


def libfaketime() -> str:
    for lib in FAKETIME_LIBS:
        if Path(lib).exists():
            return lib
    raise AssertionError("libfaketime is missing: scripts/setup.sh installs it "
                         "(apt-get install faketime)")


def skewed(offset: str) -> dict[str, str]:
    # A constant offset on every clock (FAKETIME_DONT_FAKE_MONOTONIC breaks Python's
    # time.sleep, which waits on an absolute monotonic deadline).
    return {"LD_PRELOAD": libfaketime(), "FAKETIME": offset}


def host_skew_seconds(env: dict[str, str]) -> float:
    """How far the wall clock of a process started with `env` is off (shows the preload
    works for the interpreter the services run on)."""
    out = subprocess.run([sys.executable, "-c", "import time; print(time.time())"],
                         env={**env, "PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return float(out) - datetime.now(UTC).timestamp()


def opened(case_id: str, due_in: float) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "event_id": f"{case_id}-open", "type": "case.opened", "occurred_at": now.isoformat(),
        "platform": "kuaishou", "shop_id": "S1", "order_id": f"O-{case_id}",
        "case_id": case_id, "due_at": (now + timedelta(seconds=due_in)).isoformat(),
        "data": {"kind": "exchange", "amount_fen": 5000, "reason": "质量问题",
                 "buyer": {"phone": "13800000000"}, "merchant": {"email": "s@example.com"}},
    }


@pytest.fixture(scope="module")
def skewed_system(database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[System]:
    log_dir: Path = tmp_path_factory.mktemp("skew")
    system = System({
        "AFTERSALES_DATABASE_URL": database_url,
        "AFTERSALES_AMQP_URL": amqp_url,
        "AFTERSALES_REDIS_PREFIX": f"aftersales-test:{log_dir.name}:",
        "AFTERSALES_EMAIL_TRANSPORT": "log",
        "AFTERSALES_TIMER_POLL_SECONDS": "0.1",
        "AFTERSALES_OUTBOX_POLL_SECONDS": "0.1",
        "AFTERSALES_TIMER_REDISPATCH_SECONDS": "10",
        # Under libfaketime (which moves the monotonic clock too) the resolver's worker
        # did not finish its stop within the 25 s grace and was killed at its end; with
        # clocks not faked it stops in about 2 s. A timed wait on an absolute monotonic
        # deadline, which the kernel measures on the real clock, would do that. Graceful
        # stops are test_shutdown_burst's; here a short grace saves the suite 22 s.
        "AFTERSALES_SHUTDOWN_GRACE_SECONDS": "3",
    }, log_dir)
    try:
        yield system
    finally:
        system.stop()


def deadline_statuses(db: Database, prefix: str) -> Counter[str]:
    with db.transaction() as s:
        return Counter(s.execute(text(
            "SELECT status FROM deadlines WHERE purpose = 'deadline' "
            "AND step = 'merchant_response' AND case_id LIKE :p"),
            {"p": prefix + "%"}).scalars())


@pytest.mark.parametrize("offset", ["-5m", "+5m"])
def test_a_skewed_host_clock_changes_nothing(
    skewed_system: System, db: Database, amqp_url: str, offset: str
) -> None:
    assert shutil.which("faketime") or libfaketime()
    env = skewed(offset)
    skew = host_skew_seconds(env)
    assert abs(abs(skew) - 300) < 30 and (skew < 0) == offset.startswith("-"), skew
    system = skewed_system
    for service in ("timer", "resolver"):
        system.service_env[service] = env
        if service in system.procs:
            system.kill(service)
    system.start("intake", "timer", "resolver")
    for service in ("intake", "timer", "resolver"):
        wait_for(lambda s=service: system.metrics_ready(s), timeout=60,
                 what=f"{service} to serve metrics")
    prefix = f"SKEW{offset[0].replace('-', 'B').replace('+', 'A')}-"
    cases = [f"{prefix}{i:03d}" for i in range(CASES)]
    with DecisionTap(amqp_url) as tap:
        # Deadlines coming due over the next few seconds, while the skewed services run.
        publish_events(amqp_url, [opened(c, due_in=2 + (i % 10) * 0.5)
                                  for i, c in enumerate(cases)])
        wait_for(lambda: deadline_statuses(db, prefix).get("fired", 0) == CASES
                 or deadline_statuses(db, prefix).get("stale", 0), timeout=120,
                 what="every deadline decided")
        wait_for(lambda: len({m["case_id"] for m in tap.snapshot()
                              if m["case_id"].startswith(prefix)}) >= CASES, timeout=60,
                 what="a decision per case on the wire")
        decisions = [m for m in tap.catch_up() if m["case_id"].startswith(prefix)]
    per_case = Counter(m["case_id"] for m in decisions)
    statuses = deadline_statuses(db, prefix)
    print(f"\n[fault report] clock {offset}: cases={CASES}, host_skew_s={skew:.0f}, "
          f"decided={len(per_case)}, decisions_on_wire={len(decisions)}, "
          f"deadlines={dict(statuses)}")
    assert statuses == {"fired": CASES}
    assert per_case == dict.fromkeys(cases, 1)
    assert {m["type"] for m in decisions} == {"decision.auto_approved"}
