"""Ops tools against the four services running as processes: an ops pause stops a step's
clock and a resume lets the deadline fire later, an extension moves it; a decision no
upstream queue is bound for is kept, listed and sent again once one is bound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pika
import pytest
from sqlalchemy import text

from shared.amqp import DECISIONS_EXCHANGE, UNROUTED_QUEUE
from shared.broker_policy import POLICY_NAME, vhost_of
from shared.db.session import Database
from tests.conftest import wait_for
from tests.harness import System, publish_events

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def aftersales(system: System, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aftersales_cli.cli", *args], cwd=ROOT,
                          env={**os.environ, **system.env}, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def opened(case_id: str, due_in: float) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {"event_id": f"{case_id}-open", "type": "case.opened", "occurred_at": now.isoformat(),
            "platform": "kuaishou", "shop_id": "S1", "order_id": f"O-{case_id}",
            "case_id": case_id, "due_at": (now + timedelta(seconds=due_in)).isoformat(),
            "data": {"kind": "exchange", "amount_fen": 100,
                     "merchant": {"email": "shop@example.com"}}}


def scalar(db: Database, sql: str, **params: Any) -> Any:
    with db.transaction() as s:
        return s.execute(text(sql), params).scalar()


def pending_deadline(db: Database, case_id: str) -> datetime | None:
    return scalar(db, "SELECT due_at FROM deadlines WHERE case_id = :c AND purpose = "
                      "'deadline' AND status IN ('pending', 'dispatched')", c=case_id)


def test_an_ops_pause_holds_the_deadline_until_resumed_and_extend_moves_it(
    system: System, db: Database, amqp_url: str
) -> None:
    # Due late enough that the pause (a CLI process, then intake) comes first on a slow host.
    publish_events(amqp_url, [opened("AS-E2E-PAUSE", due_in=30), opened("AS-E2E-EXT", 3600)])
    wait_for(lambda: pending_deadline(db, "AS-E2E-PAUSE") and
             pending_deadline(db, "AS-E2E-EXT"), what="both cases open")
    first_due = pending_deadline(db, "AS-E2E-PAUSE")
    assert first_due is not None

    paused = aftersales(system, "case", "pause", "AS-E2E-PAUSE", "--reason", "checking",
                        "--by", "erin")
    assert paused.returncode == 0 and "intake: applied" in paused.stdout, paused.stderr
    assert pending_deadline(db, "AS-E2E-PAUSE") is None  # the clock stopped
    resumed = aftersales(system, "case", "resume", "AS-E2E-PAUSE", "--reason", "done",
                         "--by", "erin")
    assert resumed.returncode == 0 and "intake: applied" in resumed.stdout, resumed.stderr
    paused_for = scalar(db, "SELECT max(occurred_at) - min(occurred_at) FROM case_events "
                            "WHERE case_id = :c AND type LIKE 'intervention.%'", c="AS-E2E-PAUSE")
    assert paused_for > timedelta(0)
    # The decision comes, from the deadline the resume set (moved by the pause), once.
    wait_for(lambda: scalar(db, "SELECT count(*) FROM decisions WHERE case_id = :c",
                            c="AS-E2E-PAUSE"), timeout=90, what="the deadline to fire")
    decision_due = scalar(db, "SELECT body ->> 'due_at' FROM decisions WHERE case_id = :c",
                          c="AS-E2E-PAUSE")
    # (the engine keeps what was left of the clock in whole seconds)
    moved_to = datetime.fromisoformat(decision_due)
    assert first_due + paused_for - timedelta(seconds=1) <= moved_to <= first_due + paused_for
    explained = json.loads(aftersales(system, "case", "explain", "AS-E2E-PAUSE",
                                      "--json").stdout)
    [pause] = explained["pauses"]
    assert pause["by"] == "erin" and pause["reason"] == "checking"
    [decision] = explained["automatic_decisions"]
    assert decision["type"] == "decision.auto_approved"

    before = pending_deadline(db, "AS-E2E-EXT")
    assert before is not None
    extended = aftersales(system, "case", "extend", "AS-E2E-EXT", "--hours", "2", "--reason",
                          "goodwill", "--by", "erin")
    assert extended.returncode == 0 and "intake: applied" in extended.stdout, extended.stderr
    assert pending_deadline(db, "AS-E2E-EXT") == before + timedelta(hours=2)


def test_an_unrouted_decision_is_kept_listed_and_replayed(
    system: System, db: Database, amqp_url: str
) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.queue_delete("test.decision-tap")  # other modules' tap: nothing bound now
    channel.queue_purge(UNROUTED_QUEUE)
    applied = aftersales(system, "broker", "policy")
    assert applied.returncode == 0, applied.stderr
    try:
        publish_events(amqp_url, [opened("AS-E2E-UNROUTED", due_in=2)])
        wait_for(lambda: channel.queue_declare(UNROUTED_QUEUE, passive=True)
                 .method.message_count == 1, timeout=90, what="the decision, unrouted")
        decision_id = scalar(db, "SELECT decision_id FROM decisions WHERE case_id = :c",
                             c="AS-E2E-UNROUTED")
        listed = json.loads(aftersales(system, "unrouted", "list", "--json").stdout)
        assert [(m["id"], m["routing_key"]) for m in listed["messages"]] == [
            (decision_id, "decision.auto_approved")]

        channel.queue_declare("test.upstream", durable=True)
        channel.queue_bind("test.upstream", DECISIONS_EXCHANGE, "decision.#")
        replayed = aftersales(system, "unrouted", "replay", "--all", "--yes")
        assert replayed.returncode == 0, replayed.stderr
        assert f"replayed {decision_id}" in replayed.stdout
        got = []
        while (message := channel.basic_get("test.upstream", auto_ack=True))[0] is not None:
            got.append(json.loads(message[2])["decision_id"])
        assert got == [decision_id]
        assert channel.queue_declare(UNROUTED_QUEUE, passive=True).method.message_count == 0
    finally:
        channel.queue_delete("test.upstream")
        connection.close()
        subprocess.run(["rabbitmqctl", "-q", "clear_policy", "-p", vhost_of(amqp_url),
                        POLICY_NAME], capture_output=True, timeout=60)
