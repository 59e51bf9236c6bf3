"""`aftersales rejected|unrouted list|show|replay` on the real broker: bad messages land in
the rejected queue through the real intake, are listed with their reasons (without being
taken), and replayed one, by filter, and all; a RabbitMQ restart in the middle of a replay
loses and duplicates nothing (on a RabbitMQ node of the test's own: the shared one is never
restarted)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from sqlalchemy import func, select

from services.intake.consumer import IntakeConsumer
from services.intake.processor import IntakeProcessor
from services.ops.held import REJECTED, Selection, list_held, replay
from shared.amqp import (
    DECISIONS_EXCHANGE,
    EVENTS_EXCHANGE,
    INTAKE_QUEUE,
    REJECTED_QUEUE,
    UNROUTED_QUEUE,
    declare_topology,
)
from shared.broker_policy import POLICY_NAME, apply_with_rabbitmqctl, vhost_of
from shared.db.models import CaseEventRow, CaseRow
from shared.db.session import Database
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.notifications.policy import NotificationPolicy
from tests.conftest import FIXED_DATE_LIMITS, wait_for
from tests.harness import publish_events
from tests.resources import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def aftersales(amqp_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aftersales_cli.cli", *args], cwd=ROOT,
                          env={**os.environ, "AFTERSALES_AMQP_URL": amqp_url},
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def event(n: int, pad: int = 0) -> dict[str, Any]:
    return {"event_id": f"held-{n}", "type": "case.opened",
            "occurred_at": "2026-11-20T10:00:00+08:00", "platform": "kuaishou",
            "shop_id": "S1", "order_id": f"O{n}", "case_id": f"AS-HELD-{n}",
            "data": {"kind": "exchange", "amount_fen": 100, "reason": "x" * pad}}


@pytest.fixture
def processor(db: Database) -> IntakeProcessor:
    # The smallest limit the settings allow: big events are refused until it is raised.
    return IntakeProcessor(db, Engine(RuleBook.load(None), WorkCalendar(None)),
                           NotificationPolicy.load(None), {"emails": [], "phones": []},
                           max_event_bytes=1024, limits=FIXED_DATE_LIMITS)


def depth(amqp: Any, queue: str) -> int:
    return int(amqp.queue_declare(queue, passive=True).method.message_count)


def cases(db: Database) -> set[str]:
    with db.transaction() as s:
        return set(s.execute(select(CaseRow.case_id)).scalars())


def test_rejected_messages_are_listed_shown_and_replayed(
    amqp: Any, amqp_url: str, db: Database, processor: IntakeProcessor,
    running_intake: IntakeConsumer
) -> None:
    big = [event(n, pad=1500) for n in range(4)]  # valid, but over the limit
    publish_events(amqp_url, [event(10), *big, b"{not json", b'{"type": 1}'])
    wait_for(lambda: depth(amqp, REJECTED_QUEUE) == 6, what="6 rejected messages")
    wait_for(lambda: cases(db) == {"AS-HELD-10"}, what="the good event applied")

    listed = aftersales(amqp_url, "rejected", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    doc = json.loads(listed.stdout)
    assert doc["in_queue"] == 6
    assert Counter(m["reason"] for m in doc["messages"]) == {
        "oversized": 4, "invalid_json": 1, "schema": 1}
    # Listing took nothing, and lists the same messages under the same ids in the same order.
    assert depth(amqp, REJECTED_QUEUE) == 6
    again = json.loads(aftersales(amqp_url, "rejected", "list", "--json").stdout)
    assert [m["id"] for m in again["messages"]] == [m["id"] for m in doc["messages"]]
    assert len({m["id"] for m in doc["messages"]}) == 6
    only = json.loads(aftersales(amqp_url, "rejected", "list", "--reason", "oversized",
                                 "--json").stdout)
    assert len(only["messages"]) == 4
    text = aftersales(amqp_url, "rejected", "list").stdout
    assert "invalid_json" in text and "6 held" in text

    first = next(m for m in doc["messages"] if m["reason"] == "oversized")
    shown = aftersales(amqp_url, "rejected", "show", first["id"], "--json")
    assert shown.returncode == 0, shown.stderr
    body = json.loads(json.loads(shown.stdout)["body"])
    assert body["event_id"] in {e["event_id"] for e in big}
    assert json.loads(shown.stdout)["headers"]["x-reject-reason"] == "oversized"

    # Upstream is fixed (here: the limit is raised); the held events can go through.
    processor.limits = dataclasses.replace(processor.limits, max_bytes=64 * 1024)

    dry = aftersales(amqp_url, "rejected", "replay", "--all", "--dry-run")
    assert dry.returncode == 0 and "would replay 6" in dry.stdout
    assert depth(amqp, REJECTED_QUEUE) == 6
    refused = aftersales(amqp_url, "rejected", "replay", "--all")  # no --yes, no terminal
    assert refused.returncode == 2 and depth(amqp, REJECTED_QUEUE) == 6

    one = aftersales(amqp_url, "rejected", "replay", first["id"])
    assert one.returncode == 0, one.stderr
    assert f"replayed {first['id']}" in one.stdout and "replayed 1 of" in one.stdout
    wait_for(lambda: f"AS-HELD-{body['order_id'][1:]}" in cases(db), what="the replayed case")
    assert depth(amqp, REJECTED_QUEUE) == 5

    by_reason = aftersales(amqp_url, "rejected", "replay", "--reason", "oversized", "--yes")
    assert by_reason.returncode == 0, by_reason.stderr
    assert "replayed 3 of" in by_reason.stdout
    wait_for(lambda: cases(db) == {"AS-HELD-10", *(e["case_id"] for e in big)},
             what="every oversized event applied")

    everything = aftersales(amqp_url, "rejected", "replay", "--all", "--yes", "--json")
    assert everything.returncode == 0, everything.stderr
    assert len(json.loads(everything.stdout)["replayed"]) == 2
    # Still broken: intake refuses them again, with their replay run id; nothing is lost.
    wait_for(lambda: depth(amqp, REJECTED_QUEUE) == 2, what="the two bad ones back")
    back, _ = list_held(amqp_url, REJECTED)
    assert sorted(m.reason for m in back) == ["invalid_json", "schema"]
    assert all(m.headers.get("x-replay-run") for m in back)
    with db.transaction() as s:
        events = Counter(s.execute(select(CaseEventRow.event_id)).scalars())
    assert events == Counter({"held-10": 1, **{e["event_id"]: 1 for e in big}})


def test_unrouted_decisions_are_listed_and_replayed_once_a_queue_is_bound(
    amqp: Any, amqp_url: str
) -> None:
    amqp.queue_delete(UNROUTED_QUEUE)
    declare_topology(amqp)
    apply_with_rabbitmqctl(amqp_url)
    try:
        amqp.confirm_delivery()
        for n in range(3):
            amqp.basic_publish(DECISIONS_EXCHANGE, "decision.auto_closed",
                               json.dumps({"decision_id": f"d-{n}"}).encode(),
                               pika.BasicProperties(delivery_mode=2, message_id=f"d-{n}"),
                               mandatory=True)
        wait_for(lambda: depth(amqp, UNROUTED_QUEUE) == 3, what="3 unrouted decisions")
        doc = json.loads(aftersales(amqp_url, "unrouted", "list", "--json").stdout)
        assert [(m["id"], m["reason"], m["routing_key"]) for m in doc["messages"]] == [
            (f"d-{n}", "NO_ROUTE", "decision.auto_closed") for n in range(3)]

        amqp.queue_declare("upstream.closed", durable=True)
        amqp.queue_bind("upstream.closed", DECISIONS_EXCHANGE, "decision.auto_closed")
        done = aftersales(amqp_url, "unrouted", "replay", "--all", "--yes")
        assert done.returncode == 0, done.stderr
        assert "replayed 3 of aftersales.decisions.unrouted" in done.stdout
        got = []
        while (message := amqp.basic_get("upstream.closed", auto_ack=True))[0] is not None:
            got.append(message[1].message_id)
        assert got == ["d-0", "d-1", "d-2"]
        assert depth(amqp, UNROUTED_QUEUE) == 0
    finally:
        amqp.queue_delete("upstream.closed")
        subprocess.run(["rabbitmqctl", "-q", "clear_policy", "-p", vhost_of(amqp_url),
                        POLICY_NAME], capture_output=True, timeout=60)


class OwnRabbitMQ:
    """A RabbitMQ node of this test only: its own name, ports and folders."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="aftersales-rmq-"))
        self.port = free_port()
        self.node = f"aftersales-test-{os.getpid()}-{self.port}@localhost"
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n")
        os.chmod(self.dir, 0o777)
        self.env = {**os.environ, "RABBITMQ_NODENAME": self.node,
                    "RABBITMQ_NODE_PORT": str(self.port),
                    "RABBITMQ_DIST_PORT": str(free_port()),
                    "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
                    "RABBITMQ_LOG_BASE": str(self.dir / "log"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
                    "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
                    "RABBITMQ_PID_FILE": str(self.dir / "pid")}
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def ctl(self, *args: str) -> None:
        subprocess.run(["rabbitmqctl", "-q", "-n", self.node, *args], check=True,
                       capture_output=True, timeout=120, env=self.env)

    def start(self) -> None:
        server = shutil.which("rabbitmq-server")
        assert server, "rabbitmq-server is needed to run a node of the test's own"
        subprocess.run([server, "-detached"], check=True, env=self.env, timeout=60,
                       capture_output=True)
        wait_for(self._answers, timeout=90, interval=0.5, what="the test's RabbitMQ node")

    def _answers(self) -> bool:
        try:
            pika.BlockingConnection(pika.URLParameters(self.url)).close()
            return True
        except pika.exceptions.AMQPError:
            return False

    def restart(self) -> None:
        self.ctl("stop_app")
        self.ctl("start_app")
        wait_for(self._answers, timeout=60, interval=0.2, what="RabbitMQ back")

    def stop(self) -> None:
        subprocess.run(["rabbitmqctl", "-q", "-n", self.node, "stop"], capture_output=True,
                       timeout=120, env=self.env)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def own_rabbitmq() -> Iterator[OwnRabbitMQ]:
    node = OwnRabbitMQ()
    node.start()
    try:
        yield node
    finally:
        node.stop()


def hold_rejected(url: str, n: int) -> None:
    """n messages in the rejected queue, as intake leaves them there (and nothing else)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    for queue in (REJECTED_QUEUE, INTAKE_QUEUE):
        channel.queue_delete(queue)
    declare_topology(channel)
    channel.confirm_delivery()
    for i in range(n):
        channel.basic_publish("", REJECTED_QUEUE, json.dumps(event(i)).encode(),
                              pika.BasicProperties(delivery_mode=2, headers={
                                  "x-reject-reason": "schema", "x-reject-detail": "test",
                                  "x-original-exchange": EVENTS_EXCHANGE,
                                  "x-original-routing-key": "case.opened",
                                  "x-rejected-at": int(time.time()), "trace": f"t{i}"}))
    connection.close()


def drain(url: str, queue: str) -> list[tuple[bytes, dict[str, Any]]]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    out = []
    while (got := channel.basic_get(queue, auto_ack=True))[0] is not None:
        out.append((got[2], dict(got[1].headers or {})))
    connection.close()
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("moment", ["between a confirm and its ack", "after an ack"])
def test_a_broker_restart_mid_replay_loses_nothing_and_intake_applies_each_once(
    own_rabbitmq: OwnRabbitMQ, db: Database, moment: str
) -> None:
    url = own_rabbitmq.url
    n = 300
    hold_rejected(url, n)
    # A tap on aftersales.events counts the copies on the wire; intake applies them.
    connection = pika.BlockingConnection(pika.URLParameters(url))
    tap = connection.channel()
    tap.queue_delete("test.tap")
    tap.queue_declare("test.tap", durable=True)
    tap.queue_bind("test.tap", EVENTS_EXCHANGE, "#")
    connection.close()
    processor = IntakeProcessor(db, Engine(RuleBook.load(None), WorkCalendar(None)),
                                NotificationPolicy.load(None), {"emails": [], "phones": []},
                                max_event_bytes=64 * 1024, limits=FIXED_DATE_LIMITS)
    intake = IntakeConsumer(url, processor, prefetch=200, batch_size=100)
    thread = threading.Thread(target=intake.run_forever, daemon=True)
    thread.start()
    restarted: list[int] = []

    def before_ack(replayed_so_far: int) -> None:
        # The copy is confirmed, the held message not yet acknowledged: both survive.
        if moment == "between a confirm and its ack" and replayed_so_far >= 100 \
                and not restarted:
            restarted.append(replayed_so_far)
            own_rabbitmq.restart()

    def progress(_message: Any) -> None:
        # Confirmed and acknowledged: the held message is gone, the copy kept.
        if moment == "after an ack" and not restarted:
            restarted.append(1)
            own_rabbitmq.restart()

    try:
        report = replay(url, REJECTED, Selection(everything=True), before_ack=before_ack,
                        progress=progress)
        assert restarted and report.reconnects >= 1
        assert report.left_in_queue == 0 and drain(url, REJECTED_QUEUE) == []

        def applied() -> int:
            with db.transaction() as s:
                return int(s.execute(select(func.count()).select_from(CaseEventRow))
                           .scalar_one())

        wait_for(lambda: applied() >= n, timeout=120, what="intake to apply every event")
    finally:
        intake.stop()
        thread.join(30)
    with db.transaction() as s:
        events = Counter(s.execute(select(CaseEventRow.event_id)).scalars())
    assert events == Counter({f"held-{i}": 1 for i in range(n)})  # each applied once
    on_wire = Counter(json.loads(body)["event_id"] for body, _h in drain(url, "test.tap"))
    assert set(on_wire) == {f"held-{i}" for i in range(n)}  # nothing lost
    repeated = sorted(e for e, count in on_wire.items() if count > 1)
    if moment == "between a confirm and its ack":
        # the one message whose ack the restart cut off went out twice (intake deduplicated)
        assert len(repeated) == 1 and on_wire[repeated[0]] == 2
    else:
        assert repeated == []
    headers = drain(url, INTAKE_QUEUE)
    assert headers == []  # intake took everything
