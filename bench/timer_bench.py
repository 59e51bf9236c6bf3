#!/usr/bin/env python
"""Timer benchmark (GitHub issue 4): firing lateness, memory and catch-up of the timer,
beside the same load on Dramatiq's own `send_with_options(delay=...)`.

    .venv/bin/python bench/timer_bench.py            # full size (1,000,000 pending)
    .venv/bin/python bench/timer_bench.py --quick    # 10,000 pending, 5,000 catch-up

Not part of the test suite. Everything runs against a database and a RabbitMQ vhost of
its own (`aftersales_bench_<pid>`, `aftersales-bench-<pid>`), created at start and
dropped at the end, never the default `aftersales` database or the `/` vhost.

Phases (each bounded in time):
  ours-small   real `aftersales run timer`, SMALL far-future pending rows + a steady
               stream of rows due in 2..5 s; lateness = arrival of the fire message at a
               consumer of `aftersales.resolver` minus the row's due_at (DB clock);
               RSS of the timer's process group.
  ours-large   the same with LARGE pending rows.
  ours-catchup CATCHUP overdue deadlines with open cases; real timer + real resolver
               (+ its outbox relay); decisions counted as they arrive on
               `aftersales.decisions`.
  peer-small   a no-op Dramatiq actor, SMALL messages delayed 48 h, the same stream
               delayed 2..5 s; workers = the `dramatiq` CLI; lateness = actor run time
               minus the message's eta; RSS of the workers' process group.
  peer-large   the same with LARGE delayed messages.
  peer-catchup CATCHUP delayed messages already overdue when the workers start.

Prints a table and writes bench-results/timer.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika
import psycopg

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from bench.measure import rss_kib  # noqa: E402
from shared.amqp import (  # noqa: E402
    DECISIONS_EXCHANGE,
    RESOLVER_QUEUE,
    declare_topology,
    make_broker,
)
from shared.config import Settings  # noqa: E402
from shared.db.migrate import upgrade  # noqa: E402
from tests.resources import free_port  # noqa: E402

VENV_BIN = Path(sys.executable).parent
PG_ADMIN = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_HOST = os.environ.get("BENCH_AMQP_HOST", "127.0.0.1:5672")
FAR_DELAY = timedelta(hours=48)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Sizes and settings
# ---------------------------------------------------------------------------------------

@dataclass
class Plan:
    small: int = 1_000
    large: int = 1_000_000
    catchup: int = 100_000
    peer_large: int = 1_000_000
    peer_catchup: int = 100_000
    stream_rate: float = 200.0       # rows (messages) coming due per second
    stream_seconds: float = 60.0
    due_min: float = 2.0             # stream rows are due now()+due_min..due_max seconds
    due_max: float = 5.0
    drain_seconds: float = 20.0      # after the stream: wait for the last ones to fire
    catchup_timeout: float = 600.0
    peer_processes: int = 2          # the dramatiq CLI defaults on this machine
    peer_threads: int = 8
    resolver_processes: int = 1      # aftersales defaults
    resolver_threads: int = 4
    timer_max_rate: float = 2000.0
    max_minutes: float = 40.0
    skip_peer: bool = False
    skip_ours: bool = False
    py_spy: bool = False

    @classmethod
    def quick(cls) -> Plan:
        return cls(small=1_000, large=10_000, catchup=5_000, peer_large=10_000,
                   peer_catchup=5_000, stream_seconds=15, drain_seconds=10,
                   catchup_timeout=180, max_minutes=12)


# ---------------------------------------------------------------------------------------
# Our own database and vhost
# ---------------------------------------------------------------------------------------

class Sandbox:
    """A database and a vhost of the bench's own, removed at the end whatever happens."""

    def __init__(self, tag: str | None = None) -> None:
        tag = tag or f"{os.getpid()}"
        self.db_name = f"aftersales_bench_{tag}"
        self.vhost = f"aftersales-bench-{tag}"
        base = PG_ADMIN.rsplit("/", 1)[0]
        self.pg_url = f"{base}/{self.db_name}"
        self.sa_url = self.pg_url.replace("postgresql://", "postgresql+psycopg://", 1)
        self.amqp_url = f"amqp://guest:guest@{AMQP_HOST}/{quote(self.vhost, safe='')}"
        self.tmp = Path(tempfile.mkdtemp(prefix="aftersales-bench-"))
        self.logs = ROOT / "bench-results" / ("timer-logs" if tag == f"{os.getpid()}"
                                              else f"timer-logs-{tag}")
        self.created_db = False
        self.created_vhost = False

    def _ctl(self, *args: str) -> None:
        ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
        subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=300)  # noqa: S603 - our own argv

    def create(self) -> None:
        assert self.db_name != "aftersales" and self.vhost != "/"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        self.created_db = True
        upgrade(self.sa_url)
        self._ctl("add_vhost", self.vhost)
        self.created_vhost = True
        self._ctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
        if self.logs.exists():
            shutil.rmtree(self.logs)
        self.logs.mkdir(parents=True)
        log(f"sandbox: database {self.db_name}, vhost {self.vhost}, logs {self.logs}")

    def drop(self) -> None:
        if self.created_vhost:
            try:
                self._ctl("delete_vhost", self.vhost)
            except Exception as exc:
                log(f"could not delete vhost {self.vhost}: {exc}")
        if self.created_db:
            try:
                with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE datname = %s", (self.db_name,))
                    conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}"')
            except Exception as exc:
                log(f"could not drop database {self.db_name}: {exc}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        log("sandbox removed")

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.pg_url, autocommit=True)


