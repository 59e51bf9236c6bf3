"""Pieces of the cluster scenario shared by the cluster test and the cluster benchmark:
the services' settings for a cluster, paced publishing to any node, a decision tap on a
quorum queue, and the end-of-run judgement (lost, duplicated)."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pika
import pika.exceptions
from sqlalchemy import func, select, text

from shared.amqp import (
    DECISIONS_EXCHANGE,
    EVENTS_EXCHANGE,
    connection_parameters_list,
    declare_topology,
    queue_arguments,
)
from shared.db.models import CaseEventRow, DeadlineRow, DecisionRow
from shared.db.session import Database
from shared.domain import decision_key
from shared.domain.model import DECISION_NAMESPACE
from shared.logs import mask_pii
from tests.cluster.rabbit_cluster import Node
from tests.conftest import wait_for
from tests.harness import Gateway, System, process_group_members
from tests.platform_messages import douyin_body, douyin_data, douyin_headers, douyin_message

TAP_QUEUE = "test.cluster.decision-tap"
MARKER_PREFIX = "cluster-marker-"


def service_env(database_url: str, amqp_urls: str, redis_prefix: str) -> dict[str, str]:
    """Settings of every service copy: the node list, quorum queues, quick pick-up of
    what a fault left behind, notifications sent at any hour."""
    return {
        "AFTERSALES_DATABASE_URL": database_url,
        "AFTERSALES_AMQP_URL": amqp_urls,
        "AFTERSALES_QUEUE_TYPE": "quorum",
        "AFTERSALES_REDIS_PREFIX": redis_prefix,
        "AFTERSALES_EMAIL_TRANSPORT": "log",
        "AFTERSALES_QUIET_HOURS": "off",
        "AFTERSALES_TIMER_POLL_SECONDS": "0.1",
        "AFTERSALES_OUTBOX_POLL_SECONDS": "0.1",
        # A deadline dispatched into a message a fault lost is sent again after this.
        "AFTERSALES_TIMER_REDISPATCH_SECONDS": "10",
        "AFTERSALES_WORKER_THREADS": "2",
        "AFTERSALES_LOG_LEVEL": "INFO",
    }


def connect(amqp_urls: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(connection_parameters_list(amqp_urls))


@dataclass
class Published:
    count: int = 0  # messages confirmed: bodies[:count]
    republished_chunks: int = 0  # chunks published again after their node went away


def publish_paced(amqp_urls: str, bodies: list[bytes], rate: float,
                  stop: threading.Event | None = None, give_up_after: float = 180,
                  queue_type: str = "quorum") -> Published:
    """Publish as an upstream system does: paced, confirmed, to any node of the list; a
    chunk not confirmed (its node went away) is published again on another node (intake
    dedups by event_id). Ends with `bodies` or when `stop` is set."""
    chunk = max(1, int(rate / 10))
    started = time.monotonic()
    result = Published()
    connection: pika.BlockingConnection | None = None
    channel: Any = None
    for i in range(0, len(bodies), chunk):
        if stop is not None and stop.is_set():
            break
        # Pacing the offered load (a rate, not a condition to wait for).
        time.sleep(max(0.0, started + i / rate - time.monotonic()))
        deadline = time.monotonic() + give_up_after
        while True:
            try:
                if channel is None or not channel.is_open:
                    connection = connect(amqp_urls)
                    channel = connection.channel()
                    declare_topology(channel, queue_type)
                    channel.confirm_delivery()
                for body in bodies[i:i + chunk]:
                    channel.basic_publish(EVENTS_EXCHANGE, "sim", body,
                                          pika.BasicProperties(delivery_mode=2),
                                          mandatory=True)
                result.count = min(len(bodies), i + chunk)
                break
            except (pika.exceptions.AMQPError, OSError):
                if connection is not None and connection.is_open:
                    try:
                        connection.close()
                    except (pika.exceptions.AMQPError, OSError):
                        pass
                channel = None
                result.republished_chunks += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # the node is going away: the next connect picks another
    if connection is not None and connection.is_open:
        connection.close()
    return result


def client_nodes(system: System, nodes: list[Node]) -> dict[str, set[str]]:
    """For each running service copy, the broker nodes its processes hold established
    AMQP connections to (from the kernel's socket table: what the processes really do,
    not what they log)."""
    port_to_node = {node.port: node.name for node in nodes}
    out = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    by_pid: dict[int, set[str]] = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        peer_port = int(fields[3].rsplit(":", 1)[1])
        if peer_port not in port_to_node:
            continue
        for pid in re.findall(r"pid=(\d+)", line):
            by_pid.setdefault(int(pid), set()).add(port_to_node[peer_port])
    result: dict[str, set[str]] = {}
    for name, proc in system.procs.items():
        connected: set[str] = set()
        for pid, _comm in process_group_members(proc.pid):
            connected |= by_pid.get(pid, set())
        result[name] = connected
    return result


def await_clients_moved(system: System, nodes: list[Node], lost: Node,
                        before: dict[str, set[str]], timeout: float = 120
                        ) -> dict[str, set[str]]:
    """Wait until no service copy is connected to the `lost` node, and every copy that was
    connected before (`before`) is connected to another node: each found one by itself.
    (A timer connects only when it has something to hand over: an idle one may have no
    connection at all.)"""

    last: dict[str, set[str]] = {}

    def moved() -> dict[str, set[str]] | None:
        last.clear()
        last.update(client_nodes(system, nodes))
        ok = all(lost.name not in names and (names or not before.get(name))
                 for name, names in last.items())
        return last if ok else None

    try:
        return wait_for(moved, timeout=timeout, interval=0.2,
                        what=f"every service copy connected to a node other than {lost.name}")
    except AssertionError as exc:
        stuck = {name: sorted(names) for name, names in last.items()
                 if lost.name in names or (not names and before.get(name))}
        raise AssertionError(f"{exc}; not moved: {stuck}") from None


class ClusterTap:
    """Collects everything published to `aftersales.decisions`, through a quorum queue
    of its own (it survives the loss of any one node), from whichever node answers.

    A message given back by RabbitMQ after the tap's connection broke (flagged
    `redelivered`) is counted only if the tap never saw it: only a second *publish* of
    a decision counts as a duplicate."""

    def __init__(self, amqp_urls: str) -> None:
        self.amqp_urls = amqp_urls
        self.counts: Counter[str] = Counter()  # decision_id -> copies published
        self.redelivered = 0
        self.reconnects = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ClusterTap:
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("decision tap did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                connection = connect(self.amqp_urls)
                channel = connection.channel()
                declare_topology(channel, "quorum")
                if not self._ready.is_set():
                    channel.queue_delete(TAP_QUEUE)  # a fresh tap sees only what comes next
                channel.queue_declare(TAP_QUEUE, durable=True,
                                      arguments=queue_arguments("quorum"))
                channel.queue_bind(TAP_QUEUE, DECISIONS_EXCHANGE, "#")
                channel.basic_qos(prefetch_count=500)
                self._ready.set()
                for method, _props, body in channel.consume(TAP_QUEUE, inactivity_timeout=0.1):
                    if self._stop.is_set():
                        break
                    if method is None:
                        continue
                    decision_id = str(json.loads(body).get("decision_id"))
                    with self._lock:
                        if method.redelivered and self.counts[decision_id]:
                            self.redelivered += 1
                        else:
                            self.counts[decision_id] += 1
                    channel.basic_ack(method.delivery_tag)
                connection.close()
            except (pika.exceptions.AMQPError, OSError):
                self.reconnects += 1
                time.sleep(0.2)

    def decisions(self) -> Counter[str]:
        with self._lock:
            return Counter({k: v for k, v in self.counts.items()
                            if not k.startswith(MARKER_PREFIX)})

    def catch_up(self, timeout: float = 120) -> Counter[str]:
        """Everything published so far: a marker published now arrives after it all."""
        marker = f"{MARKER_PREFIX}{uuid.uuid4()}"
        connection = connect(self.amqp_urls)
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish(DECISIONS_EXCHANGE, "test.marker",
                                  json.dumps({"decision_id": marker}).encode(),
                                  pika.BasicProperties(delivery_mode=2), mandatory=True)
        finally:
            connection.close()

        def seen() -> bool:
            with self._lock:
                return self.counts[marker] > 0

        wait_for(seen, timeout=timeout, what="the tap to catch up with the exchange")
        return self.decisions()


@dataclass
class Judgement:
    """What the run did to the events, deadlines, decisions and notifications."""

    events: int
    lost_events: int
    deadlines_fired: int
    decisions: int  # in the database
    lost_decisions: int  # a fired deadline without its decision, or not on the wire
    duplicated_decisions: int  # extra copies on the wire
    wrong_decisions: int  # on the wire, but not a decision of the database
    notifications_sent: int
    duplicated_notifications: int
    lost_notifications: int  # recorded `sent`, but no provider (the log channel) got it
    # Sent, but recorded otherwise: "unknown" (failed, its claim lost track of it) is the
    # honest record of a send whose worker could not record it; anything else is wrong.
    sent_but_recorded_unknown: int = 0
    sent_but_recorded_wrong: int = 0
    details: dict[str, Any] = field(default_factory=dict)


def event_ids_logged(db: Database) -> set[str]:
    try:
        with db.transaction() as s:
            return set(s.execute(select(CaseEventRow.event_id)).scalars())
    except Exception:
        return set()


@dataclass
class Settled:
    """The database at one moment once everything due had been done: the deadlines fired
    and the decisions made by then (later ones, of deadlines coming due since, are not
    judged: they may still be on their way)."""

    cutoff: datetime
    fired: list[Any]
    decision_ids: set[str]


def await_quiet(db: Database, good_ids: set[str], tap: ClusterTap, timeout: float = 300
                ) -> Settled:
    """Wait until every event is in a case log, every deadline due so far has fired,
    every decision made so far is on the wire and no notification is waiting to be
    handed over or sent."""
    wait_for(lambda: event_ids_logged(db) >= good_ids, timeout=timeout,
             what="every accepted event in a case log")
    cutoff = datetime.now(UTC)

    def overdue() -> int:
        with db.transaction() as s:
            return int(s.execute(select(text("count(*)")).select_from(DeadlineRow).where(
                DeadlineRow.status.in_(("pending", "dispatched")),
                DeadlineRow.due_at <= cutoff)).scalar_one())

    wait_for(lambda: overdue() == 0, timeout=timeout, what="every due deadline fired")
    with db.transaction() as s:  # one snapshot: the decisions of exactly these deadlines
        fired = list(s.execute(select(DeadlineRow).where(DeadlineRow.status == "fired")
                               ).scalars().all())
        decision_ids = set(s.execute(select(DecisionRow.decision_id)).scalars())
    wait_for(lambda: set(tap.decisions()) >= decision_ids, timeout=timeout,
             what="every decision on the wire")

    def unsettled() -> int:
        with db.transaction() as s:
            return int(s.execute(text(
                "SELECT count(*) FROM notifications WHERE status IN "
                "('new', 'queued', 'sending')")).scalar_one())

    wait_for(lambda: unsettled() == 0, timeout=timeout,
             what="every notification sent (or deferred by a rate limit)")
    return Settled(cutoff, fired, decision_ids)


def logged_sends(log_text: str) -> Counter[str]:
    """Sends per dedup key. The log masks digit runs that look like phone numbers, in
    dedup keys too ("…b167****4415b5"): the keys are as the log writes them."""
    return Counter(re.findall(r"sent via \w+ id=\S* key=([\w*]+)", log_text))


IN_FLIGHT = ("new", "queued", "sending")


def notifications_and_sends(db: Database, notifier_log: Callable[[], str],
                            timeout: float = 60.0) -> tuple[list[Any], str]:
    """The notifications table, then the notifier's log. The services still run while
    the test judges (deadlines keep falling due), so a row read `new` may be sent before
    the log is read: its send line would then look like a send recorded wrongly. Read
    again until no row still in flight has a send line; a row that stays so (a send
    that is never recorded) is left for the judgement to count."""
    def reading() -> tuple[list[Any], str]:
        with db.transaction() as s:
            records = list(s.execute(text(
                "SELECT dedup_key, status, last_error FROM notifications")))
        return records, notifier_log()

    def consistent(read: tuple[list[Any], str]) -> bool:
        records, log_text = read
        sends = logged_sends(log_text)
        return not any(r.status in IN_FLIGHT and mask_pii(r.dedup_key) in sends
                       for r in records)

    read: tuple[list[Any], str] = wait_for(reading, until=consistent, timeout=timeout,
                                           interval=0.5, or_last=True,
                                           what="no row in flight with a send line")
    return read


def judge(db: Database, good_ids: set[str], settled: Settled, wire: Counter[str],
          notifier_log: Callable[[], str]) -> Judgement:
    """`wire`: every copy on the tap, taken after `settled` (so it holds all of its
    decisions, and perhaps some made since). `notifier_log` is read after the
    notifications table: the notifier logs a send before it records it, so every row
    seen `sent` has its line by then."""
    logged = event_ids_logged(db)
    fired, decision_ids = settled.fired, settled.decision_ids
    with db.transaction() as s:
        all_decisions = set(s.execute(select(DecisionRow.decision_id)).scalars())
    records, log_text = notifications_and_sends(db, notifier_log)
    sent_keys = {r.dedup_key for r in records if r.status == "sent"}
    # Each fired deadline's decision, computed from the deadline row as the resolver does.
    expected = {
        str(uuid.uuid5(DECISION_NAMESPACE, decision_key(
            d.case_id, d.step, d.fence, d.purpose, d.deadline_at,
            d.due_at if d.purpose == "reminder" else None)))
        for d in fired
    }
    not_decided = expected - decision_ids
    not_published = decision_ids - set(wire)
    sends = logged_sends(log_text)
    sent_keys = {mask_pii(key) for key in sent_keys}
    not_sent = ((mask_pii(r.dedup_key), r.status, (r.last_error or "")[:120])
                for r in records if r.status != "sent")
    recorded_otherwise = [row for row in not_sent if row[0] in sends]
    unknown = [r for r in recorded_otherwise
               if r[1] == "failed" and r[2].startswith("unknown")]
    return Judgement(
        events=len(good_ids),
        lost_events=len(good_ids - logged),
        deadlines_fired=len(fired),
        decisions=len(decision_ids),
        lost_decisions=len(not_decided | not_published),
        duplicated_decisions=sum(n - 1 for n in wire.values() if n > 1),
        wrong_decisions=len(set(wire) - all_decisions),
        notifications_sent=sum(sends.values()),
        duplicated_notifications=sum(n - 1 for n in sends.values() if n > 1),
        lost_notifications=len(sent_keys - set(sends)),
        sent_but_recorded_unknown=len(unknown),
        sent_but_recorded_wrong=len(recorded_otherwise) - len(unknown),
        details={"sent_rows": len(sent_keys), "send_lines": log_text.count("sent via "),
                 "sent_but_recorded_otherwise": recorded_otherwise[:5],
                 "sent_without_a_send_line": sorted(sent_keys - set(sends))[:5],
                 "not_decided": sorted(not_decided)[:5],
                 "not_published": sorted(not_published)[:5],
                 "repeated": [k for k, n in wire.items() if n > 1][:5]},
    )


DOUYIN_OK = {"code": 0, "msg": "success"}


@dataclass
class Pushed:
    """What the platform pushed through the gateways and was answered with success."""

    msg_ids: list[str] = field(default_factory=list)
    batches: int = 0
    retries: int = 0  # requests sent again after an answer other than the success body
    failed_answers: Counter[str] = field(default_factory=Counter)  # why each retry was needed


def push_douyin_paced(gateways: list[Gateway], run_id: str, batches_per_second: float,
                      per_batch: int, stop: threading.Event, first_aftersale_id: int,
                      give_up_after: float = 180, result: Pushed | None = None) -> Pushed:
    """Push batches of signed Douyin messages (refund requests, tag 200) as the platform
    does, spread over the gateway copies, until `stop` is set. A batch not answered with
    the success body is sent again (through the other copy, as the platform's load
    balancer would) until it is; every message keeps its msg_id, so intake applies it once.
    `result` (if given) is filled in as it goes, for other threads to watch."""
    result = Pushed() if result is None else result
    started = time.monotonic()
    number = 0
    while not stop.is_set():
        # Pacing the offered load (a rate, not a condition to wait for).
        time.sleep(max(0.0, started + result.batches / batches_per_second - time.monotonic()))
        msg_ids = [f"{run_id}-{number + i}" for i in range(per_batch)]
        body = douyin_body(*[douyin_message("200", msg_id, douyin_data(
            first_aftersale_id + number + i, status=6, type_=1,
            apply_time=int(datetime.now(UTC).timestamp())))
            for i, msg_id in enumerate(msg_ids)])
        headers = douyin_headers(body)
        target = result.batches
        deadline = time.monotonic() + give_up_after
        while True:
            gateway = gateways[target % len(gateways)]
            try:
                answer = gateway.post("douyin", body, headers)
                if answer.status_code == 200 and answer.json() == DOUYIN_OK:
                    break
                why = str(answer.status_code)
            except (httpx.HTTPError, ValueError) as exc:
                why = type(exc).__name__
            result.retries += 1
            result.failed_answers[why] += 1
            if time.monotonic() > deadline:
                raise AssertionError(f"batch {msg_ids[0]}.. not taken in {give_up_after}s "
                                     f"(answers: {dict(result.failed_answers)})")
            target += 1
            time.sleep(0.5)  # the platform's retry interval
        result.msg_ids += msg_ids
        result.batches += 1
        number += per_batch
    return result


def gateway_event_counts(db: Database, run_id: str) -> Counter[tuple[str, str]]:
    """(event_id, outcome) -> rows in the case logs, for the events pushed in this run."""
    with db.transaction() as s:
        rows = s.execute(
            select(CaseEventRow.event_id, CaseEventRow.outcome, func.count())
            .where(CaseEventRow.event_id.like(f"douyin-{run_id}-%"))
            .group_by(CaseEventRow.event_id, CaseEventRow.outcome)).all()
    return Counter({(event_id, outcome): int(n) for event_id, outcome, n in rows})
