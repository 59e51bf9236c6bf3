"""Messages held aside by the system: `aftersales.events.rejected` (what intake refused) and
`aftersales.decisions.unrouted` (decisions no upstream queue was bound for). List them
without taking them, and replay them.

Listing reads the queue with `basic.get` without acknowledging and closes the channel at
the end, which gives every message back to the queue. RabbitMQ puts a message given back
at its old place in a classic queue, so the order stays; the message is marked
`redelivered`, and a quorum queue counts one more delivery (`x-delivery-count`): with a
`delivery-limit` policy on these queues, each listing takes one attempt. Messages other
clients hold unacknowledged at that moment are not seen; nothing else consumes these
queues.

Replay publishes the original body with its non-routing headers and waits for RabbitMQ's
publisher confirm (persistent, on a durable queue); only then is the held message
acknowledged, so nothing leaves the held queue before its copy is safe. A broker failure
before the confirm leaves the held message in place: after reconnecting it is replayed
then. A failure after the confirm and before the broker saw the ack (the ack is sent at
once, so this is the time of one round trip) leaves both: that one message is replayed
twice, with the same body, `event_id` or `decision_id`, which intake and upstream
deduplicate. (An AMQP transaction around publish and ack would not close that window:
RabbitMQ does not promise a transaction atomic across queues, so a broker crash during
`tx.commit` could apply the ack and lose the copy.) Each copy carries `x-replay-run` and
`x-replay-of`, so a copy that comes back during the same run (intake refusing it again) is
not replayed again in a loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pika.exceptions

from shared.amqp import (
    DECISIONS_EXCHANGE,
    EVENTS_EXCHANGE,
    REJECTED_QUEUE,
    UNROUTED_QUEUE,
    connection_parameters_list,
    declare_topology,
)
from shared.domain.timeutil import as_utc

log = logging.getLogger(__name__)

# Headers that say where a message was held or why, or that route it: never replayed.
# (CC and BCC would copy the message to other queues: sender-selected distribution.)
DROPPED_HEADERS = {"cc", "bcc", "x-death", "x-first-death-exchange", "x-first-death-queue",
                   "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue",
                   "x-last-death-reason", "x-delivery-count", "x-rejected-at",
                   "x-replay-run", "x-replay-of"}
DROPPED_PREFIXES = ("x-reject-", "x-original-", "x-unrouted-")


@dataclass(frozen=True)
class HeldKind:
    name: str  # what the command calls it: rejected | unrouted
    queue: str
    target_exchange: str  # where a replay publishes
    reason_header: str
    detail_header: str | None
    default_reason: str  # when the header is missing (older copies, alternate exchange)


REJECTED = HeldKind("rejected", REJECTED_QUEUE, EVENTS_EXCHANGE, "x-reject-reason",
                    "x-reject-detail", "unknown")
UNROUTED = HeldKind("unrouted", UNROUTED_QUEUE, DECISIONS_EXCHANGE, "x-unrouted-reason",
                    None, "NO_ROUTE")
KINDS = {k.name: k for k in (REJECTED, UNROUTED)}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


@dataclass(frozen=True)
class HeldMessage:
    """One held message, as read (not taken) from its queue."""

    id: str
    kind: str
    reason: str
    detail: str | None
    held_at: datetime | None
    routing_key: str  # the routing key it was first published with
    message_id: str | None
    headers: dict[str, Any]
    body: bytes
    properties: pika.BasicProperties = field(repr=False, compare=False)
    redelivered: bool = False

    def replay_headers(self) -> dict[str, Any]:
        return {k: v for k, v in self.headers.items()
                if k.lower() not in DROPPED_HEADERS and not k.lower().startswith(DROPPED_PREFIXES)}

    def body_text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "reason": self.reason, "detail": self.detail,
                "held_at": self.held_at.isoformat() if self.held_at else None,
                "routing_key": self.routing_key, "message_id": self.message_id,
                "bytes": len(self.body)}

    def document(self) -> dict[str, Any]:
        return {**self.summary(), "headers": _jsonable(self.headers),
                "replay_headers": _jsonable(self.replay_headers()),
                "redelivered": self.redelivered, "body": self.body_text()}


def message_key(kind: HeldKind, method: Any, props: pika.BasicProperties, body: bytes
                ) -> HeldMessage:
    headers = dict(props.headers or {})
    held_at: datetime | None = None
    stamp = headers.get("x-rejected-at", props.timestamp)
    if isinstance(stamp, int | float) and not isinstance(stamp, bool):
        held_at = datetime.fromtimestamp(stamp, UTC)
    elif isinstance(stamp, datetime):
        held_at = stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
    if held_at is None and kind is UNROUTED:  # through the alternate exchange: no header
        try:
            decided = json.loads(body).get("decided_at")
            held_at = as_utc(datetime.fromisoformat(decided)) if decided else None
        except (ValueError, AttributeError, TypeError):
            held_at = None
    # Published straight to the queue (intake's copies, the relay's returns) the routing
    # key is the queue's name; the header has the original. Through the alternate
    # exchange the delivery keeps the original key.
    original_key = _text(headers.get("x-original-routing-key"))
    if original_key is None:
        original_key = "" if method.routing_key == kind.queue else method.routing_key
    reason = _text(headers.get(kind.reason_header)) or kind.default_reason
    detail = _text(headers.get(kind.detail_header)) if kind.detail_header else None
    explicit = _text(headers.get("x-rejection-id"))
    if explicit:
        ident = explicit
    elif kind is UNROUTED and props.message_id:
        ident = str(props.message_id)  # the decision_id: unique by design
    else:
        # Content address: the same message keeps its id for as long as it is held.
        digest = hashlib.sha256()
        for part in (body, reason.encode(), str(stamp).encode(),
                     str(props.message_id).encode(), (detail or "").encode()):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
        ident = digest.hexdigest()[:16]
    return HeldMessage(ident, kind.name, reason, detail, held_at, original_key,
                       _text(props.message_id), headers, body, props,
                       bool(getattr(method, "redelivered", False)))


_RELATIVE = re.compile(r"^(\d+)\s*([smhd])$")


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """`2026-11-27T10:00:00+08:00`, `2026-11-27` (UTC midnight), or `30m` / `2h` / `7d` ago."""
    match = _RELATIVE.match(value.strip())
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return (now or datetime.now(UTC)) - timedelta(**{unit: int(match.group(1))})
    parsed = datetime.fromisoformat(value.strip())
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Selection:
    """Which held messages: by id, by reason, by routing key, since a time; or all."""

    ids: frozenset[str] = frozenset()
    reason: str | None = None
    routing_key: str | None = None
    since: datetime | None = None
    everything: bool = False

    @property
    def empty(self) -> bool:
        return not (self.ids or self.reason or self.routing_key or self.since or self.everything)

    def matches(self, message: HeldMessage) -> bool:
        if self.ids and message.id not in self.ids:
            return False
        if self.reason and message.reason != self.reason:
            return False
        if self.routing_key and message.routing_key != self.routing_key:
            return False
        if self.since and (message.held_at is None or message.held_at < self.since):
            return False
        return True


def _connect(amqp_url: str, queue_type: str = "classic"
             ) -> tuple[pika.BlockingConnection, Any]:
    connection = pika.BlockingConnection(connection_parameters_list(amqp_url))
    channel = connection.channel()
    # Declared as the services declare them: another queue type (or its arguments)
    # than the queues have would be refused (406).
    declare_topology(channel, queue_type)
    return connection, channel


def depth(channel: Any, queue: str) -> int:
    return int(channel.queue_declare(queue, passive=True).method.message_count)


def depths(amqp_url: str, queue_type: str = "classic") -> dict[str, int]:
    """Messages waiting in each held queue."""
    connection, channel = _connect(amqp_url, queue_type)
    try:
        return {kind.name: depth(channel, kind.queue) for kind in KINDS.values()}
    finally:
        connection.close()


def list_held(amqp_url: str, kind: HeldKind, selection: Selection | None = None,
              limit: int = 10_000, queue_type: str = "classic"
              ) -> tuple[list[HeldMessage], int]:
    """The held messages that match, in queue order, and how many the queue holds. Takes
    none of them: the channel closes without acknowledging."""
    connection, channel = _connect(amqp_url, queue_type)
    try:
        total = depth(channel, kind.queue)
        found: list[HeldMessage] = []
        for _ in range(total):  # what arrives meanwhile is behind: not this listing's
            method, props, body = channel.basic_get(kind.queue, auto_ack=False)
            if method is None:
                break
            message = message_key(kind, method, props, body)
            if selection is None or selection.matches(message):
                found.append(message)
                if len(found) >= limit:
                    break
        return found, total
    finally:
        connection.close()  # gives every message back, in its place


def find_held(amqp_url: str, kind: HeldKind, ident: str, queue_type: str = "classic"
              ) -> HeldMessage | None:
    found, _ = list_held(amqp_url, kind, Selection(ids=frozenset({ident})), limit=1,
                         queue_type=queue_type)
    return found[0] if found else None


@dataclass
class ReplayReport:
    kind: str
    dry_run: bool
    run_id: str
    replayed: list[HeldMessage] = field(default_factory=list)
    # not taken by the target exchange (no queue bound, or nacked): still held
    returned: list[str] = field(default_factory=list)
    reconnects: int = 0
    left_in_queue: int = 0

    def document(self) -> dict[str, Any]:
        return {"kind": self.kind, "dry_run": self.dry_run, "run_id": self.run_id,
                "replayed": [m.summary() for m in self.replayed],
                "returned_to_queue": self.returned, "reconnects": self.reconnects,
                "left_in_queue": self.left_in_queue}


Progress = Callable[[HeldMessage], None]


def replay(amqp_url: str, kind: HeldKind, selection: Selection, *, dry_run: bool = False,
           progress: Progress | None = None, give_up_after: float = 120.0,
           before_ack: Callable[[int], None] | None = None,
           queue_type: str = "classic") -> ReplayReport:
    """Replay every held message `selection` matches (see the module's docstring).
    Reconnects after a broker failure for up to `give_up_after` seconds without progress,
    then raises; what was replayed before stays done (each one was printed).
    `before_ack(n)` runs between a copy's confirm and the held message's ack, with the
    number replayed so far (tests restart the broker there)."""
    if selection.empty:
        raise ValueError("nothing selected: give ids, a filter, or all")
    report = ReplayReport(kind.name, dry_run, uuid.uuid4().hex[:12])
    failing_since: float | None = None
    backoff = 0.2
    while True:
        done_before = len(report.replayed)
        try:
            if report.dry_run:
                report.replayed.clear()  # a dry run starts its count over after a failure
            _replay_pass(amqp_url, kind, selection, report, progress, before_ack, queue_type)
            return report
        except (pika.exceptions.AMQPError, OSError) as exc:
            now = time.monotonic()
            if len(report.replayed) > done_before:
                failing_since = None  # it was getting on: count the outage from now
            failing_since = failing_since or now
            if now - failing_since > give_up_after:
                raise
            report.reconnects += 1
            log.warning("replay: broker connection lost (%s); %d replayed so far; "
                        "reconnecting in %.1fs", exc, len(report.replayed), backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)


def _replay_pass(amqp_url: str, kind: HeldKind, selection: Selection, report: ReplayReport,
                 progress: Progress | None, before_ack: Callable[[int], None] | None,
                 queue_type: str = "classic") -> None:
    connection, channel = _connect(amqp_url, queue_type)
    try:
        if not report.dry_run:
            channel.confirm_delivery()
        total = depth(channel, kind.queue)
        seen = 0
        while seen < total:  # only what was there when this pass began
            method, props, body = channel.basic_get(kind.queue, auto_ack=False)
            if method is None:
                break
            seen += 1
            message = message_key(kind, method, props, body)
            if _text(message.headers.get("x-replay-run")) == report.run_id:
                continue  # our own replay, refused again meanwhile: not in a loop
            if not selection.matches(message) or message.id in report.returned:
                continue
            if not report.dry_run and not _send_again(
                    connection, channel, kind, report, method.delivery_tag, message,
                    before_ack):
                continue
            report.replayed.append(message)
            if progress:
                progress(message)
    finally:
        if connection.is_open:
            connection.close()  # what was not replayed goes back, in its place
    report.left_in_queue = depths(amqp_url, queue_type)[kind.name]


def _send_again(connection: pika.BlockingConnection, channel: Any, kind: HeldKind,
                report: ReplayReport, tag: int, message: HeldMessage,
                before_ack: Callable[[int], None] | None) -> bool:
    """Publish the copy and wait for RabbitMQ's confirm; only then take the held message
    off its queue. False if the broker would not route it (it stays held)."""
    headers = message.replay_headers()
    headers["x-replay-run"] = report.run_id
    headers["x-replay-of"] = message.id
    props = message.properties
    try:
        channel.basic_publish(
            exchange=kind.target_exchange,
            routing_key=message.routing_key or "replayed",
            body=message.body,
            properties=pika.BasicProperties(
                content_type=props.content_type or "application/json",
                content_encoding=props.content_encoding, message_id=props.message_id,
                timestamp=props.timestamp, correlation_id=props.correlation_id,
                type=props.type, app_id=props.app_id, delivery_mode=2, headers=headers),
            mandatory=True)  # in confirm mode: returns once confirmed, raises if not
    except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
        # No queue was bound (and no alternate exchange), or the broker refused it: the
        # held message stays where it is, unacknowledged until this pass ends.
        report.returned.append(message.id)
        log.warning("replay: %s was not taken by %s (%s); it stays in %s", message.id,
                    kind.target_exchange, type(exc).__name__, kind.queue)
        return False
    if before_ack:
        before_ack(len(report.replayed))
    channel.basic_ack(tag)
    connection.process_data_events(0)  # the ack leaves now, not with the next request
    return True