# ---------------------------------------------------------------------------------------
# Processes we start (each in its own process group) and their memory
# ---------------------------------------------------------------------------------------

def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ...
            pids.append(int(entry))
    return pids


def group_rss_mib(pgid: int) -> tuple[float, int]:
    pids = group_pids(pgid)
    return sum(rss_kib(p) for p in pids) / 1024.0, len(pids)


class Service:
    """A process tree started by the bench; stopped by its own process group id only."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path,
                 cwd: Path = ROOT) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **env},  # noqa: S603 - our own argv
                                     stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.samples: list[tuple[float, float, int]] = []
        self._stop_sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        log(f"started {name} (pgid {self.proc.pid})")

    def _sample(self) -> None:
        while not self._stop_sampling.wait(0.5):
            mib, n = group_rss_mib(self.proc.pid)
            if n:
                self.samples.append((time.monotonic(), mib, n))

    def rss_since(self, since: float) -> dict[str, float]:
        values = [(mib, n) for t, mib, n in self.samples if t >= since]
        if not values:
            return {"max_mib": math.nan, "last_mib": math.nan, "processes": 0}
        return {"max_mib": round(max(v for v, _ in values), 1),
                "last_mib": round(values[-1][0], 1),
                "processes": values[-1][1]}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        self._stop_sampling.set()
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # Children of the group that outlived their parent: only ours, by group id.
        end = time.monotonic() + 10
        while group_pids(self.proc.pid) and time.monotonic() < end:
            time.sleep(0.1)
        if group_pids(self.proc.pid):
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log_file.close()
        log(f"stopped {self.name}")


RUNNING: list[Service] = []


@contextmanager
def service(name: str, argv: list[str], env: dict[str, str], logs: Path) -> Iterator[Service]:
    svc = Service(name, argv, env, logs)
    RUNNING.append(svc)
    try:
        yield svc
    finally:
        svc.stop()
        RUNNING.remove(svc)


def aftersales_env(box: Sandbox, plan: Plan, extra: dict[str, str] | None = None
                   ) -> dict[str, str]:
    return {
        "AFTERSALES_DATABASE_URL": box.sa_url,
        "AFTERSALES_AMQP_URL": box.amqp_url,
        "AFTERSALES_METRICS_PORT": str(free_port()),
        "AFTERSALES_METRICS_DIR": str(box.tmp / "metrics"),
        "AFTERSALES_REDIS_PREFIX": f"aftersales-bench-{os.getpid()}:",
        "AFTERSALES_TIMER_MAX_RATE": str(plan.timer_max_rate),
        **(extra or {}),
    }


# ---------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------

def percentile(sorted_values: list[tuple[float, bool]], q: float) -> dict[str, Any]:
    """Nearest-rank percentile of (value, censored) pairs; a censored value is only a
    lower bound (the message had not fired when the phase ended)."""
    if not sorted_values:
        return {"s": None, "lower_bound": False}
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    value, censored = sorted_values[rank - 1]
    return {"s": round(value, 4), "lower_bound": censored}


def lateness_stats(due: dict[int, float], arrived: dict[int, float], end: float
                   ) -> dict[str, Any]:
    values = []
    for key, due_at in due.items():
        if key in arrived:
            values.append((arrived[key] - due_at, False))
        else:
            values.append((end - due_at, True))
    values.sort(key=lambda v: v[0])
    fired = sum(1 for _, c in values if not c)
    return {
        "count": len(values), "fired": fired, "not_fired": len(values) - fired,
        "p50": percentile(values, 50), "p99": percentile(values, 99),
        "max": percentile(values, 100),
        "mean_fired_s": round(sum(v for v, c in values if not c) / fired, 4) if fired else None,
    }


# ---------------------------------------------------------------------------------------
# AMQP taps
# ---------------------------------------------------------------------------------------

class QueueTap:
    """Consumes a queue in a thread (auto-ack) and records the first arrival time of each
    message key."""

    def __init__(self, amqp_url: str, queue: str, key: Callable[[bytes], Any],
                 setup: Callable[[Any], None] | None = None) -> None:
        self.arrived: dict[Any, float] = {}
        self.total = 0
        self._ready = threading.Event()
        self._conn: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                params = pika.URLParameters(amqp_url)
                params.heartbeat = 60
                self._conn = pika.BlockingConnection(params)
                self._channel = self._conn.channel()
                if setup:
                    setup(self._channel)
                self._channel.basic_qos(prefetch_count=2000)

                def on_message(_ch: Any, _m: Any, _p: Any, body: bytes) -> None:
                    now = time.time()
                    self.total += 1
                    k = key(body)
                    # A fire message carries a batch of deadline ids: each arrives now.
                    for one in k if isinstance(k, list) else [k]:
                        if one not in self.arrived:
                            self.arrived[one] = now

                self._channel.basic_consume(queue, on_message, auto_ack=True)
                self._ready.set()
                self._channel.start_consuming()
            except BaseException as exc:
                self._error = exc
                self._ready.set()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._error:
            raise RuntimeError(f"tap on {queue} failed: {self._error}")

    def stop(self) -> None:
        if self._conn is not None and self._conn.is_open:
            with suppress(Exception):
                self._conn.add_callback_threadsafe(self._channel.stop_consuming)
            self._thread.join(10)
            with suppress(Exception):
                self._conn.add_callback_threadsafe(self._conn.close)
            self._thread.join(5)


def dramatiq_first_arg(body: bytes) -> Any:
    """The deadline ids of a `fire_deadlines` message (a list), or a peer's single arg."""
    return json.loads(body)["args"][0]


