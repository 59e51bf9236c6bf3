# ruff: noqa: S603 - the benchmark starts its own helper processes with fixed arguments
"""End-to-end benchmark: the four services on this machine's RabbitMQ, PostgreSQL, Redis.

    .venv/bin/python bench/e2e_bench.py [--quick] [--intake-processes N] [--intake-batch N]
                                        [--notifier-processes N] [--resolver-processes N]
                                        [--resolver-threads N] [--decision-cases N]
                                        [--profile]

Uses its own database (aftersales_bench_e2e_<pid>) and RabbitMQ vhost, dropped at the end,
and its own Redis key prefix. Phases, each bounded in time:

  baseline    a no-op Dramatiq actor on the same broker: N messages published with
              windowed confirms while a worker consumes them -> messages/s
  latency     simulator traffic at a fixed 500 events/s from an idle system;
              publish -> committed latency per event (its transaction's commit seen in
              pg_current_snapshot() polled every 10 ms) and publish -> received_at
              (the inserting transaction's start, a lower bound)
  drain       wait until the notifier has sent what the phase caused: notifications/s
  throughput  N simulator events (no malformed, no duplicates) published as fast as the
              broker confirms them; rate at which they become committed case_events rows
  drain       as above, after the throughput phase's backlog (the figure reported)
  decisions   M cases opened with a deadline ahead, all due at once once their opening
              events are committed and the notifications those cause are sent:
              decisions/s (resolver), notifications sent/s (notifier)
RSS per service = the sum of VmRSS over the service's process group, peak over the run.
Writes bench-results/e2e.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402

from aftersales_cli.simulate.generator import (  # noqa: E402
    Message,
    SimConfig,
    TrafficGenerator,
    generate,
)
from aftersales_cli.simulate.publisher import ConfirmedStreamPublisher  # noqa: E402
from bench.measure import pct  # noqa: E402
from tests.resources import free_port, own_database, own_vhost  # noqa: E402

PG_ADMIN = os.environ.get("AFTERSALES_BENCH_PG_ADMIN",
                          "postgresql+psycopg://postgres@127.0.0.1/postgres")
AMQP_HOST = "127.0.0.1:5672"
SERVICES = ("intake", "timer", "resolver", "notifier")
PID = os.getpid()
NAME = f"aftersales_bench_e2e_{PID}"
OUT_DIR = ROOT / "bench-results"
LOG_DIR = OUT_DIR / f"e2e-logs-{PID}"


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- resources ---------------------------------------------------------------------------------


@contextlib.contextmanager
def smtp_sink() -> Iterator[tuple[int, int]]:
    """A local SMTP server that accepts and drops mail, so email notifications succeed."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}", "-c",
         "aiosmtpd.handlers.Sink"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.1)
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


