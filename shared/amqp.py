"""RabbitMQ topology and the Dramatiq broker, built by each service's composition root."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pika
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL, RabbitmqBroker
from dramatiq.common import xq_name
from pika.adapters.blocking_connection import BlockingChannel

from shared.config import split_amqp_urls

EVENTS_EXCHANGE = "aftersales.events"
DECISIONS_EXCHANGE = "aftersales.decisions"
# Decisions published while no upstream queue is bound land here instead of being lost:
# a broker *policy* (not an exchange argument, so upstream can declare the exchange as the
# contract documents it) makes this the decisions exchange's alternate exchange
# (shared/broker_policy.py); the outbox relay also keeps what comes back unrouted.
# `aftersales unrouted list|show|replay` inspect and send them again.
UNROUTED_EXCHANGE = "aftersales.decisions.unrouted"
UNROUTED_QUEUE = "aftersales.decisions.unrouted"
INTAKE_QUEUE = "aftersales.events.intake"
REJECTED_QUEUE = "aftersales.events.rejected"
# The outbox relay's receipts: one message per published batch, in the same AMQP
# transaction as the batch, so a relay restarting after a crash can tell which outbox rows
# RabbitMQ already has (services/resolver/outbox.py). Nobody else reads it.
OUTBOX_LEDGER_QUEUE = "aftersales.outbox.ledger"

# Dramatiq queues between the services.
RESOLVER_QUEUE = "aftersales.resolver"
NOTIFIER_QUEUE = "aftersales.notifier"
FIRE_DEADLINE_ACTOR = "fire_deadlines"  # args: a list of deadline ids
# args: a list of notification ids, and [earliest, latest] of their creation times (ISO
# 8601; absent in messages from before it was sent: the rows are then found by id alone).
SEND_NOTIFICATION_ACTOR = "send_notifications"


# Quorum queues count the deliveries of each message. A message delivered this many times
# without being acknowledged (each consumer holding it died, or returned it) is
# dead-lettered to the queue's dead-letter queue, where ops can look at it: it is neither
# redelivered for ever (a message that kills its consumer would stop the service) nor
# dropped (RabbitMQ 4 drops by default after 20). Node failures return in-flight messages
# too, hence room for a few. Fixed here, not a setting: every process declares the queues,
# and RabbitMQ refuses a second declaration with other arguments.
DELIVERY_LIMIT = 20


def queue_arguments(queue_type: str) -> dict[str, Any]:
    return {"x-queue-type": queue_type} if queue_type == "quorum" else {}


def work_queue_arguments(queue_type: str, dead_letter_queue: str) -> dict[str, Any]:
    """Arguments of a queue that services consume: in quorum mode, a delivery limit and
    dead-lettering to `dead_letter_queue` through the default exchange, at least once
    (RabbitMQ keeps the message until the dead-letter queue has confirmed it; this needs
    `reject-publish` overflow). Classic queues stay as they were declared before."""
    if queue_type != "quorum":
        return {}
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter_queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def topology(queue_type: str = "classic") -> list[tuple[str, dict[str, Any]]]:
    """The public exchanges and intake's queues, as (channel method, keyword arguments)
    declarations in order: one list for blocking and asynchronous channels alike."""
    args = queue_arguments(queue_type)
    return [
        ("exchange_declare", {"exchange": EVENTS_EXCHANGE, "exchange_type": "topic",
                              "durable": True}),
        ("exchange_declare", {"exchange": UNROUTED_EXCHANGE, "exchange_type": "fanout",
                              "durable": True}),
        ("queue_declare", {"queue": UNROUTED_QUEUE, "durable": True, "arguments": args}),
        ("queue_bind", {"queue": UNROUTED_QUEUE, "exchange": UNROUTED_EXCHANGE}),
        # Exactly as docs/asyncapi.yaml tells consumers to declare it (no arguments): any
        # difference would make one side's declaration fail with 406.
        ("exchange_declare", {"exchange": DECISIONS_EXCHANGE, "exchange_type": "topic",
                              "durable": True}),
        # A message intake cannot get through (its worker dies on it, again and again) ends
        # in the rejected queue with RabbitMQ's x-death header saying why.
        ("queue_declare", {"queue": INTAKE_QUEUE, "durable": True,
                           "arguments": work_queue_arguments(queue_type, REJECTED_QUEUE)}),
        ("queue_bind", {"queue": INTAKE_QUEUE, "exchange": EVENTS_EXCHANGE,
                        "routing_key": "#"}),
        ("queue_declare", {"queue": REJECTED_QUEUE, "durable": True, "arguments": args}),
        ("queue_declare", {"queue": OUTBOX_LEDGER_QUEUE, "durable": True, "arguments": args}),
    ]


def declare_topology(channel: BlockingChannel, queue_type: str = "classic") -> None:
    """Declare the public exchanges and intake's queues (idempotent)."""
    for method, kwargs in topology(queue_type):
        getattr(channel, method)(**kwargs)