def queue_depth(amqp_url: str, queue: str) -> tuple[int, int]:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ok = conn.channel().queue_declare(queue, passive=True)
        return int(ok.method.message_count), int(ok.method.consumer_count)
    finally:
        conn.close()


def wait_until(pred: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.2) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    log(f"timed out after {timeout:.0f}s waiting for {what}")
    return False


# ---------------------------------------------------------------------------------------
# Ours: rows in PostgreSQL
# ---------------------------------------------------------------------------------------

DEADLINE_COLS = ("case_id, step, purpose, action, party, due_at, deadline_at, fence, "
                 "rule_set, rule_version, rule_id, status")


def load_far_future(conn: psycopg.Connection[Any], count: int, start: int = 0) -> float:
    """`count` pending deadlines due in 2..60 days, no case rows (the resolver does not
    run in the lateness phases, and the timer never reads cases)."""
    t = time.perf_counter()
    step = 200_000
    for lo in range(start, start + count, step):
        hi = min(start + count, lo + step) - 1
        conn.execute(
            f"""INSERT INTO deadlines ({DEADLINE_COLS})
                SELECT 'FAR' || g, 'merchant_response', 'deadline', 'auto_approve',
                       'merchant', d, d, 1, 'default', '1', 'any.merchant_response', 'pending'
                FROM (SELECT g, now() + interval '2 days' + random() * interval '58 days' AS d
                      FROM generate_series(%s::bigint, %s::bigint) g) s""",
            (lo, hi),
        )
    conn.execute("VACUUM ANALYZE deadlines")
    return time.perf_counter() - t


STREAM_INSERT = f"""
    INSERT INTO deadlines ({DEADLINE_COLS})
    SELECT 'STREAM' || g, 'merchant_response', 'deadline', 'auto_approve', 'merchant',
           d, d, 1, 'default', '1', 'any.merchant_response', 'pending'
    FROM (SELECT g, now() + make_interval(secs => %s + random() * %s) AS d
          FROM generate_series(1, %s) g) s
    RETURNING id, EXTRACT(EPOCH FROM due_at)::float8
"""


def run_stream(tick: Callable[[int], None], rate: float, seconds: float) -> int:
    """Call tick(n) every 50 ms so that `rate` items per second are produced."""
    start = time.monotonic()
    made = 0
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= seconds:
            break
        want = int(elapsed * rate) - made
        if want > 0:
            tick(want)
            made += want
        time.sleep(0.05 - ((time.monotonic() - start) % 0.05))
    return made


def ours_lateness(box: Sandbox, plan: Plan, pending: int, label: str) -> dict[str, Any]:
    """Run the real timer with `pending` far-future rows plus the stream."""
    with box.connect() as conn:
        have = conn.execute("SELECT count(*) FROM deadlines WHERE status = 'pending' "
                            "AND case_id LIKE 'FAR%'").fetchone()[0]
        if have < pending:
            secs = load_far_future(conn, pending - have, start=have)
            log(f"{label}: loaded {pending - have:,} far-future deadlines in {secs:.1f}s")
        pending_now = conn.execute(
            "SELECT count(*) FROM deadlines WHERE status = 'pending'").fetchone()[0]

    # The queue as Dramatiq declares it (dead-letter arguments), before anyone consumes.
    broker = make_broker(box.amqp_url)
    broker.declare_queue(RESOLVER_QUEUE, ensure=True)
    broker.close()
    tap = QueueTap(box.amqp_url, RESOLVER_QUEUE, dramatiq_first_arg)
    env = aftersales_env(box, plan)
    due: dict[int, float] = {}
    try:
        with service(f"timer-{label}", [str(VENV_BIN / "aftersales"), "run", "timer"],
                     env, box.logs) as timer, box.connect() as conn:
            # Ready = a probe row due now has come through.
            probe = conn.execute(STREAM_INSERT, (0.0, 0.0, 1)).fetchone()[0]
            if not wait_until(lambda: probe in tap.arrived, 60, "the timer's first fire"):
                raise RuntimeError(f"timer did not fire; see {timer.log_path}")
            steady_from = time.monotonic()

            def tick(n: int) -> None:
                for row_id, due_at in conn.execute(
                        STREAM_INSERT, (plan.due_min, plan.due_max - plan.due_min, n)):
                    due[row_id] = due_at

            made = run_stream(tick, plan.stream_rate, plan.stream_seconds)
            wait_until(lambda: all(k in tap.arrived for k in due),
                       plan.due_max + plan.drain_seconds, "the stream's last fires")
            end = time.time()
            rss = timer.rss_since(steady_from)
            if not timer.alive():
                raise RuntimeError(f"timer died; see {timer.log_path}")
            with suppress(Exception):
                metrics_text = urllib.request.urlopen(
                    f"http://127.0.0.1:{env['AFTERSALES_METRICS_PORT']}/metrics", timeout=30
                ).read().decode()
                (box.logs / f"timer-{label}.metrics.txt").write_text(metrics_text)
    finally:
        tap.stop()
    stats = lateness_stats(due, tap.arrived, end)
    log(f"{label}: {pending_now:,} pending, stream {made} rows: fired {stats['fired']}, "
        f"p50 {stats['p50']['s']} p99 {stats['p99']['s']} max {stats['max']['s']} s; "
        f"RSS max {rss['max_mib']} MiB over {rss['processes']} processes")
    return {"pending": pending_now, "stream_rows": made, "lateness": stats, "rss": rss}