class Services:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports = {s: free_port() for s in SERVICES}
        self.failed: dict[str, str] = {}
        self.rss_peak: dict[str, int] = dict.fromkeys(SERVICES, 0)

    def start(self, service: str, extra: dict[str, str] | None = None) -> bool:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        logf = open(LOG_DIR / f"{service}.log", "ab")
        env = {**os.environ, **self.env, **(extra or {}),
               "AFTERSALES_METRICS_PORT": str(self.ports[service])}
        proc = subprocess.Popen([sys.executable, "-m", "aftersales_cli.cli", "run", service],
                                cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[service] = proc
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (LOG_DIR / f"{service}.log").read_text(errors="replace")[-600:]
                self.failed[service] = f"exited with {proc.returncode}: {tail.strip()[-300:]}"
                del self.procs[service]
                return False
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.ports[service]), 0.5):
                time.sleep(1.0)  # workers connect after the supervisor serves metrics
                return True
            time.sleep(0.2)
        self.failed[service] = "metrics port never answered"
        return True

    def stop(self, service: str) -> None:
        proc = self.procs.pop(service, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def stop_all(self) -> None:
        for service in list(self.procs):
            self.stop(service)

    def group_pids(self, service: str) -> list[int]:
        proc = self.procs.get(service)
        if proc is None:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                fields = stat.rsplit(")", 1)[1].split()
                if int(fields[2]) == proc.pid:  # pgrp
                    pids.append(int(entry))
        return pids

    def rss(self, service: str) -> int:
        total = 0
        for pid in self.group_pids(service):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total

    def sample_rss(self) -> None:
        for service in list(self.procs):  # a service may be started meanwhile
            self.rss_peak[service] = max(self.rss_peak[service], self.rss(service))


def _cpu_ticks(pid: str) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


class CpuSplit:
    """CPU time per consumer over a phase, read from /proc: each service's process group,
    PostgreSQL, RabbitMQ and Redis by process name, the SMTP sink (standing in for the mail
    provider) and this benchmark process (publisher and pollers). In cores: CPU seconds
    divided by the phase's wall time."""

    def __init__(self, services: Services, sink_pid: int | None) -> None:
        self.services = services
        self.sink_pid = sink_pid

    def _owner(self, pid: str, groups: dict[int, str]) -> str | None:
        stat = Path(f"/proc/{pid}/stat").read_text()
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        pgrp = int(stat.rsplit(")", 1)[1].split()[2])
        if pgrp in groups:
            return groups[pgrp]
        if int(pid) == self.sink_pid:
            return "smtp sink"
        if int(pid) == PID:
            return "benchmark"
        for name, prefixes in (("postgresql", ("postgres",)), ("rabbitmq", ("beam", "erl")),
                               ("redis", ("redis",))):
            if comm.startswith(prefixes):
                return name
        return None

    def snapshot(self) -> tuple[float, dict[str, int]]:
        groups = {proc.pid: name for name, proc in self.services.procs.items()}
        ticks: dict[str, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    owner = self._owner(entry, groups)
                    if owner:
                        ticks[owner] = ticks.get(owner, 0) + _cpu_ticks(entry)
        return time.monotonic(), ticks

    @staticmethod
    def cores(before: tuple[float, dict[str, int]], after: tuple[float, dict[str, int]]
              ) -> dict[str, float]:
        seconds = after[0] - before[0]
        hz = os.sysconf("SC_CLK_TCK")
        out = {k: round((v - before[1].get(k, 0)) / hz / seconds, 2)
               for k, v in after[1].items()}
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


class RssSampler(threading.Thread):
    def __init__(self, services: Services) -> None:
        super().__init__(daemon=True)
        self.services = services
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(1.0):
            self.services.sample_rss()


# ---- measuring ---------------------------------------------------------------------------------


class Db:
    def __init__(self, url: str) -> None:
        self.sql_engine = create_engine(url, pool_size=2)

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.sql_engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.sql_engine.connect() as conn:
            return list(conn.execute(text(sql), params).all())


def publish(amqp_url: str, msgs: list[Message] | TrafficGenerator, *, rate: float = 0.0,
            duration: float | None = None, on_sent: Any = None, window: int = 2000,
            exchange: str = "aftersales.events", declare: bool = True) -> dict[str, Any]:
    """Publish a list (as fast as confirms allow) or a generator (paced) with confirms."""
    started = time.monotonic()
    state = {"i": 0}

    def feed(n: int) -> list[Message] | None:
        t = time.monotonic() - started
        if isinstance(msgs, list):
            if state["i"] >= len(msgs):
                return None
            batch = msgs[state["i"]:state["i"] + n]
        else:
            if duration is not None and t >= duration:
                return None
            allowed = min(n, int(t * rate) + 1 - state["i"]) if rate else n
            wall = datetime.now(UTC)
            batch = [msgs.next(t, wall) for _ in range(max(0, allowed))]
        state["i"] += len(batch)
        if on_sent and batch:
            on_sent(batch, time.monotonic())
        return batch

    pub = ConfirmedStreamPublisher(amqp_url, window=window, exchange=exchange, declare=declare)
    pub.run(feed)
    elapsed = time.monotonic() - started
    return {"published": pub.published, "confirmed": pub.confirmed, "nacked": pub.nacked,
            "seconds": elapsed, "rate": pub.published / elapsed if elapsed else 0.0}


def wait_count(db: Db, sql: str, target: int, timeout: float, interval: float = 0.25
               ) -> list[tuple[float, int]]:
    """Poll a count until it reaches target or timeout; returns (monotonic, count) samples."""
    samples = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = int(db.scalar(sql) or 0)
        samples.append((time.monotonic(), n))
        if n >= target:
            break
        time.sleep(interval)
    return samples


def sustained(samples: list[tuple[float, int]], target: int) -> float | None:
    """Rate between 10% and 90% of the target (skips start-up and the tail)."""
    lo = next((s for s in samples if s[1] >= 0.1 * target), None)
    hi = next((s for s in samples if s[1] >= 0.9 * target), None)
    if lo is None:
        return None
    if hi is None:  # never got to 90% in time: the rate from 10% to the last sample
        hi = samples[-1]
    if hi[0] <= lo[0]:
        return None
    return (hi[1] - lo[1]) / (hi[0] - lo[0])


def purge_intake_queue(amqp_url: str) -> int:
    """Drop what intake did not get to, so the next phase starts with an empty queue."""
    import pika

    from shared.amqp import INTAKE_QUEUE

    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        frame = conn.channel().queue_purge(INTAKE_QUEUE)
        return int(frame.method.message_count)
    finally:
        conn.close()


# By primary key, not `LIKE`: on a database with history a scan per poll would slow the
# very commits being timed (bench/history_bench.py). From `event_ids`, one index of one
# table: its row is written by the statement (so the transaction) that writes the event's
# `case_events` row, so it has the same xmin, while `case_events` is partitioned by month
# and an id alone probes every month's index.
COMMITTED = "SELECT count(*) FROM event_ids WHERE event_id = ANY(:ids)"


def wait_committed(db: Db, ids: list[str], deadline: float, interval: float) -> None:
    """Until every one of `ids` (in publishing order) is committed, or the deadline. The
    last ones published are awaited first: a look-up of all of them once per interval
    costs PostgreSQL a quarter of a second per second with a year of history behind the
    key's index, load on the very commits being timed."""
    for wanted in (ids[-50:], ids):
        while time.monotonic() < deadline and int(db.scalar(COMMITTED, ids=wanted)) < len(wanted):
            time.sleep(interval)


# ---- phases ------------------------------------------------------------------------------------


def phase_baseline(amqp_url: str, n: int, threads: int) -> dict[str, Any]:
    import dramatiq

    log(f"baseline: no-op Dramatiq actor, {n} messages, {threads} worker threads")
    worker = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "e2e_baseline_worker.py"), amqp_url, str(n),
         str(threads)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert worker.stdout is not None
    ready = worker.stdout.readline()
    if not ready:
        return {"error": "baseline worker did not start"}
    time.sleep(0.5)
    body = [Message(dramatiq.Message(queue_name="bench.noop", actor_name="noop", args=(i,),
                                     kwargs={}, options={}).encode(), "bench.noop", "event")
            for i in range(n)]
    t0 = time.time()
    pub = publish(amqp_url, body, exchange="", declare=False)
    try:
        out, _ = worker.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        worker.kill()
        out, _ = worker.communicate()
    state = json.loads(out.strip().splitlines()[-1])
    seconds = state["last"] - t0
    rate = state["processed"] / seconds if seconds > 0 else None
    # Dramatiq's own enqueue (a confirm per message, as the services' publishers do)
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=amqp_url, confirm_delivery=True)
    sent, t1 = 0, time.monotonic()
    while time.monotonic() - t1 < 3.0:
        broker.enqueue(dramatiq.Message(queue_name="bench.noop2", actor_name="noop2",
                                        args=(sent,), kwargs={}, options={}))
        sent += 1
    enqueue_rate = sent / (time.monotonic() - t1)
    broker.close()
    return {"messages": n, "processed": state["processed"], "seconds": seconds,
            "rate": rate, "publish_rate": pub["rate"], "enqueue_one_by_one_rate": enqueue_rate}


