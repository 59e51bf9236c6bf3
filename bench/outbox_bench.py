#!/usr/bin/env python
"""Outbox relay benchmark (issue 15): decisions per second drained from the outbox by the
relay with publisher confirms (the whole batch in flight, rows deleted after every
confirm), beside the design it replaced in the same run: one AMQP transaction per batch
with a receipt on a ledger queue (`bench/ledger_publisher.py`).

    .venv/bin/python bench/outbox_bench.py [--rows 20000] [--batch 1000] [--rounds 3]

Not part of the test suite. Uses a database of its own (`aftersales_outbench_<pid>`,
dropped at the end) and a RabbitMQ node of its own (`tests/rabbit_node.py`, in a
temporary folder), so restarts of the machine's shared broker cannot disturb it. Rounds
alternate the two publishers so load from elsewhere on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ledger_publisher import BatchPublisher  # noqa: E402
from services.resolver.outbox import OutboxRelay  # noqa: E402
from shared.amqp import DECISIONS_EXCHANGE, OUTBOX_LEDGER_QUEUE, make_broker  # noqa: E402
from shared.confirms import ConfirmedBatchPublisher  # noqa: E402
from shared.db.session import Database, make_engine  # noqa: E402
from tests.rabbit_node import RabbitNode  # noqa: E402
from tests.resources import own_database  # noqa: E402

NAME = f"aftersales_outbench_{os.getpid()}"
ADMIN = "postgresql+psycopg://postgres@127.0.0.1/postgres"


class LedgerPublisher:
    """The replaced design: a batch and its receipt in one AMQP transaction."""

    def __init__(self, amqp_url: str) -> None:
        self.inner = BatchPublisher(amqp_url, make_broker(amqp_url))

    def publish_batch(self, messages: list) -> None:  # type: ignore[type-arg]
        receipt = json.dumps({"rows": [[0, m[3]] for m in messages]}).encode()
        self.inner.publish_batch(messages, receipt=(OUTBOX_LEDGER_QUEUE, receipt))

    def close(self) -> None:
        self.inner.close()


def fill(db: Database, rows: int) -> None:
    body = json.dumps({"decision_id": "x", "type": "decision.auto_approved",
                       "data": {"refund_fen": 1234}, "pad": "x" * 400}).encode()
    with db.sql_engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO outbox (exchange, routing_key, message_id, body, headers) "
            "SELECT :ex, 'decision.auto_approved', gen_random_uuid()::text, :body, '{}' "
            "FROM generate_series(1, :n)"), {"ex": DECISIONS_EXCHANGE, "body": body, "n": rows})


def drain(relay: OutboxRelay) -> int:
    total = 0
    while published := relay.relay_once():
        total += len(published)
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    node = RabbitNode(Path(tempfile.mkdtemp(prefix="outbench-")))
    node.start()
    amqp_url = node.url
    results: dict[str, list[float]] = {"confirms": [], "ledger (replaced)": []}
    try:
        with own_database(ADMIN, NAME) as url:
            db = Database(make_engine(url, pool_size=2))
            import pika

            channel = pika.BlockingConnection(pika.URLParameters(amqp_url)).channel()
            from shared.amqp import declare_topology

            declare_topology(channel)
            channel.queue_declare("bench.sink", durable=True)  # persisted, as upstream's queue
            channel.queue_bind("bench.sink", DECISIONS_EXCHANGE, "#")
            for _ in range(args.rounds):
                for name in results:
                    fill(db, args.rows)
                    publisher = (ConfirmedBatchPublisher(amqp_url, make_broker(amqp_url))
                                 if name == "confirms" else LedgerPublisher(amqp_url))
                    relay = OutboxRelay(db, publisher, batch=args.batch)  # type: ignore[arg-type]
                    started = time.perf_counter()
                    published = drain(relay)
                    took = time.perf_counter() - started
                    relay.close()
                    assert published == args.rows, (name, published)
                    results[name].append(args.rows / took)
                    channel.queue_purge("bench.sink")
                    channel.queue_purge(OUTBOX_LEDGER_QUEUE)
            db.sql_engine.dispose()
    finally:
        node.stop()
    print(f"outbox relay, {args.rows} decisions per round, batch {args.batch}, "
          f"{args.rounds} rounds (decisions/s, median [min-max]):")
    for name, rates in results.items():
        print(f"  {name:18s} {statistics.median(rates):8.0f}  "
              f"[{min(rates):.0f}-{max(rates):.0f}]")


if __name__ == "__main__":
    main()