# ---------------------------------------------------------------------------------------
# Ours: catch-up
# ---------------------------------------------------------------------------------------

def template_case() -> tuple[dict[str, Any], Any]:
    """Open one case through the domain, due 10 minutes ago; the bench copies it."""
    from shared.domain import Engine, Event, RuleBook, WorkCalendar

    engine = Engine(RuleBook.load(None), WorkCalendar(None))
    now = datetime.now(UTC)
    event = Event(
        event_id="bench-open", type="case.opened", occurred_at=now - timedelta(hours=3),
        platform="kuaishou", shop_id="S-bench", order_id="O-TEMPLATE", case_id="TEMPLATE",
        due_at=now - timedelta(minutes=10),
        data={"kind": "refund_only", "amount_fen": 12900, "reason": "尺码不合适",
              "buyer": {"phone": "13800000000", "email": "buyer@example.com"},
              "merchant": {"email": "shop@example.com"}},
    )
    outcome = engine.apply(None, event, now)
    assert outcome.applied and outcome.deadlines, outcome.problem
    deadline = next(d for d in outcome.deadlines if d.purpose == "deadline")
    return outcome.case.to_dict(), deadline


def load_overdue_cases(conn: psycopg.Connection[Any], count: int, fresh: bool = True
                       ) -> float:
    """`count` open cases (copies of one domain-opened case, each with its own ids) and
    their overdue deadline, as `OutcomeWriter` would have written them. `fresh` empties
    the tables first (not on a database loaded with history)."""
    t = time.perf_counter()
    if fresh:
        conn.execute("TRUNCATE outbox, notifications, decisions, deadlines, case_events, cases "
                     "RESTART IDENTITY")
    snapshot, d = template_case()
    conn.execute(
        """INSERT INTO cases (case_id, platform, shop_id, order_id, kind, status, step, version,
                              rule_set, rule_version, step_due_at, opened_at, closed_at,
                              updated_at, snapshot)
           SELECT 'CU' || g, %(platform)s, %(shop)s, 'O-CU' || g, %(kind)s, 'open', %(step)s,
                  %(version)s, %(rule_set)s, %(rule_version)s, %(due)s, %(opened)s, NULL, now(),
                  jsonb_set(jsonb_set(%(snap)s::jsonb, '{case_id}', to_jsonb('CU' || g)),
                            '{order_id}', to_jsonb('O-CU' || g))
           FROM generate_series(1, %(n)s) g""",
        {"platform": snapshot["platform"], "shop": snapshot["shop_id"],
         "kind": snapshot["kind"], "step": snapshot["step"], "version": snapshot["version"],
         "rule_set": snapshot["rule_set"], "rule_version": snapshot["rule_version"],
         "due": d.due_at, "opened": datetime.fromisoformat(snapshot["opened_at"]),
         "snap": json.dumps(snapshot), "n": count},
    )
    conn.execute(
        f"""INSERT INTO deadlines ({DEADLINE_COLS})
            SELECT 'CU' || g, %(step)s, 'deadline', %(action)s, %(party)s,
                   %(due)s::timestamptz + g * interval '1 ms',
                   %(due)s::timestamptz + g * interval '1 ms',
                   %(fence)s, %(rs)s, %(rv)s, %(rid)s, 'pending'
            FROM generate_series(1, %(n)s) g""",
        {"step": d.step, "action": d.action, "party": d.party, "due": d.due_at,
         "fence": d.fence, "rs": d.rule.set, "rv": d.rule.version, "rid": d.rule.id, "n": count},
    )
    conn.execute("VACUUM ANALYZE cases")
    conn.execute("VACUUM ANALYZE deadlines")
    return time.perf_counter() - t


