"""The fault suite: simulated traffic while every service is SIGKILLed at random moments,
RabbitMQ, PostgreSQL and Redis are restarted and the queues are filled with poison.

Judged by independent observation, against a prediction made from the generated traffic
alone (`tests/e2e/traffic_model.py`: each case's events replayed through the domain core
in event time, deadlines fired at their due times, notices expanded by the policy):
- every accepted event is in the case log, once;
- the decisions each case calls for arrived on a queue of our own bound to
  `aftersales.decisions` (repeats of one `decision_id` are counted: upstream dedups);
- the notifications each case calls for arrived at the SMTP server (aiosmtpd) and at the
  SMS provider's HTTP endpoint (a fake Aliyun checking signatures), none twice;
- every rejected message is in `aftersales.events.rejected`, unchanged;
- each injected fault hit live work (deadlines coming due, events or notifications in
  flight), recorded just before it.
Quiet hours are off and the rate limits wide, so every notification is due during the run.
Faults hold events back, so the prediction follows each event's real arrival (the case
log's received_at); a case whose event arrived while one of its deadlines was being
decided could go either way and is counted ("raced") and left out of the per-case
comparison. The `[fault report]` line is printed before any assertion.
"""

from __future__ import annotations

import email
import json
import random
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dramatiq
import pika
import pika.exceptions
import pytest
from sqlalchemy import select, text

from aftersales_cli.simulate.generator import SimConfig, generate
from shared.amqp import (
    FIRE_DEADLINE_ACTOR,
    NOTIFIER_QUEUE,
    RESOLVER_QUEUE,
    SEND_NOTIFICATION_ACTOR,
)
from shared.db.models import CaseEventRow, DeadlineRow
from shared.db.session import Database
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.notifications.policy import NotificationPolicy, OpsContacts
from tests.conftest import wait_for
from tests.e2e.test_faults import _restart_postgresql, _restart_rabbitmq
from tests.e2e.traffic_model import predict
from tests.harness import DecisionTap, System, publish_events, rejected_messages
from tests.integration.notifier.notifier_fakes import FakeAliyun, RecordingHandler, start_smtp
from tests.poison import publish_messages, rejected_flood
from tests.resources import free_port, write_sms_codes

pytestmark = pytest.mark.e2e

MESSAGES = 2500
RATE = 150.0  # offered events per second: the burst lasts about 17 s
DEADLINE_S = 8  # the traffic's deadlines come due this many seconds after their events
POISON = 300
OPS_EMAIL, OPS_PHONE = "ops@example.com", "13900000000"
KEY_ID, KEY_SECRET = "LTAIfaultsuite", "fault-suite-secret-not-real"


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
    shape for the resolver and the notifier (also ids with creation times that are not
    times), and garbage on the events exchange."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for i in range(POISON):
            for queue, actor, args in (
                    (RESOLVER_QUEUE, FIRE_DEADLINE_ACTOR, (f"poison-{i}",)),
                    (NOTIFIER_QUEUE, SEND_NOTIFICATION_ACTOR, (-i - 1,)),
                    (NOTIFIER_QUEUE, SEND_NOTIFICATION_ACTOR, ([-i - 1], {"span": i}))):
                message: dramatiq.Message[Any] = dramatiq.Message(
                    queue_name=queue, actor_name=actor, args=args, kwargs={},
                    options={"max_retries": 0})
                channel.basic_publish("", queue, message.encode(),
                                      pika.BasicProperties(delivery_mode=2))
    finally:
        connection.close()
    return 3 * POISON


def _intake_poison(amqp_url: str, seed: int) -> list[bytes]:
    """Bad events of every input class intake must reject (tests/poison.py), published to
    the events exchange; returns their bodies."""
    flood = rejected_flood(POISON, seed, datetime.now(UTC), f"fsp{seed}")
    publish_messages(amqp_url, flood)
    return [m.body for m in flood]


def _paced_publish(amqp_url: str, bodies: list[bytes], rate: float,
                   progress: list[int] | None = None) -> None:
    """As an upstream system publishes: paced, and a chunk the broker did not confirm
    (RabbitMQ restarting) is published again; intake dedups events by event_id.
    `progress[0]`: how many bodies are published so far."""
    chunk = max(1, int(rate / 10))
    started = time.monotonic()
    for i in range(0, len(bodies), chunk):
        # Pacing the offered load (a rate, not a condition to wait for).
        time.sleep(max(0.0, started + i / rate - time.monotonic()))
        deadline = time.monotonic() + 180
        while True:
            try:
                publish_events(amqp_url, bodies[i:i + chunk], routing_key="sim")
                if progress is not None:
                    progress[0] = i + len(bodies[i:i + chunk])
                break
            except (pika.exceptions.AMQPError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)  # broker restarting: try again, as upstreams do