def declare_topology_async(channel: Any, queue_type: str, done: Callable[[], None]) -> None:
    """:func:`declare_topology` on an asynchronous (SelectConnection) channel: each
    declaration waits for the previous one's answer, then `done()` is called."""
    declarations = topology(queue_type)

    def step(index: int) -> None:
        if index == len(declarations):
            done()
            return
        method, kwargs = declarations[index]
        getattr(channel, method)(**kwargs, callback=lambda _frame: step(index + 1))

    step(0)


class AftersalesBroker(RabbitmqBroker):
    """Dramatiq's RabbitMQ broker, with quorum queues when the deployment asks for them."""

    def __init__(self, *, queue_type: str = "classic", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.queue_type = queue_type

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        # The queue and its delay queue (.DQ): dead-lettered to the .XQ, as Dramatiq
        # does when a message has used its retries.
        arguments: dict[str, Any] = super()._build_queue_arguments(queue_name)
        arguments.update(work_queue_arguments(self.queue_type, xq_name(queue_name)))
        return arguments

    def _declare_xq_queue(self, queue_name: str) -> Any:
        # Dramatiq declares its dead-letter queue (.XQ) as a classic queue whatever the
        # others are; in a cluster it must survive the loss of a node like them.
        if self.queue_type != "quorum":
            return super()._declare_xq_queue(queue_name)
        return self.channel.queue_declare(
            queue=xq_name(queue_name), durable=True,
            arguments={**queue_arguments("quorum"), "x-message-ttl": DEAD_MESSAGE_TTL})


# AMQP heartbeats on every connection: a dead broker (or a half-open TCP connection) is
# noticed within about two of them. `?heartbeat=N` in AFTERSALES_AMQP_URL overrides it.
HEARTBEAT_SECONDS = 30


def with_heartbeat(amqp_url: str) -> str:
    if "heartbeat=" in amqp_url:
        return amqp_url
    return f"{amqp_url}{'&' if '?' in amqp_url else '?'}heartbeat={HEARTBEAT_SECONDS}"


def make_broker(amqp_url: str, queue_type: str = "classic", middleware: list | None = None
                ) -> AftersalesBroker:
    """`amqp_url` may list several nodes (comma-separated): each connection the broker
    opens tries them in turn, so workers and publishers move to another node by
    themselves when theirs goes away."""
    urls = split_amqp_urls(amqp_url)
    broker = AftersalesBroker(
        url=with_heartbeat(urls[0]), confirm_delivery=True, queue_type=queue_type,
        middleware=middleware,
    )
    # Dramatiq builds plain URLParameters; ours carry heartbeats and timeouts, one per node.
    broker.parameters = connection_parameters_list(amqp_url)
    return broker


def connection_parameters(amqp_url: str) -> pika.URLParameters:
    params = pika.URLParameters(with_heartbeat(amqp_url))
    params.blocked_connection_timeout = 60
    return params


def connection_parameters_list(amqp_url: str) -> list[pika.URLParameters]:
    """Parameters for every URL of a (comma-separated) list, for pika.BlockingConnection,
    which tries them in order. The list starts at a random node, so the clients of a
    cluster spread over its nodes instead of all crowding the first one."""
    params = [connection_parameters(url) for url in split_amqp_urls(amqp_url)]
    start = random.randrange(len(params))
    return params[start:] + params[:start]