def phase_throughput(db: Db, amqp_url: str, n: int, timeout: float) -> dict[str, Any]:
    base = int(db.scalar("SELECT count(*) FROM case_events"))
    cfg = SimConfig(rate=1000.0, duplicate_share=0.0, malformed_share=0.0, run_id=f"tp{PID}")
    msgs = list(generate(cfg, n, seed=1, rate=1000.0))
    log(f"throughput: {n} events published as fast as confirmed")
    sampler: dict[str, Any] = {}

    def poll() -> None:
        sampler["samples"] = [(t, c - base) for t, c in wait_count(
            db, "SELECT count(*) FROM case_events", base + n, timeout, interval=0.2)]

    th = threading.Thread(target=poll)
    t0 = time.monotonic()
    th.start()
    pub = publish(amqp_url, msgs)
    th.join()
    samples = sampler["samples"]
    purged = purge_intake_queue(amqp_url)
    done, last_t = samples[-1][1], samples[-1][0]
    first = next((s for s in samples if s[1] > 0), samples[-1])
    return {
        "events": n, "committed": done, "publish_rate": pub["rate"],
        "seconds_to_commit_all": last_t - t0 if done >= n else None,
        "rate_overall": done / (last_t - t0),
        "rate_sustained": sustained(samples, n),
        "first_commit_after": first[0] - t0,
        "outcomes": dict(db.rows("SELECT outcome, count(*) FROM case_events GROUP BY 1")),
        "purged_unprocessed": purged, "load_during": os.getloadavg(),
    }


def _visible(xid: int, snapshot: tuple[int, int, frozenset[int]]) -> bool:
    """Whether transaction `xid` had ended when `snapshot` (xmin, xmax, in progress) was
    taken. Intake's transactions do not abort in this phase, so ended means committed."""
    xmin, xmax, running = snapshot
    return xid < xmin or (xid < xmax and xid not in running)


def _parse_snapshot(text_: str) -> tuple[int, int, frozenset[int]]:
    xmin, xmax, running = text_.split(":")
    return int(xmin), int(xmax), frozenset(int(x) for x in running.split(",") if x)


def commit_times(samples: list[tuple[float, str]], xids: dict[str, int]
                 ) -> dict[str, float]:
    """event_id -> the first poll at which its inserting transaction had committed. A
    transaction, once ended, stays ended in every later snapshot: binary search."""
    parsed = [(t, _parse_snapshot(snap)) for t, snap in samples]
    out: dict[str, float] = {}
    for event_id, xid in xids.items():
        lo, hi = 0, len(parsed)
        while lo < hi:
            mid = (lo + hi) // 2
            if _visible(xid, parsed[mid][1]):
                hi = mid
            else:
                lo = mid + 1
        if lo < len(parsed):
            out[event_id] = parsed[lo][0]
    return out