@pytest.fixture(scope="module")
def observed_system(database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[tuple[System, RecordingHandler, FakeAliyun]]:
    """The four services sending to an SMTP server and an SMS provider of our own."""
    log_dir: Path = tmp_path_factory.mktemp("fault-suite")
    codes = write_sms_codes(log_dir)
    smtp, smtp_port = RecordingHandler(), free_port()
    controller = start_smtp(smtp, smtp_port)
    with FakeAliyun({KEY_ID: KEY_SECRET}) as sms:
        wide = "100000"
        system = System({
            "AFTERSALES_DATABASE_URL": database_url,
            "AFTERSALES_AMQP_URL": amqp_url,
            "AFTERSALES_REDIS_PREFIX": f"aftersales-test:{log_dir.name}:",
            "AFTERSALES_TIMER_POLL_SECONDS": "0.1",
            "AFTERSALES_OUTBOX_POLL_SECONDS": "0.1",
            "AFTERSALES_TIMER_REDISPATCH_SECONDS": "10",
            "AFTERSALES_LOG_LEVEL": "INFO",
            "AFTERSALES_QUIET_HOURS": "",
            "AFTERSALES_EMAIL_TRANSPORT": "smtp",
            "AFTERSALES_SMTP_HOST": "127.0.0.1",
            "AFTERSALES_SMTP_PORT": str(smtp_port),
            "AFTERSALES_SMTP_FROM": "aftersales@example.com",
            "AFTERSALES_SMS_PROVIDER": "aliyun",
            "AFTERSALES_SMS_ENDPOINT": sms.url,
            "AFTERSALES_SMS_TEMPLATES": str(codes),
            "AFTERSALES_ALIYUN_ACCESS_KEY_ID": KEY_ID,
            "AFTERSALES_ALIYUN_ACCESS_KEY_SECRET": KEY_SECRET,
            "AFTERSALES_OPS_EMAILS": OPS_EMAIL,
            "AFTERSALES_OPS_PHONES": OPS_PHONE,
            "AFTERSALES_SMS_PER_PHONE_PER_HOUR": wide,
            "AFTERSALES_SMS_PER_PHONE_PER_DAY": wide,
            "AFTERSALES_EMAIL_PER_ADDRESS_PER_HOUR": wide,
            "AFTERSALES_OPS_SMS_PER_PHONE_PER_HOUR": wide,
            "AFTERSALES_OPS_SMS_PER_PHONE_PER_DAY": wide,
            "AFTERSALES_OPS_EMAIL_PER_ADDRESS_PER_HOUR": wide,
        }, log_dir)
        system.start("intake", "timer", "resolver", "notifier")
        try:
            for service in ("intake", "timer", "resolver", "notifier"):
                wait_for(lambda s=service: system.metrics_ready(s), timeout=60,
                         what=f"{service} to serve metrics")
            yield system, smtp, sms
        finally:
            system.stop()
            controller.stop()


def _count(db: Database, sql: str, **params: Any) -> int | None:
    try:
        with db.transaction() as s:
            return int(s.execute(text(sql), params).scalar_one())
    except Exception:  # the database restarting: unknown
        return None


def _live_work(db: Database, published: int) -> dict[str, int | None]:
    """What is under way right now: deadlines due in the last 30 s or the next 10 s and not
    decided yet, events published and not yet in a case log, notifications in flight."""
    logged = _count(db, "SELECT count(DISTINCT event_id) FROM case_events")
    return {
        "deadlines_coming_due": _count(db, (
            "SELECT count(*) FROM deadlines WHERE status IN ('pending', 'dispatched') "
            "AND due_at BETWEEN now() - interval '30 seconds' AND now() + interval '10 seconds'")),
        "events_in_flight": None if logged is None else max(0, published - logged),
        "notifications_in_flight": _count(db, (
            "SELECT count(*) FROM notifications WHERE status IN ('new', 'queued', 'sending')")),
    }


def _hit_live_work(live: dict[str, int | None]) -> bool:
    return any(v for v in live.values())


@pytest.mark.timeout(900)
def test_simulated_traffic_survives_kills_restarts_and_poison(
    observed_system: tuple[System, RecordingHandler, FakeAliyun], db: Database, amqp_url: str
) -> None:
    system, smtp, sms = observed_system
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    config = SimConfig(rate=RATE, duration=None, count=MESSAGES, deadline_seconds=DEADLINE_S,
                       late_merchant_share=0.4, late_buyer_share=0.3, duplicate_share=0.05,
                       malformed_share=0.03, run_id=f"fs{uuid.uuid4().hex[:6]}")
    messages = list(generate(config, MESSAGES, seed=seed, start=datetime.now(UTC)))
    good_ids = {m.event["event_id"] for m in messages if m.event is not None}
    malformed = [m.body for m in messages if m.category == "malformed"]

    kills: Counter[str] = Counter()
    restarts: Counter[str] = Counter()
    live_at_fault: dict[str, dict[str, int | None]] = {}
    progress = [0]
    with DecisionTap(amqp_url) as tap:
        publisher = threading.Thread(
            target=_paced_publish,
            args=(amqp_url, [m.body for m in messages], RATE, progress))
        publisher.start()
        poisoned = _poison(amqp_url)
        malformed += _intake_poison(amqp_url, seed)
        faults = ["intake", "timer", "resolver", "notifier", "outbox",
                  "rabbitmq", "postgresql", "redis"]
        rng.shuffle(faults)
        for fault in faults:
            time.sleep(rng.uniform(0.5, 3.0))  # a random moment, not a condition to await
            live_at_fault[fault] = _live_work(db, progress[0])
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
        # The traffic's deadlines come due seconds after their events, each firing may set
        # the next step's, and the prediction stops at `cutoff`: a deadline due soon after
        # it would fire meanwhile, a decision the prediction does not hold. So the cutoff
        # waits until no deadline is in flight or due within a while.
        wait_for(lambda: _count(db, (
            "SELECT count(*) FROM deadlines WHERE status IN ('pending', 'dispatched') "
            f"AND due_at <= now() + interval '{3 * DEADLINE_S} seconds'")) == 0,
            timeout=300, what="the traffic's short deadlines all decided")
        # Everything due by now must have been decided: the prediction stops here too.
        cutoff = datetime.now(UTC)

        def overdue() -> int:
            with db.transaction() as s:
                return int(s.execute(select(text("count(*)")).select_from(DeadlineRow).where(
                    DeadlineRow.status.in_(("pending", "dispatched")),
                    DeadlineRow.due_at <= cutoff)).scalar_one())

        wait_for(lambda: overdue() == 0, timeout=300, what="every due deadline fired")
        with db.transaction() as s:
            recorded = {e: (o, at) for e, o, at in s.execute(text(
                "SELECT event_id, outcome, received_at FROM case_events"))}
        # When each event reached intake (the case log's received_at, on the database
        # clock that decides due-ness) and how late deadlines were decided around each
        # moment (from the decisions on the wire): the prediction follows the events in
        # their real arrival order, and a case whose event arrived while its deadline was
        # being decided went either way legitimately ("raced").
        lags = sorted((datetime.fromisoformat(m["due_at"]),
                       (datetime.fromisoformat(m["decided_at"])
                        - datetime.fromisoformat(m["due_at"])).total_seconds())
                      for m in tap.snapshot())
        worst = max((lag for _d, lag in lags), default=5.0)

        def lag_near(due: datetime) -> float:
            near = [lag for d, lag in lags if abs((d - due).total_seconds()) <= 15]
            return max(near, default=worst) + 1.0

        prediction = predict(
            [m.body for m in messages], Engine(RuleBook.load(None), WorkCalendar(None)),
            NotificationPolicy.load(None), OpsContacts.parse(OPS_EMAIL, OPS_PHONE), cutoff,
            arrivals={e: at for e, (_o, at) in recorded.items()}, lag=lag_near)
        raced = {case_id for case_id, p in prediction.items()
                 if p.ambiguous or any(recorded.get(e, ("?",))[0] != o
                                       for e, o in p.outcomes.items())}
        compared = {c: p for c, p in prediction.items() if c not in raced}
        want_decisions = Counter((c, t, st) for c, p in compared.items()
                                 for t, st in p.decisions)

        def arrived_decisions(wire: list[dict[str, Any]]) -> Counter[tuple[str, str, str]]:
            return Counter((m["case_id"], m["type"], m["step"]) for m in
                           {m["decision_id"]: m for m in wire}.values())

        wait_for(lambda: not (want_decisions - arrived_decisions(tap.snapshot())),
                 timeout=300, what="the predicted decisions on the wire")
        # Notifications settle: nothing new, queued, sending or due again.
        wait_for(lambda: _count(db, (
            "SELECT count(*) FROM notifications WHERE status IN ('new', 'queued', 'sending') "
            "OR (status = 'deferred' AND send_after <= now() + interval '30 seconds')")) == 0,
            timeout=300, what="every notification settled")
        wire = tap.catch_up()

    # Decisions, as counted on our own queue.
    got_decisions = arrived_decisions(wire)
    got_in_compared = Counter({k: n for k, n in got_decisions.items() if k[0] in compared})
    lost_decisions = want_decisions - got_in_compared
    unexpected_decisions = got_in_compared - want_decisions
    duplicated_decisions = len(wire) - len({m["decision_id"] for m in wire})
    # Notifications, as received by the SMTP server and the SMS provider.
    received = Counter(str(email.message_from_bytes(m.content)["Message-ID"]).strip("<>")
                       .split("@")[0] for m in smtp.received)
    received.update(r["OutId"] for r in sms.requests)
    want_notifications = {k for p in compared.values() for k in p.notifications}
    with db.transaction() as s:
        unknown = set(s.execute(text(
            "SELECT dedup_key FROM notifications WHERE last_error LIKE 'unknown%'")).scalars())
        # Only to tell which case a received message belongs to.
        case_of = {key: case for key, case in s.execute(text(
            "SELECT dedup_key, case_id FROM notifications"))}
    lost_notifications = want_notifications - set(received) - unknown
    twice = {k: n for k, n in received.items() if n > 1}
    unexpected_notifications = {k for k in received if k not in case_of
                                or (case_of[k] in compared and k not in want_notifications)}
    # Every rejected message in aftersales.events.rejected, byte for byte.
    rejected: list[bytes] = []
    wait_for(lambda: rejected.extend(b for b, _ in rejected_messages(amqp_url))
             or len(rejected) >= len(malformed), timeout=120, what="the rejected messages")
    lost_events = good_ids - logged()
    faults_without_live_work = sorted(f for f, live in live_at_fault.items()
                                      if not _hit_live_work(live))

    print(f"\n[fault report] fault suite: seed={seed} messages={len(messages)} "
          f"events={len(good_ids)} malformed={len(malformed)} poison={poisoned} "
          f"kills={dict(kills)} restarts={dict(restarts)} cases={len(prediction)} "
          f"raced_cases={len(raced)} predicted_decisions={sum(want_decisions.values())} "
          f"decisions_on_wire={len(wire)} lost_decisions={sum(lost_decisions.values())} "
          f"unexpected_decisions={sum(unexpected_decisions.values())} "
          f"duplicated_decisions_on_wire={duplicated_decisions} "
          f"predicted_notifications={len(want_notifications)} "
          f"smtp_received={len(smtp.received)} sms_received={len(sms.requests)} "
          f"lost_notifications={len(lost_notifications)} "
          f"unknown_notifications={len(unknown)} duplicated_notifications={len(twice)} "
          f"unexpected_notifications={len(unexpected_notifications)} "
          f"rejected={len(rejected)} lost_events={len(lost_events)} "
          f"live_at_fault={live_at_fault}")
    assert lost_events == set()
    assert lost_decisions == Counter(), dict(list(lost_decisions.items())[:10])
    assert unexpected_decisions == Counter(), dict(list(unexpected_decisions.items())[:10])
    assert lost_notifications == set(), sorted(lost_notifications)[:10]
    assert twice == {}
    assert unexpected_notifications == set(), sorted(unexpected_notifications)[:10]
    # A chunk re-published after the RabbitMQ restart may reject a message twice.
    assert set(rejected) == set(malformed) and len(rejected) >= len(malformed)
    assert faults_without_live_work == [], live_at_fault
    # On a loaded machine faults hold back many events; the comparison must still cover a
    # real share of the traffic.
    assert len(compared) >= min(100, len(prediction) // 4), "the comparison is thin"
    assert want_decisions and want_notifications and smtp.received and sms.requests
    assert json.dumps(dict(kills))  # the report above is the record of what was done
    assert datetime.now(UTC) - cutoff < timedelta(minutes=15)
