"""The fault suite: simulated traffic while every service is SIGKILLed at random moments,
RabbitMQ, PostgreSQL and Redis are restarted and the queues are filled with poison.
At the end, checked against what was published:
- every accepted event is in the case log, once;
- every due deadline fired once, with exactly one decision each, all published;
- no notification sent twice for one dedup key;
- every rejected message is in `aftersales.events.rejected`, unchanged.
The counts are printed as a report (events, kills, restarts, lost, duplicated).
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import dramatiq
import pika
import pika.exceptions
import pytest
from sqlalchemy import select, text

from services.simulate import SimConfig, generate
from shared.amqp import (
    FIRE_DEADLINE_ACTOR,
    NOTIFIER_QUEUE,
    RESOLVER_QUEUE,
    SEND_NOTIFICATION_ACTOR,
)
from shared.db.models import CaseEventRow, DeadlineRow, DecisionRow
from shared.db.persist import DECISION_NAMESPACE
from shared.db.session import Database
from shared.domain import decision_key
from tests.conftest import wait_for
from tests.e2e.test_faults import _restart_postgresql, _restart_rabbitmq
from tests.harness import DecisionTap, System, publish_events, rejected_messages
from tests.poison import publish_messages, rejected_flood

pytestmark = pytest.mark.e2e

MESSAGES = 2500
RATE = 150.0  # offered events per second: the burst lasts about 17 s
POISON = 300


def _restart_redis() -> None:
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "shutdown", "nosave"], timeout=30,
                   capture_output=True)
    subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1",
                    "--port", "6379", "--save", "", "--appendonly", "no",
                    "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log"],
                   check=True, timeout=30)
    wait_for(lambda: subprocess.run(["redis-cli", "-h", "127.0.0.1", "ping"],
                                    capture_output=True, text=True).stdout.strip() == "PONG",
             timeout=30, what="Redis back")


def _poison(amqp_url: str) -> int:
    """Messages no worker can handle: Dramatiq messages with arguments of the wrong
    shape for the resolver and the notifier, and garbage on the events exchange."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for i in range(POISON):
            for queue, actor, arg in ((RESOLVER_QUEUE, FIRE_DEADLINE_ACTOR, f"poison-{i}"),
                                      (NOTIFIER_QUEUE, SEND_NOTIFICATION_ACTOR, -i - 1)):
                message: dramatiq.Message[Any] = dramatiq.Message(
                    queue_name=queue, actor_name=actor, args=(arg,), kwargs={},
                    options={"max_retries": 0})
                channel.basic_publish("", queue, message.encode(),
                                      pika.BasicProperties(delivery_mode=2))
    finally:
        connection.close()
    return 2 * POISON


def _intake_poison(amqp_url: str, seed: int) -> list[bytes]:
    """Bad events of every input class intake must reject (tests/poison.py), published to
    the events exchange; returns their bodies."""
    flood = rejected_flood(POISON, seed, datetime.now(UTC), f"fsp{seed}")
    publish_messages(amqp_url, flood)
    return [m.body for m in flood]


def _paced_publish(amqp_url: str, bodies: list[bytes], rate: float) -> None:
    """As an upstream system publishes: paced, and a chunk the broker did not confirm
    (RabbitMQ restarting) is published again; intake dedups events by event_id."""
    chunk = max(1, int(rate / 10))
    started = time.monotonic()
    for i in range(0, len(bodies), chunk):
        # Pacing the offered load (a rate, not a condition to wait for).
        time.sleep(max(0.0, started + i / rate - time.monotonic()))
        deadline = time.monotonic() + 180
        while True:
            try:
                publish_events(amqp_url, bodies[i:i + chunk], routing_key="sim")
                break
            except (pika.exceptions.AMQPError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)  # broker restarting: try again, as upstreams do