def phase_latency(db: Db, amqp_url: str, rate: float, duration: float) -> dict[str, Any]:
    """Publish -> commit latency of every event, matched by event id.

    When did an event's transaction commit? Polling `count(*)` every 10 ms cost PostgreSQL
    a table scan per poll (about 0.2 core by the end of the phase) and only matched events
    by rank. Instead, `pg_current_snapshot()` is polled every 10 ms (no table is read), and
    afterwards each event's `xmin` (its inserting transaction) is looked up in those
    snapshots: the first snapshot in which that transaction had ended is its commit time,
    within the poll interval."""
    cfg = SimConfig(rate=rate, duplicate_share=0.0, malformed_share=0.0, run_id=f"lt{PID}")
    gen = TrafficGenerator(cfg, __import__("random").Random(2))
    published: dict[str, float] = {}
    samples: list[tuple[float, str]] = []
    stop = threading.Event()

    def on_sent(batch: list[Message], t: float) -> None:
        for message in batch:
            assert message.event is not None
            published[message.event["event_id"]] = t

    def poll() -> None:
        with db.sql_engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            while not stop.is_set():
                snap = conn.execute(text("SELECT pg_current_snapshot()::text")).scalar()
                samples.append((time.monotonic(), str(snap)))
                time.sleep(0.01)

    log(f"latency: {rate:.0f} events/s for {duration:.0f}s")
    th = threading.Thread(target=poll, daemon=True)
    th.start()
    pub = publish(amqp_url, gen, rate=rate, duration=duration, on_sent=on_sent)
    total = len(published)
    ids = list(published)
    wait_committed(db, ids, time.monotonic() + 30, interval=0.25)
    time.sleep(0.05)  # one more snapshot after the last commit was seen
    stop.set()
    th.join(5)
    purged = purge_intake_queue(amqp_url)
    # The 32-bit xmin of the row against the snapshots' 64-bit ids: add the epoch.
    epoch = int(db.scalar("SELECT pg_current_xact_id()::text::bigint >> 32")) << 32
    xids = {r[0]: epoch + int(r[1]) for r in db.rows(
        "SELECT event_id, xmin::text FROM event_ids WHERE event_id = ANY(:p)", p=ids)}
    committed_at = commit_times(samples, xids)
    warm_after = min(published.values(), default=0.0) + 2.0  # skip the first 2 s
    latencies = [committed_at[e] - t for e, t in published.items()
                 if e in committed_at and t >= warm_after]
    # Per second of publishing: how many events and the worst latency, to see whether the
    # tail comes in bursts.
    first_t = min(published.values(), default=0.0)
    per_second: dict[int, list[float]] = {}
    for e, t in published.items():
        if e in committed_at:
            per_second.setdefault(int(t - first_t), []).append(committed_at[e] - t)
    timeline = [[sec, len(v), _ms(pct(v, 0.5)), _ms(max(v))]
                for sec, v in sorted(per_second.items())]
    rx = db.rows("SELECT extract(epoch FROM received_at - occurred_at) FROM case_events "
                 "WHERE event_id = ANY(:p)", p=ids)
    rx_lat = [float(r[0]) for r in rx]
    return {
        "offered_rate": rate, "seconds": duration, "published": total,
        "publish_rate": pub["rate"], "committed": len(xids),
        "p50_ms": _ms(pct(latencies, 0.5)), "p99_ms": _ms(pct(latencies, 0.99)),
        "max_ms": _ms(max(latencies) if latencies else None),
        "mean_ms": _ms(statistics.fmean(latencies) if latencies else None),
        "to_tx_start_p50_ms": _ms(pct(rx_lat, 0.5)), "to_tx_start_p99_ms": _ms(pct(rx_lat, 0.99)),
        "poll_interval_ms": 10, "snapshots": len(samples), "load_during": os.getloadavg(),
        "timeline_second_count_p50ms_maxms": timeline,
        "purged_unprocessed": purged,
        "note": "latencies only of events committed within 30 s after the last publish",
    }


# Notifications not settled yet (sent, failed or deferred are settled).
UNSENT = "SELECT count(*) FROM notifications WHERE status IN ('new', 'queued', 'sending')"


def phase_drain(db: Db, timeout: float) -> dict[str, Any]:
    """Wait until the notifier has handled every notification written so far; the send
    rate while it drains is the notifier's throughput under a backlog. Phases start from
    a drained system, so one phase's backlog does not weigh on the next one's figures."""
    sent = "SELECT count(*) FROM notifications WHERE status = 'sent'"
    t0, sent0, backlog = time.monotonic(), int(db.scalar(sent)), int(db.scalar(UNSENT))
    log(f"drain: {backlog} notifications to send")
    left = backlog
    while left and time.monotonic() - t0 < timeout:
        time.sleep(0.5)
        left = int(db.scalar(UNSENT))
    elapsed = time.monotonic() - t0
    sent_n = int(db.scalar(sent)) - sent0
    return {"backlog": backlog, "left": left, "sent": sent_n, "seconds": round(elapsed, 1),
            "notifications_per_s": sent_n / elapsed if sent_n and elapsed > 0 else None,
            "status": dict(db.rows("SELECT status, count(*) FROM notifications GROUP BY 1"))}


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