def ours_catchup(box: Sandbox, plan: Plan, fresh: bool = True) -> dict[str, Any]:
    n = plan.catchup
    with box.connect() as conn:
        secs = load_overdue_cases(conn, n, fresh)
    log(f"catch-up: {n:,} open cases with an overdue deadline loaded in {secs:.1f}s")

    # Decisions as upstream sees them: a queue of our own bound to aftersales.decisions.
    def setup(ch: Any) -> None:
        declare_topology(ch)
        ch.queue_declare("bench.decisions.tap", durable=False, auto_delete=False)
        ch.queue_bind("bench.decisions.tap", DECISIONS_EXCHANGE, routing_key="#")

    tap = QueueTap(box.amqp_url, "bench.decisions.tap",
                   lambda body: json.loads(body)["decision_id"], setup)
    env_resolver = aftersales_env(box, plan, {
        "AFTERSALES_WORKER_PROCESSES": str(plan.resolver_processes),
        "AFTERSALES_WORKER_THREADS": str(plan.resolver_threads),
    })
    env_timer = aftersales_env(box, plan)
    timeline: list[dict[str, Any]] = []
    spy: list[subprocess.Popen[bytes]] = []
    try:
        with service("resolver-catchup", [str(VENV_BIN / "aftersales"), "run", "resolver"],
                     env_resolver, box.logs) as resolver:
            if not wait_until(lambda: queue_depth(box.amqp_url, RESOLVER_QUEUE)[1]
                              >= plan.resolver_processes, 60, "the resolver's consumers",
                              interval=0.5):
                raise RuntimeError(f"resolver not consuming; see {resolver.log_path}")
            with service("timer-catchup", [str(VENV_BIN / "aftersales"), "run", "timer"],
                         env_timer, box.logs) as timer, box.connect() as conn:
                t0 = time.time()
                if plan.py_spy:
                    spy = start_py_spy(box, [resolver, timer])
                end = time.monotonic() + plan.catchup_timeout
                while time.monotonic() < end and len(tap.arrived) < n:
                    time.sleep(1.0)
                    # `overdue`: rows still pending and due (the resolver's new, future
                    # deadlines for the next step are pending too, but not due). Each
                    # count through its partial index: a count of every row by status
                    # read the whole table each second, gigabytes with a year of history
                    # (bench/history_bench.py), load on the very phase being timed.
                    counts = dict(conn.execute(
                        "SELECT 'overdue', count(*) FROM deadlines "
                        "WHERE status = 'pending' AND due_at <= now() "
                        "UNION ALL SELECT 'dispatched', count(*) FROM deadlines "
                        "WHERE status = 'dispatched'").fetchall())
                    # nothing else is due during the phase: the rest have been decided
                    counts["decided"] = n - counts["overdue"] - counts["dispatched"]
                    outbox = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
                    depth = queue_depth(box.amqp_url, RESOLVER_QUEUE)[0]
                    timeline.append({"t": round(time.time() - t0, 1),
                                     "load1": os.getloadavg()[0],
                                     "decisions": len(tap.arrived), "outbox": outbox,
                                     "resolver_queue": depth, **counts})
                    log(f"catch-up t={timeline[-1]['t']:.0f}s {timeline[-1]}")
                    if not (resolver.alive() and timer.alive()):
                        raise RuntimeError("resolver or timer died; see the logs")
                redispatched = conn.execute(
                    "SELECT count(*) FROM deadlines WHERE dispatch_count > 1").fetchone()[0]
                rss_resolver = resolver.rss_since(0)
                rss_timer = timer.rss_since(0)
    finally:
        for p in spy:
            with suppress(Exception):
                p.wait(60)
        tap.stop()
    arrivals = sorted(tap.arrived.values())
    got = len(arrivals)
    result: dict[str, Any] = {
        "overdue": n, "decisions": got, "complete": got >= n,
        "settings": {"AFTERSALES_TIMER_MAX_RATE": plan.timer_max_rate,
                     # the services' defaults (the benchmark does not set these)
                     "AFTERSALES_TIMER_BATCH": Settings.model_fields["timer_batch"].default,
                     "AFTERSALES_OUTBOX_BATCH": Settings.model_fields["outbox_batch"].default,
                     "AFTERSALES_RESOLVER_BATCH":
                         Settings.model_fields["resolver_batch"].default,
                     "AFTERSALES_WORKER_PROCESSES": plan.resolver_processes,
                     "AFTERSALES_WORKER_THREADS": plan.resolver_threads},
        "redispatched_rows": redispatched,
        "rss_resolver_mib": rss_resolver["max_mib"], "rss_timer_mib": rss_timer["max_mib"],
        "timeline": timeline,
    }
    if got:
        wall = arrivals[-1] - t0
        result["seconds_from_timer_start"] = round(wall, 1)
        result["rate_per_s"] = round(got / wall, 1)
        lo, hi = arrivals[int(got * 0.1)], arrivals[int(got * 0.9) - 1]
        result["steady_rate_per_s"] = round((int(got * 0.9) - int(got * 0.1)) / (hi - lo), 1) \
            if hi > lo else None
        # Which stage was the slowest: per-stage throughput from the timeline.
        result["stages_per_s"] = stage_rates(timeline, n)
    log(f"catch-up: {got:,}/{n:,} decisions, {result.get('rate_per_s')} /s overall, "
        f"steady {result.get('steady_rate_per_s')} /s; stages {result.get('stages_per_s')}")
    return result


def stage_rates(timeline: list[dict[str, Any]], n: int) -> dict[str, float | None]:
    """Throughput of each stage while it was busy: timer (rows leaving `pending`),
    resolver (rows leaving `dispatched`: fired or stale), relay (decisions arriving
    upstream)."""
    def rate(value: Callable[[dict[str, Any]], int]) -> float | None:
        points = [(p["t"], value(p)) for p in timeline]
        lo = next((p for p in points if p[1] >= 0.1 * n), None)
        hi = next((p for p in points if p[1] >= 0.9 * n), None)
        if lo is None or hi is None or hi[0] <= lo[0]:
            if len(points) >= 2 and points[-1][0] > points[0][0]:
                return round((points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0]), 1)
            return None
        return round((hi[1] - lo[1]) / (hi[0] - lo[0]), 1)

    return {
        "timer_dispatch": rate(lambda p: n - p.get("overdue", 0)),
        "resolver_fire": rate(lambda p: p.get("decided", 0)),
        "relay_publish": rate(lambda p: p["decisions"]),
    }