@pytest.mark.timeout(900)
def test_simulated_traffic_survives_kills_restarts_and_poison(
    system: System, db: Database, amqp_url: str
) -> None:
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    config = SimConfig(rate=RATE, duration=None, count=MESSAGES, deadline_seconds=8,
                       late_merchant_share=0.4, late_buyer_share=0.3, duplicate_share=0.05,
                       malformed_share=0.03, run_id=f"fs{uuid.uuid4().hex[:6]}")
    messages = list(generate(config, MESSAGES, seed=seed, start=datetime.now(UTC)))
    good_ids = {m.event["event_id"] for m in messages if m.event is not None}
    malformed = [m.body for m in messages if m.category == "malformed"]

    kills: Counter[str] = Counter()
    restarts: Counter[str] = Counter()
    with DecisionTap(amqp_url) as tap:
        publisher = threading.Thread(
            target=_paced_publish, args=(amqp_url, [m.body for m in messages], RATE))
        publisher.start()
        poisoned = _poison(amqp_url)
        malformed += _intake_poison(amqp_url, seed)
        faults = ["intake", "timer", "resolver", "notifier", "outbox",
                  "rabbitmq", "postgresql", "redis"]
        rng.shuffle(faults)
        for fault in faults:
            time.sleep(rng.uniform(0.5, 3.0))  # a random moment, not a condition to await
            if fault == "outbox":
                system.kill_worker("resolver", "as-outbox")
                kills[fault] += 1
            elif fault in ("intake", "timer", "resolver", "notifier"):
                system.kill(fault)
                system.start(fault)
                kills[fault] += 1
            else:
                {"rabbitmq": _restart_rabbitmq, "postgresql": _restart_postgresql,
                 "redis": _restart_redis}[fault]()
                restarts[fault] += 1
        publisher.join(300)
        assert not publisher.is_alive()

        def logged() -> set[str]:
            try:
                with db.transaction() as s:
                    return set(s.execute(select(CaseEventRow.event_id)).scalars())
            except Exception:
                return set()

        wait_for(lambda: logged() >= good_ids, timeout=300, what="every event in a case log")
        # Every deadline already due has fired: nothing pending or dispatched in the past.
        cutoff = datetime.now(UTC)

        def overdue() -> int:
            with db.transaction() as s:
                return int(s.execute(select(text("count(*)")).select_from(DeadlineRow).where(
                    DeadlineRow.status.in_(("pending", "dispatched")),
                    DeadlineRow.due_at <= cutoff)).scalar_one())

        wait_for(lambda: overdue() == 0, timeout=300, what="every due deadline fired")
        with db.transaction() as s:
            fired = s.execute(select(DeadlineRow).where(DeadlineRow.status == "fired")
                              ).scalars().all()
            decision_ids = set(s.execute(select(DecisionRow.decision_id)).scalars())
        wait_for(lambda: {m["decision_id"] for m in tap.snapshot()} >= decision_ids,
                 timeout=300, what="every decision published")
        wire = tap.catch_up()

    # 1. Every accepted event in the case log once (event_id is its key: at most once).
    lost_events = good_ids - logged()
    # 2. Every fired deadline made exactly one decision, and it reached the exchange.
    expected = {
        str(uuid.uuid5(DECISION_NAMESPACE, decision_key(
            d.case_id, d.step, d.fence, d.purpose, d.deadline_at,
            d.due_at if d.purpose == "reminder" else None)))
        for d in fired
    }
    missing_decisions = expected - decision_ids
    by_id: dict[str, list[dict[str, Any]]] = {}
    for m in wire:
        by_id.setdefault(m["decision_id"], []).append(m)
    repeated = {i: len(copies) for i, copies in by_id.items() if len(copies) > 1}
    # 3. No notification sent twice for one dedup key (the notifier logs every send).
    sends = Counter(re.findall(r"sent via \w+ id=\S* key=(\w+)", system.log("notifier")))
    twice = {k: n for k, n in sends.items() if n > 1}
    # 4. Every rejected message in aftersales.events.rejected, byte for byte.
    rejected: list[bytes] = []
    wait_for(lambda: rejected.extend(b for b, _ in rejected_messages(amqp_url))
             or len(rejected) >= len(malformed), timeout=120, what="the rejected messages")

    print(f"\n[fault suite] seed={seed} messages={len(messages)} events={len(good_ids)} "
          f"malformed={len(malformed)} poison={poisoned} kills={dict(kills)} "
          f"restarts={dict(restarts)} deadlines_fired={len(fired)} "
          f"decisions={len(decision_ids)} notifications_sent={sum(sends.values())} "
          f"lost_events={len(lost_events)} lost_decisions={len(missing_decisions)} "
          f"duplicated_decisions={len(wire) - len(by_id)} "
          f"duplicated_notifications={len(twice)}")
    assert lost_events == set()
    assert missing_decisions == set()
    assert repeated == {}
    assert twice == {}
    # A chunk re-published after the RabbitMQ restart may reject a message twice.
    assert set(rejected) == set(malformed) and len(rejected) >= len(malformed)
    assert sends, "the notifier sent nothing: the suite did not exercise it"
    assert fired, "no deadline fired: the suite did not exercise the timer"
    assert json.dumps(dict(kills))  # the report above is the record of what was done
    assert datetime.now(UTC) - cutoff < timedelta(minutes=15)