# Notifications a decisions-phase case causes before its deadline: its opening (the
# merchant by SMS and email) and reminders already due. An estimate for the lead time
# only: the phase reports whether everything was sent by the due time.
NOTIFICATIONS_BEFORE_DUE_PER_CASE = 3
# Fewer deadlines than this are decided before the work behind the decisions (their
# notifications, the outbox relay) is under way, which overstates the catch-up rate.
STEADY_DECISION_CASES = 5000


def phase_decisions(db: Db, amqp_url: str, m: int, intake_rate: float,
                    notifier: bool, timeout: float, cpu: CpuSplit | None = None,
                    send_rate: float | None = None) -> dict[str, Any]:
    """A backlog of `m` deadlines all due at once, from a settled system: the cases'
    opening events committed and the notifications they cause sent before the deadlines
    come due (as every phase starts from a drained system), so that what is measured is
    the catch-up, not intake and the notifier still at work on the same cases."""
    base_events = int(db.scalar("SELECT count(*) FROM case_events"))
    base_dec = int(db.scalar("SELECT count(*) FROM decisions"))
    like = f"AS-dec{PID}-%"
    sending = m * NOTIFICATIONS_BEFORE_DUE_PER_CASE / max(send_rate or 500.0, 100.0) \
        if notifier else 0.0
    lead = max(5.0, (m / max(intake_rate, 100.0) + sending) * 1.5 + 3.0)
    due = datetime.now(UTC) + timedelta(seconds=lead)
    events = []
    for i in range(m):
        case = f"AS-dec{PID}-{i:07d}"
        doc = {"event_id": f"dec{PID}-{i}", "type": "case.opened",
               "occurred_at": datetime.now(UTC).isoformat(), "platform": "kuaishou",
               "shop_id": f"S{i % 500}", "order_id": f"O-{case}", "case_id": case,
               "due_at": due.isoformat(),
               "data": {"kind": "refund_only", "amount_fen": 1990, "reason": "不想要了",
                        "buyer": {"phone": f"137{i:08d}"},
                        "merchant": {"phone": f"136{i:08d}", "email": f"m{i}@example.com"}}}
        events.append(Message(json.dumps(doc, ensure_ascii=False).encode(), "case.opened",
                              "event", doc))
    log(f"decisions: {m} cases, all due in {lead:.0f}s")
    publish(amqp_url, events)
    committed = wait_count(db, "SELECT count(*) FROM case_events", base_events + m,
                           lead + 30)[-1][1] - base_events
    unsent = int(db.scalar(UNSENT)) if notifier else 0  # without one, nothing is sent
    while unsent and (due - datetime.now(UTC)).total_seconds() > 0.5:
        time.sleep(0.25)
        unsent = int(db.scalar(UNSENT))
    settled = committed == m and unsent == 0 and datetime.now(UTC) < due
    if not settled:
        log(f"decisions: NOT settled at the due time ({committed}/{m} committed, "
            f"{unsent} notifications unsent): the figure includes that work")
    # The CPU split from the due time to the last decision: the catch-up alone.
    time.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds()))
    before = cpu.snapshot() if cpu else None
    decisions = wait_count(db, "SELECT count(*) FROM decisions", base_dec + m,
                           timeout)[-1][1] - base_dec
    split = cpu.cores(before, cpu.snapshot()) if cpu and before else None
    span = db.rows("SELECT min(decided_at), max(decided_at) FROM decisions "
                   "WHERE case_id LIKE :p", p=like)[0]
    dec_rate = None
    if decisions > 1 and span[0] and span[1] > span[0]:
        dec_rate = (decisions - 1) / (span[1] - span[0]).total_seconds()
    result: dict[str, Any] = {
        "cases": m, "committed": committed, "decisions": decisions, "lead_s": round(lead, 1),
        "settled_at_due": settled, "notifications_unsent_at_due": unsent,
        "decisions_per_s": dec_rate,
        "decisions_per_s_from_due": decisions / max(1e-9, (span[1] - due).total_seconds())
        if span[1] else None,
        "timer_lateness_first_s": (span[0] - due).total_seconds() if span[0] else None,
        "cpu_cores": split,
    }
    result["outbox_left"] = db.scalar("SELECT count(*) FROM outbox")
    total_notes = int(db.scalar("SELECT count(*) FROM notifications WHERE case_id LIKE :p",
                                p=like) or 0)
    result["notifications"] = total_notes
    if notifier:
        wait_count(db, f"SELECT count(*) FROM notifications WHERE case_id LIKE '{like}' "
                   "AND status IN ('sent', 'failed', 'deferred')", total_notes, timeout)
        span = db.rows("SELECT min(sent_at), max(sent_at), count(*) FROM notifications "
                       "WHERE status = 'sent' AND case_id LIKE :p", p=like)[0]
        result["notifications_sent"] = span[2]
        result["notification_status"] = dict(
            db.rows("SELECT status, count(*) FROM notifications WHERE case_id LIKE :p "
                    "GROUP BY 1", p=like))
        if span[2] > 1 and span[1] > span[0]:
            result["notifications_per_s"] = (span[2] - 1) / (span[1] - span[0]).total_seconds()
    return result