def start_py_spy(box: Sandbox, services: list[Service]) -> list[subprocess.Popen[bytes]]:
    spy_bin = VENV_BIN / "py-spy"
    if not spy_bin.exists():
        log("py-spy not installed in the venv; no profile")
        return []
    procs = []
    out = ROOT / "bench-results" / "timer-profile"
    out.mkdir(parents=True, exist_ok=True)
    time.sleep(3)  # let the workers fork
    for svc in services:
        for pid in group_pids(svc.proc.pid):
            procs.append(subprocess.Popen(  # noqa: S603 - our own argv
                [str(spy_bin), "record", "--pid", str(pid), "--duration", "30", "--rate", "50",
                 "--format", "raw", "--threads", "--nonblocking",
                 "-o", str(out / f"{svc.name}-{pid}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    log(f"py-spy recording {len(procs)} processes for 30 s into {out}")
    return procs


# ---------------------------------------------------------------------------------------
# The peer: Dramatiq's own delays
# ---------------------------------------------------------------------------------------

class Peer:
    def __init__(self, box: Sandbox, plan: Plan) -> None:
        self.box = box
        self.plan = plan
        self.out_prefix = box.tmp / "peer-arrivals"
        os.environ["BENCH_PEER_AMQP_URL"] = box.amqp_url
        os.environ["BENCH_PEER_OUT"] = str(self.out_prefix)
        sys.path.insert(0, str(BENCH_DIR))
        import timer_peer_actor

        self.mod = timer_peer_actor
        self.actor = timer_peer_actor.bench_peer_noop
        self.broker = timer_peer_actor.broker
        self.seq = 0
        self.far_published = 0

    def arrivals(self) -> dict[int, float]:
        got: dict[int, float] = {}
        for path in self.box.tmp.glob("peer-arrivals.*"):
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 2:
                        seq, ms = int(parts[0]), float(parts[1]) / 1000.0
                        if seq not in got or ms < got[seq]:
                            got[seq] = ms
        return got

    def send(self, delay_ms: int | None) -> tuple[int, float]:
        self.seq += 1
        if delay_ms is None:
            msg = self.actor.send(self.seq)
            return self.seq, time.time()
        msg = self.actor.send_with_options(args=(self.seq,), delay=delay_ms)
        return self.seq, msg.options["eta"] / 1000.0

    def publish_far(self, count: int) -> float:
        """`count` messages delayed 48 h, with `send_with_options(delay=...)` on a broker
        without publisher confirms (Dramatiq's default)."""
        t = time.perf_counter()
        delay = int(FAR_DELAY.total_seconds() * 1000)
        for i in range(count):
            self.send(delay)
            if i and i % 100_000 == 0:
                log(f"peer: published {i:,} far-future messages "
                    f"({i / (time.perf_counter() - t):,.0f}/s)")
        # No confirms: wait until RabbitMQ has them all.
        self.far_published += count
        wait_until(lambda: queue_depth(self.box.amqp_url, "bench.peer.DQ")[0]
                   >= self.far_published, 300, "RabbitMQ to take the far-future messages",
                   interval=1.0)
        return time.perf_counter() - t

    def workers(self, label: str) -> Any:
        argv = [str(VENV_BIN / "dramatiq"), "timer_peer_actor", "--path", str(BENCH_DIR),
                "--processes", str(self.plan.peer_processes),
                "--threads", str(self.plan.peer_threads)]
        return service(f"dramatiq-{label}", argv, {}, self.box.logs)

    def lateness(self, pending: int, label: str) -> dict[str, Any]:
        if self.far_published < pending:
            secs = self.publish_far(pending - self.far_published)
            log(f"{label}: published {pending:,} far-future delayed messages in total "
                f"({secs:.1f}s for this batch)")
        due: dict[int, float] = {}
        with self.workers(label) as workers:
            # Ready = a message without delay has run (a delayed probe could sit behind the
            # far-future ones forever: that is what is being measured).
            probe, _ = self.send(None)
            if not wait_until(lambda: probe in self.arrivals(), 60, "the peer's first run"):
                raise RuntimeError(f"dramatiq workers not running; see {workers.log_path}")
            steady_from = time.monotonic()

            def tick(n: int) -> None:
                for _ in range(n):
                    delay = int(1000 * random.uniform(self.plan.due_min, self.plan.due_max))
                    seq, eta = self.send(delay)
                    due[seq] = eta

            made = run_stream(tick, self.plan.stream_rate, self.plan.stream_seconds)
            wait_until(lambda: due.keys() <= self.arrivals().keys(),
                       self.plan.due_max + self.plan.drain_seconds, "the peer's last runs",
                       interval=1.0)
            end = time.time()
            rss = workers.rss_since(steady_from)
            dq_depth = queue_depth(self.box.amqp_url, "bench.peer.DQ")[0]
        stats = lateness_stats(due, self.arrivals(), end)
        log(f"{label}: {pending:,} delayed, stream {made}: fired {stats['fired']}, "
            f"p50 {stats['p50']['s']} p99 {stats['p99']['s']} max {stats['max']['s']} s; "
            f"RSS max {rss['max_mib']} MiB over {rss['processes']} processes")
        return {"pending": pending, "stream_messages": made, "lateness": stats, "rss": rss,
                "delay_queue_ready_after": dq_depth,
                "prefetch_per_process": min(self.plan.peer_threads * 1000, 65535)}

    def catchup(self) -> dict[str, Any]:
        n = self.plan.peer_catchup
        conn = pika.BlockingConnection(pika.URLParameters(self.box.amqp_url))
        try:
            conn.channel().queue_purge("bench.peer.DQ")
        finally:
            conn.close()
        self.far_published = 0
        for path in self.box.tmp.glob("peer-arrivals.*"):
            path.unlink()
        first = self.seq + 1
        t = time.perf_counter()
        for _ in range(n):
            self.send(1)  # due 1 ms after publishing: overdue when the workers start
        wait_until(lambda: queue_depth(self.box.amqp_url, "bench.peer.DQ")[0] >= n, 120,
                   "RabbitMQ to take the overdue messages", interval=1.0)
        log(f"peer catch-up: {n:,} overdue messages published in {time.perf_counter() - t:.1f}s")
        with self.workers("catchup") as workers:
            t0 = time.time()
            end = time.monotonic() + self.plan.catchup_timeout
            while time.monotonic() < end:
                time.sleep(1.0)
                done = sum(1 for k in self.arrivals() if k >= first)
                if done >= n or not workers.alive():
                    break
            arrivals = sorted(v for k, v in self.arrivals().items() if k >= first)
        got = len(arrivals)
        result: dict[str, Any] = {"overdue": n, "ran": got, "complete": got >= n}
        if got:
            wall = arrivals[-1] - t0
            result["seconds_from_worker_start"] = round(wall, 1)
            result["rate_per_s"] = round(got / wall, 1)
        log(f"peer catch-up: {got:,}/{n:,} ran, {result.get('rate_per_s')} /s")
        return result


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

def fmt_s(p: dict[str, Any] | None) -> str:
    if not p or p.get("s") is None:
        return "n/a"
    return ("≥ " if p["lower_bound"] else "") + f"{p['s']:.3f} s"


def table(results: dict[str, Any]) -> list[list[str]]:
    ours, peer = results.get("ours", {}), results.get("peer", {})
    rows = []

    def late(side: dict[str, Any], phase: str, q: str) -> str:
        st = side.get(phase, {}).get("lateness")
        return fmt_s(st[q]) if st else "n/a"

    def fired(side: dict[str, Any], phase: str) -> str:
        st = side.get(phase, {}).get("lateness")
        return f"{st['fired']:,} / {st['count']:,}" if st else "n/a"

    large_o = ours.get("large", {}).get("pending")
    large_p = peer.get("large", {}).get("pending")
    tag = f"{large_o:,} pending" if large_o else "large"
    if large_p and large_p != large_o:
        tag += f" (peer: {large_p:,})"
    p99 = ours.get("large", {}).get("lateness", {}).get("p99", {})
    met_p99 = (p99.get("s") is not None and not p99.get("lower_bound") and p99["s"] < 1.0)
    p99_peer = peer.get("large", {}).get("lateness", {}).get("p99", {})
    met_p99_peer = (p99_peer.get("s") is not None and not p99_peer.get("lower_bound")
                    and p99_peer["s"] < 1.0)
    rows.append([f"stream fired in time window, {tag}", fired(ours, "large"),
                 fired(peer, "large"), "all", ""])
    rows.append([f"lateness p50, {tag}", late(ours, "large", "p50"),
                 late(peer, "large", "p50"), "", ""])
    rows.append([f"lateness p99, {tag}", late(ours, "large", "p99"),
                 late(peer, "large", "p99"), "< 1 s",
                 yn(met_p99) + (f" (peer: {yn(met_p99_peer)})" if peer else "")])
    rows.append([f"lateness max, {tag}", late(ours, "large", "max"),
                 late(peer, "large", "max"), "", ""])
    rows.append(["lateness p50 / p99, 1,000 pending",
                 f"{late(ours, 'small', 'p50')} / {late(ours, 'small', 'p99')}",
                 f"{late(peer, 'small', 'p50')} / {late(peer, 'small', 'p99')}", "", ""])

    def rss(side: dict[str, Any], phase: str) -> float | None:
        v = side.get(phase, {}).get("rss", {}).get("max_mib")
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    ro_s, ro_l, rp_s, rp_l = rss(ours, "small"), rss(ours, "large"), rss(peer, "small"), \
        rss(peer, "large")
    rows.append(["RSS, 1,000 pending (MiB, process tree)", f"{ro_s}", f"{rp_s}", "", ""])
    rows.append([f"RSS, {tag} (MiB, process tree)", f"{ro_l}", f"{rp_l}", "", ""])
    ratio_o = round(ro_l / ro_s, 3) if ro_s and ro_l else None
    ratio_p = round(rp_l / rp_s, 3) if rp_s and rp_l else None
    rows.append(["RSS ratio large / 1,000", f"{ratio_o}×", f"{ratio_p}×", "≤ 1.2×",
                 yn(ratio_o is not None and ratio_o <= 1.2)
                 + (f" (peer: {yn(ratio_p is not None and ratio_p <= 1.2)})" if peer else "")])
    co, cp = ours.get("catchup", {}), peer.get("catchup", {})
    rows.append([f"catch-up, {co.get('overdue', 0):,} overdue (peer: {cp.get('overdue', 0):,})",
                 f"{co.get('rate_per_s')} decisions/s"
                 + ("" if co.get("complete", True) else f" ({co.get('decisions'):,} only)"),
                 f"{cp.get('rate_per_s')} no-op runs/s"
                 + ("" if cp.get("complete", True) else f" ({cp.get('ran'):,} only)"),
                 "≥ 1,000/s",
                 yn(bool(co.get("complete")) and (co.get("rate_per_s") or 0) >= 1000)])
    rows.append(["catch-up steady rate (10 %→90 %)", f"{co.get('steady_rate_per_s')} /s",
                 "", "", ""])
    results["ratios"] = {"ours": ratio_o, "peer": ratio_p}
    return rows


def yn(ok: bool) -> str:
    return "yes" if ok else "NO"


def print_table(rows: list[list[str]]) -> str:
    head = ["metric", "aftersales timer", "dramatiq delay", "target", "met?"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
              for r in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = "?"
    with suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with suppress(OSError), open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.1f} GiB"
    versions = {}
    with suppress(Exception), psycopg.connect(PG_ADMIN) as conn:
        versions["postgresql"] = conn.execute("SHOW server_version").fetchone()[0]
    with suppress(Exception):
        ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
        versions["rabbitmq"] = subprocess.run([ctl, "-q", "version"], capture_output=True,  # noqa: S603 - our own argv
                                              text=True, timeout=60).stdout.strip()
    import dramatiq

    versions["dramatiq"] = dramatiq.__version__
    versions["python"] = platform.python_version()
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory": mem, "kernel": platform.release(),
            "load_avg_at_start": os.getloadavg(), **versions}


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------

def parse(argv: list[str] | None = None) -> Plan:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10,000 pending, 5,000 catch-up")
    ap.add_argument("--pending", type=int, help="pending deadlines in the large run")
    ap.add_argument("--catchup", type=int, help="overdue deadlines in the catch-up run")
    ap.add_argument("--peer-count", type=int,
                    help="far-future delayed messages for the peer's large run")
    ap.add_argument("--peer-catchup", type=int, help="overdue messages for the peer")
    ap.add_argument("--stream-rate", type=float)
    ap.add_argument("--stream-seconds", type=float)
    ap.add_argument("--resolver-processes", type=int)
    ap.add_argument("--resolver-threads", type=int)
    ap.add_argument("--timer-max-rate", type=float)
    ap.add_argument("--peer-processes", type=int)
    ap.add_argument("--peer-threads", type=int)
    ap.add_argument("--max-minutes", type=float, help="hard limit for the whole run")
    ap.add_argument("--catchup-timeout", type=float, help="seconds allowed per catch-up run")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--py-spy", action="store_true",
                    help="profile timer and resolver during catch-up (py-spy in the venv)")
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "timer.json"))
    a = ap.parse_args(argv)
    plan = Plan.quick() if a.quick else Plan()
    for name, attr in [("pending", "large"), ("catchup", "catchup"),
                       ("peer_count", "peer_large"), ("peer_catchup", "peer_catchup"),
                       ("stream_rate", "stream_rate"), ("stream_seconds", "stream_seconds"),
                       ("resolver_processes", "resolver_processes"),
                       ("resolver_threads", "resolver_threads"),
                       ("timer_max_rate", "timer_max_rate"),
                       ("peer_processes", "peer_processes"), ("peer_threads", "peer_threads"),
                       ("max_minutes", "max_minutes"),
                       ("catchup_timeout", "catchup_timeout")]:
        if getattr(a, name) is not None:
            setattr(plan, attr, getattr(a, name))
    if a.pending is not None and a.peer_count is None:
        plan.peer_large = a.pending
    plan.skip_peer, plan.skip_ours, plan.py_spy = a.skip_peer, a.skip_ours, a.py_spy
    plan.out = a.out  # type: ignore[attr-defined]
    plan.quick_mode = a.quick  # type: ignore[attr-defined]
    return plan


