"""The peer of `bench/timer_bench.py`: a no-op Dramatiq actor whose messages are delayed
with Dramatiq's own `send_with_options(delay=...)`.

Loaded by the `dramatiq` CLI (`dramatiq timer_peer_actor --path bench`) in the worker
processes, and imported by the bench itself to enqueue. Configured only through the
environment the bench sets: BENCH_PEER_AMQP_URL (the bench's own vhost) and
BENCH_PEER_OUT (a file prefix; each worker process appends `seq arrival_ms` lines to
`<prefix>.<pid>` when the actor runs).
"""

from __future__ import annotations

import os
import threading
import time

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

PEER_QUEUE = "bench.peer"
PEER_ACTOR = "bench_peer_noop"

broker = RabbitmqBroker(url=os.environ["BENCH_PEER_AMQP_URL"])  # dramatiq default: no confirms
dramatiq.set_broker(broker)

_lock = threading.Lock()
_fd: int | None = None


def _out() -> int:
    global _fd
    with _lock:
        if _fd is None:
            path = f"{os.environ['BENCH_PEER_OUT']}.{os.getpid()}"
            _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        return _fd


@dramatiq.actor(queue_name=PEER_QUEUE, actor_name=PEER_ACTOR, max_retries=0)
def bench_peer_noop(seq: int) -> None:
    # One small O_APPEND write per call: atomic, no lock needed across threads.
    os.write(_out(), f"{seq} {time.time() * 1000:.1f}\n".encode())