def profile_intake(services: Services, seconds: float, out: Path) -> dict[str, Any]:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        return {"error": "py-spy not installed (.venv/bin/pip install py-spy)"}
    pids = [p for p in services.group_pids("intake") if p != services.procs["intake"].pid]
    if not pids:
        return {"error": "no intake worker process"}
    raw = out.with_suffix(".txt")
    cmd = [spy, "record", "--pid", str(pids[0]), "--duration", str(int(seconds)), "--rate",
           "200", "--format", "raw", "--output", str(raw), "--nonblocking"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {"proc": proc, "raw": str(raw), "pid": pids[0]}


def summarise_profile(raw: str, top: int = 15) -> list[tuple[str, float]]:
    """Inclusive share of samples per function from py-spy's collapsed stacks."""
    counts: dict[str, int] = {}
    total = 0
    for line in Path(raw).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        seen = set()
        for frame in stack.split(";"):
            name = re.sub(r":\d+\)$", ")", frame)
            if name not in seen:
                seen.add(name)
                counts[name] = counts.get(name, 0) + int(n)
    return [(k, round(100 * v / total, 1)) for k, v in
            sorted(counts.items(), key=lambda kv: -kv[1])[:top]] if total else []


# ---- main --------------------------------------------------------------------------------


def service_settings(db_url: str, amqp_url: str, smtp_port: int) -> dict[str, str]:
    """The services' environment in the benchmarks: quiet hours off and rate limits out of
    the way (the simulator reuses phone numbers), so what is measured is the sending."""
    return {
        "AFTERSALES_DATABASE_URL": db_url, "AFTERSALES_AMQP_URL": amqp_url,
        "AFTERSALES_REDIS_PREFIX": f"aftersales:bench-e2e-{PID}:",
        "AFTERSALES_METRICS_DIR": str(LOG_DIR / "metrics"),
        "AFTERSALES_SMTP_PORT": str(smtp_port), "AFTERSALES_QUIET_HOURS": "off",
        "AFTERSALES_SMS_PER_PHONE_PER_HOUR": "1000000",
        "AFTERSALES_SMS_PER_PHONE_PER_DAY": "1000000",
        "AFTERSALES_EMAIL_PER_ADDRESS_PER_HOUR": "1000000",
        "AFTERSALES_LOG_LEVEL": "WARNING",
    }


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (about 2 minutes)")
    ap.add_argument("--intake-processes", type=int, default=2,
                    help="AFTERSALES_WORKER_PROCESSES for intake (default 2)")
    ap.add_argument("--intake-batch", type=int, default=200,
                    help="AFTERSALES_INTAKE_BATCH (default 200)")
    ap.add_argument("--notifier-processes", type=int, default=1,
                    help="AFTERSALES_WORKER_PROCESSES for the notifier (default 1, the "
                         "service's default; 2 drains notifications faster but takes "
                         "CPU and database time from intake on 2 cores)")
    ap.add_argument("--resolver-processes", type=int, default=2,
                    help="AFTERSALES_WORKER_PROCESSES for the resolver (default 2, as for "
                         "intake: the two copies deploy/k8s runs; one process decides a "
                         "catch-up slower, its Python bound to one core: docs/benchmarks.md)")
    ap.add_argument("--resolver-threads", type=int, default=4,
                    help="AFTERSALES_WORKER_THREADS for the resolver (default 4)")
    ap.add_argument("--latency-rate", type=float, default=500.0)
    ap.add_argument("--decision-cases", type=int, default=None,
                    help="cases in the decisions phase (default: what intake commits in "
                         "20 s in the throughput phase, at most 5,000; 1,000 with --quick)")
    ap.add_argument("--profile", action="store_true", help="py-spy the intake worker")
    ap.add_argument("--phases", default="baseline,latency,throughput,decisions",
                    help="comma-separated subset of baseline,latency,throughput,decisions "
                         "(default all; a drain follows latency and throughput)")
    ap.add_argument("--without", default="",
                    help="comma-separated services not to start, to see what the others do "
                         "alone (e.g. notifier)")
    ap.add_argument("--out", default=str(OUT_DIR / "e2e.json"))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _interrupted)  # clean up (database, vhost, services) then stop
    phases = set(args.phases.split(","))
    unknown = phases - {"baseline", "latency", "throughput", "decisions"}
    if unknown:
        ap.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    quick = args.quick
    sizes: dict[str, Any] = {
        "baseline": 5000 if quick else 30000, "throughput": 5000 if quick else 30000,
        "latency_s": 10.0 if quick else 30.0, "decisions": 1000 if quick else 5000}
    OUT_DIR.mkdir(exist_ok=True)
    result: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(), "quick": quick, "sizes": sizes,
        "machine": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()},
    }
    with (own_database(PG_ADMIN, NAME) as db_url, own_vhost(NAME, AMQP_HOST) as amqp_url,
          smtp_sink() as (smtp_port, sink_pid)):
        settings = service_settings(db_url, amqp_url, smtp_port)
        result["quiet_hours"] = quiet_hours_off(settings["AFTERSALES_QUIET_HOURS"])
        intake_env = {"AFTERSALES_WORKER_PROCESSES": str(args.intake_processes),
                      "AFTERSALES_INTAKE_BATCH": str(args.intake_batch),
                      "AFTERSALES_INTAKE_PREFETCH": str(max(200, 2 * args.intake_batch))}
        notifier_env = {"AFTERSALES_WORKER_PROCESSES": str(args.notifier_processes)}
        resolver_env = {"AFTERSALES_WORKER_PROCESSES": str(args.resolver_processes),
                        "AFTERSALES_WORKER_THREADS": str(args.resolver_threads)}
        result["settings"] = {"intake": intake_env, "notifier": notifier_env,
                              "resolver": resolver_env,
                              "other services": "defaults (1 process, 4 threads)"}
        per_service = {"intake": intake_env, "notifier": notifier_env,
                       "resolver": resolver_env}
        db = Db(db_url)
        if "baseline" in phases:
            result["baseline"] = phase_baseline(amqp_url, sizes["baseline"], threads=8)
        services = Services(settings)
        sampler = RssSampler(services)
        cpu = CpuSplit(services, sink_pid)
        try:
            for service in SERVICES:
                if service in args.without.split(","):
                    continue
                ok = services.start(service, per_service.get(service))
                log(f"{service}: {'running' if ok else 'FAILED ' + services.failed[service]}")
            result["services_failed"] = services.failed
            sampler.start()
            # Latency first, from an idle system at the offered rate (with the notifications
            # that rate causes); each later phase starts once the notifier has drained.
            if "latency" in phases:
                before = cpu.snapshot()
                result["latency"] = phase_latency(db, amqp_url, args.latency_rate,
                                                  sizes["latency_s"])
                result["latency"]["cpu_cores"] = cpu.cores(before, cpu.snapshot())
                if "notifier" in services.procs:
                    result["drain_after_latency"] = phase_drain(db, 120 if quick else 300)
            if "throughput" in phases:
                spy = profile_intake(services, 12 if quick else 25,
                                     OUT_DIR / "e2e-intake-profile") if args.profile else None
                before = cpu.snapshot()
                result["throughput"] = phase_throughput(db, amqp_url, sizes["throughput"],
                                                        timeout=60 if quick else 150)
                result["throughput"]["cpu_cores"] = cpu.cores(before, cpu.snapshot())
                if spy and "proc" in spy:
                    spy["proc"].wait(60)
                    result["profile"] = {"pid": spy["pid"], "raw": spy["raw"],
                                         "top_inclusive_pct": summarise_profile(spy["raw"])}
                elif spy:
                    result["profile"] = spy
                if "notifier" in services.procs:
                    result["drain_after_throughput"] = phase_drain(db, 180 if quick else 400)
            if "decisions" in phases:
                intake_rate = result.get("throughput", {}).get("rate_sustained") or 100.0
                sizes["decisions_used"] = args.decision_cases or min(
                    sizes["decisions"], max(200, int(intake_rate * 20)))
                send_rate = max((result.get(f"drain_after_{p}", {}).get("notifications_per_s")
                                 or 0.0 for p in ("latency", "throughput")), default=0.0)
                result["decisions"] = phase_decisions(
                    db, amqp_url, sizes["decisions_used"],
                    intake_rate,
                    notifier="notifier" in services.procs, timeout=90 if quick else 180,
                    cpu=cpu, send_rate=send_rate or None)
            services.sample_rss()
            # With quiet hours off nothing waits for the morning (by reason: quiet_hours,
            # rate_limited, or a retry after a failed send).
            result["notifications_deferred"] = dict(db.rows(
                "SELECT coalesce(last_error, '?'), count(*) FROM notifications "
                "WHERE status = 'deferred' GROUP BY 1"))
        finally:
            sampler.stop_event.set()
            services.stop_all()
            db.sql_engine.dispose()
        result["rss_peak_mib"] = {s: round(v / 2**20, 1) for s, v in services.rss_peak.items()}
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    report(result)
    result["result_line"] = result_line(result)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str, ensure_ascii=False))
    log(f"wrote {args.out}")
    print(result["result_line"], flush=True)
    return 0


