"""Baseline for bench/e2e_bench.py: a no-op Dramatiq actor on the same broker.

Run as a subprocess: `python bench/e2e_baseline_worker.py AMQP_URL N THREADS`. Consumes
from the queue `bench.noop` until N messages were processed (or 120 s passed), then prints
one JSON line: {"processed": n, "first": t0, "last": t1} (time.time() values).
"""

from __future__ import annotations

import json
import sys
import threading
import time

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

QUEUE = "bench.noop"


def main() -> int:
    url, total, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    broker = RabbitmqBroker(url=url, confirm_delivery=True)
    dramatiq.set_broker(broker)
    lock = threading.Lock()
    state = {"processed": 0, "first": 0.0, "last": 0.0}
    done = threading.Event()

    @dramatiq.actor(queue_name=QUEUE, actor_name="noop", max_retries=0)
    def noop(_i: int) -> None:
        now = time.time()
        with lock:
            if not state["processed"]:
                state["first"] = now
            state["processed"] += 1
            state["last"] = now
            if state["processed"] >= total:
                done.set()

    worker = dramatiq.Worker(broker, worker_threads=threads)
    worker.start()
    print(json.dumps({"ready": True}), flush=True)
    done.wait(120)
    worker.stop()
    broker.close()
    print(json.dumps(state), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
