"""RabbitMQ topology and the Dramatiq broker, built by each service's composition root."""

from __future__ import annotations

from typing import Any

import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from pika.adapters.blocking_connection import BlockingChannel

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
SEND_NOTIFICATION_ACTOR = "send_notifications"  # args: a list of notification ids


def queue_arguments(queue_type: str) -> dict[str, Any]:
    return {"x-queue-type": queue_type} if queue_type == "quorum" else {}


def declare_topology(channel: BlockingChannel, queue_type: str = "classic") -> None:
    """Declare the public exchanges and intake's queues (idempotent)."""
    args = queue_arguments(queue_type)
    channel.exchange_declare(EVENTS_EXCHANGE, exchange_type="topic", durable=True)
    channel.exchange_declare(UNROUTED_EXCHANGE, exchange_type="fanout", durable=True)
    channel.queue_declare(UNROUTED_QUEUE, durable=True, arguments=args)
    channel.queue_bind(UNROUTED_QUEUE, UNROUTED_EXCHANGE)
    # Exactly as docs/asyncapi.yaml tells consumers to declare it (no arguments): any
    # difference would make one side's declaration fail with 406.
    channel.exchange_declare(DECISIONS_EXCHANGE, exchange_type="topic", durable=True)
    channel.queue_declare(INTAKE_QUEUE, durable=True, arguments=args)
    channel.queue_bind(INTAKE_QUEUE, EVENTS_EXCHANGE, routing_key="#")
    channel.queue_declare(REJECTED_QUEUE, durable=True, arguments=args)
    channel.queue_declare(OUTBOX_LEDGER_QUEUE, durable=True, arguments=args)


class AftersalesBroker(RabbitmqBroker):
    """Dramatiq's RabbitMQ broker, with quorum queues when the deployment asks for them."""

    def __init__(self, *, queue_type: str = "classic", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.queue_type = queue_type

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        arguments: dict[str, Any] = super()._build_queue_arguments(queue_name)
        arguments.update(queue_arguments(self.queue_type))
        return arguments


# AMQP heartbeats on every connection: a dead broker (or a half-open TCP connection) is
# noticed within about two of them. `?heartbeat=N` in AFTERSALES_AMQP_URL overrides it.
HEARTBEAT_SECONDS = 30


def with_heartbeat(amqp_url: str) -> str:
    if "heartbeat=" in amqp_url:
        return amqp_url
    return f"{amqp_url}{'&' if '?' in amqp_url else '?'}heartbeat={HEARTBEAT_SECONDS}"


def make_broker(amqp_url: str, queue_type: str = "classic", middleware: list | None = None
                ) -> AftersalesBroker:
    broker = AftersalesBroker(
        url=with_heartbeat(amqp_url), confirm_delivery=True, queue_type=queue_type,
        middleware=middleware,
    )
    return broker


def connection_parameters(amqp_url: str) -> pika.URLParameters:
    params = pika.URLParameters(with_heartbeat(amqp_url))
    params.blocked_connection_timeout = 60
    return params