def quiet_hours_off(spec: str) -> str:
    """The benchmark measures sending, not waiting for 08:00: check that the notifier
    will read the setting as no quiet hours at all (start == end), as it parses it."""
    from services.notifier.delivery import QuietHours

    quiet = QuietHours.parse(spec)
    if quiet.start != quiet.end:
        raise SystemExit(f"quiet hours must be off in the benchmark, not {spec!r}")
    return "off"


def ratio_to_baseline(r: dict[str, Any]) -> float | None:
    tp, base = r.get("throughput", {}), r.get("baseline", {})
    ours = tp.get("rate_sustained") or tp.get("rate_overall")
    return ours / base["rate"] if ours and base.get("rate") else None


def decisions_ratio(r: dict[str, Any]) -> float | None:
    rate, base = r.get("decisions", {}).get("decisions_per_s"), r.get("baseline", {})
    return rate / base["rate"] if rate and base.get("rate") else None


def p99_target_ms(offered_rate: float) -> float:
    """Issue 19: under 100 ms at 1,000 events/s offered; the first target, 200 ms at 500."""
    return 100.0 if offered_rate >= 1000 else 200.0


def result_line(r: dict[str, Any]) -> str:
    """The last line of the output: the headline figures, one `key=value` each."""
    tp, lt, dec, base = (r.get(k, {}) for k in ("throughput", "latency", "decisions",
                                                 "baseline"))

    def f(v: float | None, digits: int = 0) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}"

    ratio = ratio_to_baseline(r)
    deferred = r.get("notifications_deferred", {})
    dec_rate = dec.get("decisions_per_s")
    dec_ratio = decisions_ratio(r)
    return (
        f"RESULT e2e events_per_s={f(tp.get('rate_sustained') or tp.get('rate_overall'))}"
        f" baseline_per_s={f(base.get('rate'))} ratio={f(ratio, 2)}"
        f" p99_ms={f(lt.get('p99_ms'), 1)} offered_per_s={f(lt.get('offered_rate'))}"
        f" decisions_per_s={f(dec_rate)} decisions_ratio={f(dec_ratio, 2)}"
        f" quiet_hours={r.get('quiet_hours', 'n/a')}"
        f" deferred_for_quiet_hours={deferred.get('quiet_hours', 0)}"
        f" deferred={sum(deferred.values())}")


