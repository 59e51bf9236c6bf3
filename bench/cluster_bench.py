"""Cluster benchmark (issue 18): the cluster test's set-up, larger, measured.

    .venv/bin/python bench/cluster_bench.py [--quick] [--events N] [--rate R] [--seconds S]

Runs two copies of each service (intake, timer, resolver, notifier) as processes against:

  1 node, classic   one RabbitMQ node of its own, classic queues: the single-machine
                    set-up, the baseline measured in the same run
  1 node, quorum    the same node, quorum queues (replication cost without replicas)
  3 nodes, quorum   a three-node cluster, quorum queues, the node list in the settings
  3 nodes, 1 down   the same cluster while the node most service copies are connected to
                    is stopped: it goes at the start of the lateness phase (the clients
                    move during it) and comes back after the throughput phase

and, for each, two phases:

  lateness    simulated traffic at --rate events/s for --seconds, deadlines 5 s after each
              step: firing lateness = deadlines.fired_at - due_at (database clock) over
              every deadline that fired
  throughput  --events events published as fast as the broker confirms them: events/s
              from the first publish until the last event is committed (case_events)

Its own RabbitMQ nodes (stopped and removed at the end), its own database
(aftersales_bench_cluster_<pid>, dropped at the end), its own Redis key prefix. Prints a
table and writes bench-results/cluster.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.exc import OperationalError  # noqa: E402

from aftersales_cli.simulate.generator import Message, SimConfig, generate  # noqa: E402
from aftersales_cli.simulate.publisher import ConfirmedStreamPublisher  # noqa: E402
from bench.measure import pct  # noqa: E402
from tests.cluster.rabbit_cluster import RabbitCluster  # noqa: E402
from tests.cluster.scenario import client_nodes, publish_paced, service_env  # noqa: E402
from tests.conftest import TABLES  # noqa: E402
from tests.harness import System  # noqa: E402
from tests.resources import own_database  # noqa: E402

PG_ADMIN = os.environ.get("AFTERSALES_BENCH_PG_ADMIN",
                          "postgresql+psycopg://postgres@127.0.0.1/postgres")
NAME = f"aftersales_bench_cluster_{os.getpid()}"
OUT = ROOT / "bench-results" / "cluster.json"
COPIES = 2


def log(msg: str) -> None:
    print(f"[cluster bench {datetime.now(UTC):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


class Db:
    """The benchmark's own queries; each is tried again for a while if PostgreSQL is
    restarting (other work on this shared machine does that)."""

    def __init__(self, url: str) -> None:
        self.sql_engine = create_engine(url, pool_size=2, pool_pre_ping=True)

    def _retry(self, work: Any) -> Any:
        deadline = time.monotonic() + 120
        while True:
            try:
                return work()
            except OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def scalar(self, sql: str) -> Any:
        def work() -> Any:
            with self.sql_engine.connect() as conn:
                return conn.execute(text(sql)).scalar()
        return self._retry(work)

    def column(self, sql: str) -> list[Any]:
        def work() -> list[Any]:
            with self.sql_engine.connect() as conn:
                return list(conn.execute(text(sql)).scalars())
        return self._retry(work)

    def truncate(self) -> None:
        def work() -> None:
            with self.sql_engine.begin() as conn:
                conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY"))
        self._retry(work)


def wait_until(predicate: Any, timeout: float, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def load_average() -> float:
    return os.getloadavg()[0]


@contextlib.contextmanager
def running_services(env: dict[str, str], log_dir: Path) -> Iterator[System]:
    log_dir.mkdir(parents=True, exist_ok=True)
    system = System(env, log_dir, copies=COPIES)
    system.start(*system.ports)
    try:
        for name in system.ports:
            if not wait_until(lambda n=name: system.metrics_ready(n), 180):
                raise RuntimeError(f"{name} did not start; see {log_dir}")
        yield system
    finally:
        system.stop()


def phase_lateness(db: Db, urls: str, queue_type: str, rate: float, seconds: float,
                   during: Any = None) -> dict[str, Any]:
    """Paced simulated traffic; lateness of every deadline that fired."""
    db.truncate()
    config = SimConfig(rate=rate, duration=None, count=None, deadline_seconds=5,
                       late_merchant_share=0.4, late_buyer_share=0.3, duplicate_share=0.0,
                       malformed_share=0.0, run_id=f"cb{uuid.uuid4().hex[:6]}")
    n = int(rate * seconds)
    bodies = [m.body for m in generate(config, n, seed=random.randrange(10**6),
                                       start=datetime.now(UTC))]
    result: dict[str, Any] = {}
    publisher = threading.Thread(target=lambda: result.update(
        published=publish_paced(urls, bodies, rate, queue_type=queue_type).count))
    load = [load_average()]
    publisher.start()
    if during is not None:
        time.sleep(min(5.0, seconds / 4))  # the node goes a few seconds into the traffic
        during()
    publisher.join()
    # The deadlines judged: those due up to 6 s after the traffic ended (a step's deadline
    # is 5 s), the same window in every set-up; wait until that moment has passed and all
    # of them have fired.
    until = db.scalar("SELECT now() + interval '6 seconds'")
    window = f"due_at <= '{until.isoformat()}'"
    done = wait_until(lambda: bool(db.scalar(f"SELECT now() > '{until.isoformat()}'")) and int(
        db.scalar("SELECT count(*) FROM deadlines WHERE status IN ('pending', 'dispatched') "
                  f"AND {window}") or 0) == 0, 180)
    load.append(load_average())
    late = [float(v) for v in db.column(
        "SELECT EXTRACT(EPOCH FROM fired_at - due_at) FROM deadlines WHERE status = 'fired' "
        f"AND {window}")]
    return {
        "events": result.get("published", 0), "rate": rate, "seconds": seconds,
        "fired": len(late), "all_fired": done,
        "lateness_p50": pct(late, 0.5), "lateness_p95": pct(late, 0.95),
        "lateness_p99": pct(late, 0.99), "lateness_max": max(late) if late else None,
        "lateness_mean": statistics.fmean(late) if late else None,
        "load_average": load,
    }


def phase_throughput(db: Db, urls: str, queue_type: str, events: int) -> dict[str, Any]:
    """`events` events published as fast as confirms allow; events/s until all committed."""
    db.truncate()
    config = SimConfig(rate=0, duration=None, count=None, deadline_seconds=600,
                       duplicate_share=0.0, malformed_share=0.0,
                       run_id=f"ct{uuid.uuid4().hex[:6]}")
    msgs: list[Message] = list(generate(config, events, seed=random.randrange(10**6),
                                        start=datetime.now(UTC), rate=1000.0))
    state = {"i": 0}

    def feed(k: int) -> list[Message] | None:
        if state["i"] >= len(msgs):
            return None
        batch = msgs[state["i"]:state["i"] + k]
        state["i"] += len(batch)
        return batch

    load = [load_average()]
    started = time.monotonic()
    publisher = ConfirmedStreamPublisher(urls, window=2000, queue_type=queue_type)
    done_publishing: dict[str, float] = {}

    def publish() -> None:
        publisher.run(feed)
        done_publishing["at"] = time.monotonic()

    thread = threading.Thread(target=publish)
    thread.start()
    target = sum(1 for m in msgs if m.event is not None)
    all_in = wait_until(lambda: int(db.scalar("SELECT count(*) FROM case_events") or 0)
                        >= target, 600, interval=0.1)
    finished = time.monotonic()
    thread.join(60)
    load.append(load_average())
    elapsed = finished - started
    return {
        "events": target, "all_committed": all_in, "seconds": elapsed,
        "events_per_second": target / elapsed if all_in else None,
        "publish_seconds": done_publishing.get("at", finished) - started,
        "load_average": load,
    }


def run_setup(name: str, cluster: RabbitCluster, queue_type: str, db_url: str, db: Db,
              args: argparse.Namespace, log_dir: Path, node_down: bool = False
              ) -> dict[str, Any]:
    urls = cluster.urls()
    cluster.reset_vhost()  # queues of another type from the last set-up would clash
    env = service_env(db_url, urls, f"aftersales-bench-cluster:{os.getpid()}:{name}:")
    env["AFTERSALES_QUEUE_TYPE"] = queue_type
    log(f"{name}: starting 2 copies of each service on {len(cluster.nodes)} node(s)")
    with running_services(env, log_dir / name.replace(" ", "-").replace(",", "")) as system:
        stopped: list[Any] = []

        def take_a_node_down() -> None:
            on_node: dict[str, int] = {}
            for names in client_nodes(system, cluster.nodes).values():
                for n in names:
                    on_node[n] = on_node.get(n, 0) + 1
            node = max(cluster.nodes, key=lambda n: on_node.get(n.name, 0))
            log(f"{name}: stopping {node.name} ({on_node.get(node.name, 0)} copies on it)")
            cluster.stop_node(node)
            stopped.append(node)

        log(f"{name}: lateness phase, {args.rate:.0f} events/s for {args.seconds:.0f} s")
        lateness = phase_lateness(db, urls, queue_type, args.rate, args.seconds,
                                  during=take_a_node_down if node_down else None)
        log(f"{name}: throughput phase, {args.events} events")
        live = cluster.urls([n for n in cluster.nodes if n not in stopped])
        throughput = phase_throughput(db, live, queue_type, args.events)
        for node in stopped:
            cluster.start_node(node)
        if stopped:
            cluster.await_healthy()
    result = {"setup": name, "nodes": len(cluster.nodes), "queue_type": queue_type,
              "node_down": node_down, "lateness": lateness, "throughput": throughput}
    log(f"{name}: {json.dumps(result)}")
    return result


def report(results: list[dict[str, Any]]) -> None:
    def f(v: float | None, spec: str = ".2f") -> str:
        return "-" if v is None else format(v, spec)

    print("\n| set-up | events/s (backlog) | lateness p50 / p95 / p99 / max (s) | fired | "
          "load avg |")
    print("|---|---|---|---|---|")
    for r in results:
        la, th = r["lateness"], r["throughput"]
        print(f"| {r['setup']} | {f(th['events_per_second'], '.0f')} | "
              f"{f(la['lateness_p50'])} / {f(la['lateness_p95'])} / {f(la['lateness_p99'])} "
              f"/ {f(la['lateness_max'])} | {la['fired']} | "
              f"{la['load_average'][0]:.1f}-{th['load_average'][-1]:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=6000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--quick", action="store_true", help="2,000 events, 20 s of traffic")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.quick:
        args.events, args.seconds = 2000, 20.0
    base = Path(tempfile.mkdtemp(prefix="aftersales-cluster-bench-"))
    log_dir = ROOT / "bench-results" / f"cluster-logs-{os.getpid()}"
    results: list[dict[str, Any]] = []
    started = datetime.now(UTC)
    try:
        with own_database(PG_ADMIN, NAME) as db_url:
            db = Db(db_url)
            single = RabbitCluster(base / "single", size=1)
            try:
                log("starting one RabbitMQ node")
                single.start()
                results.append(run_setup("1 node, classic", single, "classic", db_url, db,
                                         args, log_dir))
                save(args, started, results)
                results.append(run_setup("1 node, quorum", single, "quorum", db_url, db,
                                         args, log_dir))
                save(args, started, results)
            finally:
                single.destroy()
            cluster = RabbitCluster(base / "cluster", size=3)
            try:
                log("starting three RabbitMQ nodes")
                cluster.start()
                results.append(run_setup("3 nodes, quorum", cluster, "quorum", db_url, db,
                                         args, log_dir))
                save(args, started, results)
                results.append(run_setup("3 nodes, quorum, 1 down", cluster, "quorum",
                                         db_url, db, args, log_dir, node_down=True))
                save(args, started, results)
            finally:
                cluster.destroy()
            db.sql_engine.dispose()
    finally:
        shutil.rmtree(base, ignore_errors=True)
        _forget_redis_keys()
    report(results)
    print(f"\nwritten to {args.out}; service logs in {log_dir}")
    return 0


def save(args: argparse.Namespace, started: datetime, results: list[dict[str, Any]]) -> None:
    """After each set-up: what was measured survives a later failure."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"started": started.isoformat(), "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results}, indent=2))


def _forget_redis_keys() -> None:
    import redis

    client = redis.Redis.from_url(os.environ.get("AFTERSALES_BENCH_REDIS",
                                                 "redis://127.0.0.1:6379/0"))
    for key in client.scan_iter(match=f"aftersales-bench-cluster:{os.getpid()}:*"):
        client.delete(key)
    client.close()


if __name__ == "__main__":
    sys.exit(main())
