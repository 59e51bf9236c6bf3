# ruff: noqa: S603 - the benchmark runs rabbitmqctl with fixed arguments
"""Listing and replaying held messages (`aftersales rejected list|replay`) on this
machine's RabbitMQ, against a baseline measured in the same run.

    .venv/bin/python bench/replay_bench.py [--messages N] [--bytes B]

Uses its own vhost, deleted at the end. Phases:

  baseline  N messages published to aftersales.events with a confirm each, as
            `aftersales publish` does: the broker's confirmed-publish rate here
  list      the N messages of aftersales.events.rejected listed without being taken
  replay    all N replayed (publish, wait for its confirm, ack; one message at a time)
Prints messages/s for each.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
import uuid

import pika

from services.ops.held import REJECTED, Selection, list_held, replay
from shared.amqp import INTAKE_QUEUE, REJECTED_QUEUE, declare_topology
from shared.publish_events import publish_lines


def ctl(*args: str) -> None:
    tool = shutil.which("rabbitmqctl")
    assert tool, "rabbitmqctl is needed (the benchmark makes a vhost of its own)"
    subprocess.run([tool, "-q", *args], check=True, capture_output=True, timeout=60)


def fill_rejected(url: str, n: int, size: int) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    declare_topology(channel)
    channel.queue_purge(INTAKE_QUEUE)
    channel.confirm_delivery()
    for i in range(n):
        channel.basic_publish("", REJECTED_QUEUE, json.dumps(
            {"event_id": f"bench-{i}", "pad": "x" * size}).encode(), pika.BasicProperties(
            delivery_mode=2, headers={"x-reject-reason": "schema", "x-reject-detail": "bench",
                                      "x-rejected-at": int(time.time()),
                                      "x-original-routing-key": "case.opened"}))
    connection.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--bytes", type=int, default=400)
    args = parser.parse_args()
    vhost = f"aftersales-bench-replay-{uuid.uuid4().hex[:6]}"
    ctl("add_vhost", vhost)
    ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    try:
        lines = [json.dumps({"event_id": f"base-{i}", "type": "case.opened",
                             "pad": "x" * args.bytes}).encode() for i in range(args.messages)]
        started = time.perf_counter()
        publish_lines(url, lines)
        baseline = time.perf_counter() - started

        fill_rejected(url, args.messages, args.bytes)
        started = time.perf_counter()
        found, _total = list_held(url, REJECTED)
        listed = time.perf_counter() - started
        started = time.perf_counter()
        report = replay(url, REJECTED, Selection(everything=True))
        replayed = time.perf_counter() - started
        assert len(found) == len(report.replayed) == args.messages and not report.left_in_queue
        n = args.messages
        print(f"{n} messages of {args.bytes} bytes")
        print(f"  baseline: publish with a confirm each  {n / baseline:8.0f} msg/s")
        print(f"  list (basic.get, nothing taken)        {n / listed:8.0f} msg/s")
        print(f"  replay (publish, confirm, then ack)    {n / replayed:8.0f} msg/s")
    finally:
        ctl("delete_vhost", vhost)


if __name__ == "__main__":
    main()