def report(r: dict[str, Any]) -> None:
    tp, lt, dec, base = r.get("throughput", {}), r.get("latency", {}), r.get("decisions", {}), \
        r.get("baseline", {})
    ours = tp.get("rate_sustained") or tp.get("rate_overall")
    ratio, dec_ratio = ratio_to_baseline(r), decisions_ratio(r)
    offered = lt.get("offered_rate", 500)
    p99_target = p99_target_ms(offered)
    rows = [
        ("events/s end to end (sustained)", ours, ">= 1000", ours is not None and ours >= 1000),
        ("events/s end to end (overall)", tp.get("rate_overall"), "", None),
        ("publish rate, events/s (confirmed)", tp.get("publish_rate"), "", None),
        (f"intake p50 ms @ {offered:.0f}/s", lt.get("p50_ms"), "", None),
        (f"intake p99 ms @ {offered:.0f}/s", lt.get("p99_ms"), f"< {p99_target:.0f}",
         lt.get("p99_ms") is not None and lt["p99_ms"] < p99_target),
        ("  publish -> tx start p99 ms", lt.get("to_tx_start_p99_ms"), "", None),
        ("decisions/s", dec.get("decisions_per_s"), "", None),
        # A short phase is decided before the work behind its decisions gets going and
        # overstates the rate (docs/benchmarks.md, session 10): judged at full size only.
        ("decisions / baseline", dec_ratio, ">= 0.8", None
         if dec.get("cases", 0) < STEADY_DECISION_CASES
         else dec_ratio is not None and dec_ratio >= 0.8),
        ("  notifications unsent at the due time", dec.get("notifications_unsent_at_due"),
         "0", dec.get("settled_at_due") if dec else None),
        ("notifications sent/s (decisions phase)", dec.get("notifications_per_s"), "", None),
        ("notifications sent/s (backlog drain)",
         r.get("drain_after_throughput", {}).get("notifications_per_s"), "", None),
        ("baseline no-op Dramatiq msgs/s", base.get("rate"), "", None),
        ("  Dramatiq enqueue, confirm per msg, /s", base.get("enqueue_one_by_one_rate"), "",
         None),
        ("ours / baseline", ratio, ">= 0.6", ratio is not None and ratio >= 0.6),
    ]
    rows += [(f"RSS {s} MiB", v, "", None) for s, v in r.get("rss_peak_mib", {}).items()]
    print(f"\n{'metric':<42} | {'value':>10} | {'target':>8} | met?")
    print("-" * 74)
    for name, value, target, met in rows:
        shown = "n/a" if value is None else (f"{value:,.2f}" if isinstance(value, float)
                                             and value < 10 else f"{value:,.0f}")
        print(f"{name:<42} | {shown:>10} | {target:>8} | "
              f"{'' if met is None else ('yes' if met else 'NO')}")
    for phase in ("latency", "throughput", "decisions"):
        split = r.get(phase, {}).get("cpu_cores")
        if split:
            print(f"\nCPU in the {phase} phase, cores (of {os.cpu_count()}): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in split.items() if v >= 0.01)
                  + f"; total {sum(split.values()):.2f}")
    if r.get("services_failed"):
        print(f"\nservices that did not start: {r['services_failed']}")
    if r.get("profile", {}).get("top_inclusive_pct"):
        print("\nintake worker profile (inclusive % of samples):")
        for name, share in r["profile"]["top_inclusive_pct"]:
            print(f"  {share:5.1f}%  {name}")


if __name__ == "__main__":
    sys.exit(main())