def cpu_check() -> dict[str, float]:
    """How busy the machine is: load average and the time of a fixed pure-Python loop
    (about 0.35 s on an idle core of this machine); others' work on it shows up here."""
    t = time.perf_counter()
    total = 0
    for i in range(5_000_000):
        total += i
    return {"load1": round(os.getloadavg()[0], 2),
            "loop_s": round(time.perf_counter() - t, 3)}


def phase(results: dict[str, Any], side: str, name: str, fn: Callable[[], Any]) -> None:
    before = cpu_check()
    value = fn()
    value["cpu_before"], value["cpu_after"] = before, cpu_check()
    results[side][name] = value


def main(argv: list[str] | None = None) -> int:
    plan = parse(argv)
    started = time.monotonic()

    # Hard limit: SIGTERM to ourselves, which unwinds through the clean-up below.
    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    watchdog = threading.Timer(plan.max_minutes * 60, lambda: os.kill(os.getpid(),
                                                                       signal.SIGTERM))
    watchdog.daemon = True
    watchdog.start()

    box = Sandbox()
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "bench/timer_bench.py", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "plan": {k: v for k, v in vars(plan).items()},
        "ours": {}, "peer": {},
    }
    error = None
    try:
        box.create()
        if not plan.skip_ours:
            phase(results, "ours", "small", lambda: ours_lateness(box, plan, plan.small, "small"))
            phase(results, "ours", "large", lambda: ours_lateness(box, plan, plan.large, "large"))
            phase(results, "ours", "catchup", lambda: ours_catchup(box, plan))
        if not plan.skip_peer:
            peer = Peer(box, plan)
            phase(results, "peer", "small", lambda: peer.lateness(plan.small, "small"))
            phase(results, "peer", "large", lambda: peer.lateness(plan.peer_large, "large"))
            phase(results, "peer", "catchup", peer.catchup)
    except (Exception, SystemExit, KeyboardInterrupt) as exc:  # report what we have
        error = f"{type(exc).__name__}: {exc}"
        log(f"bench aborted: {error}")
    finally:
        watchdog.cancel()
        for svc in list(RUNNING):
            svc.stop()
        box.drop()
    results["error"] = error
    results["minutes"] = round((time.monotonic() - started) / 60, 1)
    rows = table(results)
    results["table"] = rows
    text = print_table(rows)
    print(text)
    print(f"\n{'quick' if plan.quick_mode else 'full'} run, "  # type: ignore[attr-defined]
          f"{results['minutes']} min; details in {plan.out}"  # type: ignore[attr-defined]
          + (f"; ERROR: {error}" if error else ""))
    out = Path(plan.out)  # type: ignore[attr-defined]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str, ensure_ascii=False))
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
