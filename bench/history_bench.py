#!/usr/bin/env python
# ruff: noqa: S603 - the benchmark starts its own helper processes with fixed arguments
"""History benchmark (issue 19): does a year of history slow the services down?

    .venv/bin/python bench/history_bench.py                 # full size: 10,000,000 finished
                                                            # cases, 1,000,000 open ones
    .venv/bin/python bench/history_bench.py --scale 0.05    # 1/20 of that
    .venv/bin/python bench/history_bench.py --scale 0.001 --quick   # a smoke run

Two databases (and vhosts) of its own, created at start and dropped at the end: one left
empty, one loaded first with a year of history by SQL alone (INSERT ... SELECT over
generate_series, copies of cases the domain really produced, with their own ids):
  - finished cases, closed over the last 365 days, each with its 5 events, 8 sent
    notifications and, for every second case, a decision and the fired deadline it came
    from (the deadlines a case no longer wants are deleted as it moves on);
  - open cases, opened over the last 10 days, each with its event, its pending deadlines
    (due within the next 3 weeks) and a sent notification.
  Each case row carries the `records_since` intake gives it (when its first row was
  written), as a year under this code would leave it.
Then the same measurements on each database, the empty one first:
  latency     simulator traffic at --latency-rate events/s for a while (all four
              services, quiet hours off): publish -> commit p50/p99 (e2e_bench)
  throughput  N simulator events published as fast as the broker confirms: committed
              events/s, from each event's commit time (its transaction id in polled
              snapshots, no count(*) over case_events)
  case show   `case_document` (what `aftersales case show` prints) for cases of this run
              and, on the history database, year-old and open ones: p50/p99 ms; and the
              command itself, wall time
  lateness    the real timer with a stream of deadlines coming due (timer_bench)
  catch-up    overdue deadlines on open cases, real timer + resolver: decisions/s
              (timer_bench)
and at the end, on the history database, retention of its oldest month (--retention-days)
while intake takes the latency phase's traffic: cases/s archived and removed, and intake's
latency meanwhile.
Prints a table, a final `RESULT` line (each figure as empty/history) and writes
bench-results/history.json. The target: every history figure within 10 % of the empty one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH_DIR))

import e2e_bench as e2e  # noqa: E402
import pika  # noqa: E402
import psycopg  # noqa: E402
import timer_bench as tb  # noqa: E402
from sqlalchemy import text  # noqa: E402

from aftersales_cli.simulate.generator import SimConfig, generate  # noqa: E402

FULL_FINISHED = 10_000_000
FULL_OPEN = 1_000_000
CHUNK = 50_000  # cases per loading transaction
OUT = ROOT / "bench-results" / "history.json"


def log(msg: str) -> None:
    print(f"[history {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the history, by SQL ------------------------------------------------------------------


def templates() -> dict[str, Any]:
    """A finished return-refund case and an open one as the domain makes them, with the
    deadlines and notifications its events caused: the rows the loader copies."""
    from shared.domain import Engine, Event, RuleBook, WorkCalendar
    from shared.notifications.policy import NotificationPolicy

    engine = Engine(RuleBook.load(None), WorkCalendar(None))
    policy = NotificationPolicy.load(None)
    start = datetime.now(UTC) - timedelta(days=30)
    opened_data = {"kind": "return_refund", "amount_fen": 12900, "reason": "尺码不合适",
                   "buyer": {"phone": "13800000000", "email": "buyer@example.com"},
                   "merchant": {"phone": "13900000000", "email": "shop@example.com"}}
    steps = [("case.opened", opened_data), ("merchant.approved", {}),
             ("buyer.shipped", {"carrier": "SF", "tracking_no": "SF1234567890"}),
             ("merchant.received", {}), ("refund.completed", {"refund_fen": 12900})]
    case = None
    events, deadlines, notes = [], [], []
    open_case: dict[str, Any] = {}
    for i, (type_, data) in enumerate(steps):
        at = start + timedelta(hours=10 * i)
        doc = {"event_id": f"t{i}", "type": type_, "occurred_at": at.isoformat(),
               "platform": "kuaishou", "shop_id": "S1", "order_id": "O1", "case_id": "C1",
               "data": data}
        outcome = engine.apply(case, Event(
            event_id=f"t{i}", type=type_, occurred_at=at, platform="kuaishou", shop_id="S1",
            order_id="O1", case_id="C1", due_at=None, data=data), at)
        assert outcome.applied and outcome.case is not None, outcome.problem
        case = outcome.case
        hours = 10.0 * i
        events.append({"i": i, "type": type_, "offset_h": hours, "version": case.version,
                       "body": doc})
        for d in outcome.deadlines or ():
            deadlines.append({
                "step": d.step, "purpose": d.purpose, "action": d.action, "party": d.party,
                "offset_h": (d.due_at - start).total_seconds() / 3600, "fence": d.fence,
                "rule_set": d.rule.set, "rule_version": d.rule.version, "rule_id": d.rule.id})
        for notice in outcome.notices:
            for r in policy.expand(notice, case.contacts, None):
                notes.append({"reason": r.reason, "party": r.party, "channel": r.channel,
                              "template": r.template, "params": dict(r.params),
                              "offset_h": hours})
        if i == 0:
            open_case = {"snapshot": case.to_dict(), "events": list(events),
                         "deadlines": list(deadlines), "notes": list(notes)}
    assert case is not None and case.status == "closed"
    for i, n in enumerate(notes):
        n["i"] = i
    for i, d in enumerate(deadlines):
        d["i"] = i
    decision = {"type": "decision.auto_approved", "step": "merchant_response",
                "rule": {"set": case.rule_set, "version": case.rule_version,
                         "id": "kuaishou.return_refund.merchant_response"},
                "platform": "kuaishou", "kind": "return_refund", "data": {}}
    return {"finished": {"snapshot": case.to_dict(), "events": events,
                         "deadlines": deadlines, "notes": notes, "decision": decision},
            "open": open_case}


CASE_COLS = ("case_id, platform, shop_id, order_id, kind, status, step, version, rule_set, "
             "rule_version, step_due_at, opened_at, closed_at, updated_at, snapshot, "
             "records_since")

# %(prefix)s: 'H' (finished) or 'HO' (open). `t` gives each case its times.
FINISHED_TIMES = """
    SELECT g, 'H' || g AS cid, 'O-H' || g AS oid,
           now() - make_interval(secs => 3600 + (g * 7919) %% 31536000) AS closed_at
    FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) g"""
OPEN_TIMES = """
    SELECT g, 'HO' || g AS cid, 'O-HO' || g AS oid,
           now() - make_interval(secs => (g * 7919) %% 864000) AS opened_at
    FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) g"""

# The keys the services' insert statements claim with each row (what keeps them unique
# across monthly partitions), claimed here for the rows each chunk loaded.
KEY_TABLES = (("case_events", "event_ids", "event_id"),
              ("decisions", "decision_ids", "decision_id"),
              ("notifications", "notification_keys", "dedup_key"))

LOAD_FINISHED = [
    f"""INSERT INTO cases ({CASE_COLS})
        SELECT cid, 'kuaishou', 'S' || (g %% 5000), oid, %(kind)s, 'closed', 'closed',
               %(version)s, %(rule_set)s, %(rule_version)s, NULL,
               closed_at - interval '40 hours', closed_at, closed_at,
               %(snapshot)s::jsonb || jsonb_build_object('case_id', cid, 'order_id', oid),
               closed_at - interval '40 hours'  -- records_since: when its first row was written
        FROM ({FINISHED_TIMES}) t""",
    f"""INSERT INTO case_events (event_id, case_id, type, occurred_at, received_at, outcome,
                                 case_version, body)
        SELECT 'h' || g || '-' || e.i, cid, e.type,
               closed_at - interval '40 hours' + e.offset_h * interval '1 hour',
               closed_at - interval '40 hours' + e.offset_h * interval '1 hour',
               'applied', e.version,
               e.body || jsonb_build_object('event_id', 'h' || g || '-' || e.i,
                                            'case_id', cid, 'order_id', oid)
        FROM ({FINISHED_TIMES}) t CROSS JOIN jsonb_to_recordset(%(events)s::jsonb)
             AS e(i int, type text, offset_h float8, version int, body jsonb)""",
    # The deadline each decision fired (below); the others were deleted as the case moved
    # on (shared/db/deadlines.py).
    f"""INSERT INTO deadlines (case_id, step, purpose, action, party, due_at, deadline_at,
                               fence, rule_set, rule_version, rule_id, status, created_at,
                               dispatched_at, dispatch_count, fired_at, result)
        SELECT cid, d.step, d.purpose, d.action, d.party,
               closed_at - interval '30 hours', closed_at - interval '30 hours',
               d.fence, d.rule_set, d.rule_version, d.rule_id, 'fired',
               closed_at - interval '40 hours', closed_at - interval '30 hours', 1,
               closed_at - interval '30 hours', NULL
        FROM ({FINISHED_TIMES}) t CROSS JOIN jsonb_to_recordset(%(deadlines)s::jsonb)
             AS d(i int, step text, purpose text, action text, party text, offset_h float8,
                  fence int, rule_set text, rule_version text, rule_id text)
        WHERE g %% 2 = 0 AND d.step = %(decision_step)s AND d.purpose = 'deadline'""",
    f"""INSERT INTO decisions (decision_id, case_id, type, step, decided_at, body)
        SELECT md5(cid)::uuid::text, cid, %(decision_type)s, %(decision_step)s,
               closed_at - interval '30 hours',
               %(decision)s::jsonb || jsonb_build_object(
                   'decision_id', md5(cid)::uuid::text, 'case_id', cid, 'order_id', oid)
        FROM ({FINISHED_TIMES}) t WHERE g %% 2 = 0""",
    f"""INSERT INTO notifications (dedup_key, case_id, reason, party, channel, recipient,
                                   template, params, status, attempts, created_at, sent_at)
        SELECT 'h' || g || '-' || n.i, cid, n.reason, n.party, n.channel,
               CASE WHEN n.channel = 'sms' THEN '13' || lpad((g %% 1000000000)::text, 9, '0')
                    ELSE 'u' || g || '@example.com' END,
               n.template, n.params, 'sent', 1,
               closed_at - interval '40 hours' + n.offset_h * interval '1 hour',
               closed_at - interval '40 hours' + n.offset_h * interval '1 hour'
        FROM ({FINISHED_TIMES}) t CROSS JOIN jsonb_to_recordset(%(notes)s::jsonb)
             AS n(i int, reason text, party text, channel text, template text, params jsonb,
                  offset_h float8)""",
    *[f"INSERT INTO {keys} ({key}) SELECT {key} FROM {table} WHERE case_id IN "
      f"(SELECT cid FROM ({FINISHED_TIMES}) t)" for table, keys, key in KEY_TABLES],
]

LOAD_OPEN = [
    f"""INSERT INTO cases ({CASE_COLS})
        SELECT cid, 'kuaishou', 'S' || (g %% 5000), oid, %(kind)s, 'open', %(step)s,
               %(version)s, %(rule_set)s, %(rule_version)s,
               now() + make_interval(days => (1 + g %% 20)::int), opened_at, NULL, opened_at,
               %(snapshot)s::jsonb || jsonb_build_object('case_id', cid, 'order_id', oid),
               opened_at
        FROM ({OPEN_TIMES}) t""",
    f"""INSERT INTO case_events (event_id, case_id, type, occurred_at, received_at, outcome,
                                 case_version, body)
        SELECT 'ho' || g || '-' || e.i, cid, e.type, opened_at, opened_at, 'applied',
               e.version, e.body || jsonb_build_object('event_id', 'ho' || g || '-' || e.i,
                                                       'case_id', cid, 'order_id', oid)
        FROM ({OPEN_TIMES}) t CROSS JOIN jsonb_to_recordset(%(events)s::jsonb)
             AS e(i int, type text, offset_h float8, version int, body jsonb)""",
    # Pending, due within the next three weeks (never during the run: the timer must not
    # fire history), spread so the timer's index holds them all.
    f"""INSERT INTO deadlines (case_id, step, purpose, action, party, due_at, deadline_at,
                               fence, rule_set, rule_version, rule_id, status, created_at)
        SELECT cid, d.step, d.purpose, d.action, d.party,
               now() + make_interval(days => 1, secs => (g * 104729) %% 1728000),
               now() + make_interval(days => 1, secs => (g * 104729) %% 1728000),
               d.fence, d.rule_set, d.rule_version, d.rule_id, 'pending', opened_at
        FROM ({OPEN_TIMES}) t CROSS JOIN jsonb_to_recordset(%(deadlines)s::jsonb)
             AS d(i int, step text, purpose text, action text, party text, offset_h float8,
                  fence int, rule_set text, rule_version text, rule_id text)""",
    f"""INSERT INTO notifications (dedup_key, case_id, reason, party, channel, recipient,
                                   template, params, status, attempts, created_at, sent_at)
        SELECT 'ho' || g || '-' || n.i, cid, n.reason, n.party, n.channel,
               CASE WHEN n.channel = 'sms' THEN '13' || lpad((g %% 1000000000)::text, 9, '0')
                    ELSE 'o' || g || '@example.com' END,
               n.template, n.params, 'sent', 1, opened_at, opened_at
        FROM ({OPEN_TIMES}) t CROSS JOIN jsonb_to_recordset(%(notes)s::jsonb)
             AS n(i int, reason text, party text, channel text, template text, params jsonb,
                  offset_h float8)""",
    *[f"INSERT INTO {keys} ({key}) SELECT {key} FROM {table} WHERE case_id IN "
      f"(SELECT cid FROM ({OPEN_TIMES}) t)" for table, keys, key in KEY_TABLES],
]


def _params(kind: dict[str, Any]) -> dict[str, Any]:
    snap = kind["snapshot"]
    params = {
        "kind": snap["kind"], "step": snap["step"], "version": snap["version"],
        "rule_set": snap["rule_set"], "rule_version": snap["rule_version"],
        "snapshot": json.dumps(snap, ensure_ascii=False),
        "events": json.dumps(kind["events"], ensure_ascii=False),
        "deadlines": json.dumps(kind["deadlines"]),
        "notes": json.dumps([{**n, "i": i} for i, n in enumerate(kind["notes"])],
                            ensure_ascii=False),
    }
    if "decision" in kind:
        params |= {"decision": json.dumps(kind["decision"], ensure_ascii=False),
                   "decision_type": kind["decision"]["type"],
                   "decision_step": kind["decision"]["step"]}
    return params


def postgres_started(box: tb.Sandbox, timeout: float = 300) -> datetime:
    """When PostgreSQL last started, waiting for it if it is restarting: other work on a
    shared machine (fault tests) restarts it now and then."""
    end = time.monotonic() + timeout
    while True:
        try:
            with box.connect() as conn:
                row = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
                assert row is not None
                return row[0]  # type: ignore[no-any-return]
        except psycopg.OperationalError:
            if time.monotonic() > end:
                raise
            time.sleep(2)


def broker_up(box: tb.Sandbox, timeout: float = 300) -> None:
    """Wait for RabbitMQ (restarted now and then by other work on a shared machine)."""
    end = time.monotonic() + timeout
    while True:
        try:
            pika.BlockingConnection(pika.URLParameters(box.amqp_url)).close()
            return
        except pika.exceptions.AMQPError:
            if time.monotonic() > end:
                raise
            time.sleep(2)


def partition_by_month(box: tb.Sandbox) -> None:
    """The history database as one partitioned for over a year looks: a partition per
    month of the history (migration 0020 put the empty tables' history in one)."""
    from sqlalchemy import create_engine

    from shared.db.partitions import month_start, partition_history_by_month

    engine = create_engine(box.sa_url)
    try:
        with engine.begin() as conn:
            if conn.execute(text("SELECT to_regclass('case_events_history')")).scalar():
                now = conn.execute(text("SELECT now()")).scalar_one()
                partition_history_by_month(conn, month_start(now - timedelta(days=400)))
    finally:
        engine.dispose()


# Each table's bytes (rows, TOAST and indexes; a partitioned table's partitions summed),
# largest first: what a full-size history needs on disk is about this times its cases.
TABLE_BYTES = """
    SELECT coalesce(parent.relname, rel.relname), sum(pg_total_relation_size(rel.oid))
      FROM pg_class rel
      LEFT JOIN pg_inherits inh ON inh.inhrelid = rel.oid
      LEFT JOIN pg_class parent ON parent.oid = inh.inhparent
     WHERE rel.relkind = 'r' AND rel.relnamespace = 'public'::regnamespace
     GROUP BY 1 ORDER BY 2 DESC"""


def bytes_per_case(conn: psycopg.Connection[Any], cases: int) -> dict[str, int]:
    per_table = {name: int(size) // max(cases, 1)
                 for name, size in conn.execute(TABLE_BYTES).fetchall()}
    return {"all": sum(per_table.values()), **{k: v for k, v in per_table.items() if v >= 10}}


def load_history(box: tb.Sandbox, finished: int, open_: int) -> dict[str, Any]:
    """Chunk by chunk, one transaction each; a chunk cut off by a PostgreSQL restart was
    rolled back and is loaded again."""
    t0 = time.perf_counter()
    partition_by_month(box)
    shapes = templates()
    for name, count, statements, params in (
            ("finished", finished, LOAD_FINISHED, _params(shapes["finished"])),
            ("open", open_, LOAD_OPEN, _params(shapes["open"]))):
        for lo in range(1, count + 1, CHUNK):
            hi = min(count, lo + CHUNK - 1)
            for attempt in range(5):
                try:
                    with box.connect() as conn, conn.transaction():
                        conn.execute("SET LOCAL synchronous_commit = off")  # a bulk load
                        for sql in statements:
                            conn.execute(sql, {**params, "lo": lo, "hi": hi})
                    break
                except psycopg.OperationalError as exc:
                    log(f"chunk {lo:,}-{hi:,} cut off ({exc}); again (attempt {attempt + 2})")
                    postgres_started(box)
            else:
                raise RuntimeError("PostgreSQL kept restarting during the load")
            log(f"loaded {name} cases {hi:,}/{count:,} ({time.perf_counter() - t0:.0f} s)")
    loaded_s = time.perf_counter() - t0
    postgres_started(box)
    conn = box.connect()
    for table in ("cases", "case_events", "deadlines", "decisions", "notifications"):
        conn.execute(f"VACUUM ANALYZE {table}")
    rows = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # type: ignore[index]
            for t in ("cases", "case_events", "deadlines", "decisions", "notifications")}
    size = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))"
                        ).fetchone()[0]  # type: ignore[index]
    per_case = bytes_per_case(conn, rows["cases"])
    conn.close()
    log(f"history loaded in {loaded_s:.0f} s (+{time.perf_counter() - t0 - loaded_s:.0f} s "
        f"vacuum analyze): {rows}, database {size}; bytes per case {per_case}")
    return {"finished_cases": finished, "open_cases": open_, "rows": rows,
            "database_size": size, "bytes_per_case": per_case,
            "load_seconds": round(loaded_s, 1),
            "vacuum_analyze_seconds": round(time.perf_counter() - t0 - loaded_s, 1)}


# ---- measurements ---------------------------------------------------------------------------


def intake_throughput(db: e2e.Db, amqp_url: str, n: int, timeout: float, tag: str
                      ) -> dict[str, Any]:
    """Committed events/s under a backlog of n events. Each event's commit time comes from
    its transaction id against snapshots polled every 20 ms (e2e_bench.commit_times); the
    only other reads while it runs are look-ups by event id once a second
    (e2e_bench.wait_committed)."""
    cfg = SimConfig(rate=1000.0, duplicate_share=0.0, malformed_share=0.0, run_id=f"tp{tag}")
    msgs = list(generate(cfg, n, seed=1, rate=1000.0))
    ids = [m.event["event_id"] for m in msgs if m.event is not None]
    snapshots: list[tuple[float, str]] = []
    stop = threading.Event()

    def poll() -> None:
        with db.sql_engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            while not stop.is_set():
                snap = conn.execute(text("SELECT pg_current_snapshot()::text")).scalar()
                snapshots.append((time.monotonic(), str(snap)))
                time.sleep(0.02)

    log(f"throughput: {n} events published as fast as confirmed")
    poller = threading.Thread(target=poll, daemon=True)
    t0 = time.monotonic()
    poller.start()
    pub = e2e.publish(amqp_url, msgs)
    e2e.wait_committed(db, ids, t0 + timeout, interval=1.0)
    time.sleep(0.05)
    stop.set()
    poller.join(5)
    purged = e2e.purge_intake_queue(amqp_url)
    epoch = int(db.scalar("SELECT pg_current_xact_id()::text::bigint >> 32")) << 32
    xids = {r[0]: epoch + int(r[1]) for r in db.rows(
        "SELECT event_id, xmin::text FROM event_ids WHERE event_id = ANY(:ids)", ids=ids)}
    committed = sorted(e2e.commit_times(snapshots, xids).values())
    samples = [(t, i + 1) for i, t in enumerate(committed)]
    last = committed[-1] if committed else time.monotonic()
    return {"events": n, "committed": len(committed), "publish_rate": pub["rate"],
            "rate_sustained": e2e.sustained([(t0, 0), *samples], n),
            "rate_overall": len(committed) / (last - t0) if committed else None,
            "purged_unprocessed": purged, "load_during": os.getloadavg()}


def wait_notifications_drained(db: e2e.Db, timeout: float) -> dict[str, Any]:
    """Let the notifier finish what a phase caused before the next one (through the
    partial indexes on new and queued rows, not a scan)."""
    sql = "SELECT count(*) FROM notifications WHERE status = 'new' OR status = 'queued'"
    t0, left = time.monotonic(), int(db.scalar(sql))
    log(f"drain: {left} notifications waiting")
    while left and time.monotonic() - t0 < timeout:
        time.sleep(0.5)
        left = int(db.scalar(sql))
    return {"left": left, "seconds": round(time.monotonic() - t0, 1)}


def case_show(url: str, groups: dict[str, list[str]], cli_env: dict[str, str]
              ) -> dict[str, Any]:
    """What `aftersales case show` costs: `case_document` per case (the command's reads),
    in a random order, each case once; and the command itself a few times."""
    from services.ops.caseview import case_document
    from shared.db.session import Database, make_engine

    sql_engine = make_engine(url, pool_size=1)
    db = Database(sql_engine)
    out: dict[str, Any] = {}
    try:
        case_document(db, "warm-up-connection")
        for name, ids in groups.items():
            ids = list(ids)
            random.Random(7).shuffle(ids)
            times = []
            for case_id in ids:
                t = time.perf_counter()
                doc = case_document(db, case_id)
                times.append(time.perf_counter() - t)
                assert doc is not None, case_id
            out[name] = {"cases": len(ids), "p50_ms": e2e._ms(e2e.pct(times, 0.5)),
                         "p99_ms": e2e._ms(e2e.pct(times, 0.99)),
                         "mean_ms": e2e._ms(statistics.fmean(times)) if times else None}
    finally:
        sql_engine.dispose()
    first = next(iter(groups.values()))[:5]
    walls = []
    for case_id in first:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "aftersales_cli.cli", "case", "show", case_id],
                       cwd=ROOT, env={**os.environ, **cli_env}, check=True,
                       capture_output=True, timeout=60)
        walls.append(time.perf_counter() - t)
    out["command_wall_ms_median"] = e2e._ms(statistics.median(walls)) if walls else None
    return out


def forget_run(box: tb.Sandbox, history: bool) -> None:
    """Remove what a round added (simulator cases, timer stream rows, catch-up cases), so
    every round sees the same database: empty, or the history alone."""
    tables = ("outbox", "notifications", "decisions", "deadlines", "case_events", "cases")
    # The catch-up counts decisions on this queue: none of an earlier phase may be there.
    conn_amqp = pika.BlockingConnection(pika.URLParameters(box.amqp_url))
    try:
        conn_amqp.channel().queue_delete("bench.decisions.tap")
    finally:
        conn_amqp.close()
    with box.connect() as conn:
        if not history:
            conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY")
            return
        conn.execute("TRUNCATE outbox")
        for table in tables[1:]:
            conn.execute(f"DELETE FROM {table} WHERE case_id NOT LIKE 'H%%'")
        for table in tables[1:]:
            conn.execute(f"VACUUM ANALYZE {table}")


def checkpoint(box: tb.Sandbox) -> float:
    """Write out every dirty page now; returns the seconds it took. The history's load and
    each round's clean-up (DELETE and VACUUM over gigabytes, where the empty database is
    truncated) leave far more to write than the empty side: left to the background
    checkpointer, those writes would compete with the next phase's commits on the history
    side only (or on the empty side, when it comes right after the load)."""
    t0 = time.perf_counter()
    with box.connect() as conn:
        conn.execute("CHECKPOINT")
    return round(time.perf_counter() - t0, 1)


# Blocks each table (a partitioned table with its partitions) read into shared buffers
# ("read": not in them, from the OS or the disk) and found there ("hit"), heap and
# indexes apart, from PostgreSQL's own counters for this database.
BLOCK_COUNTERS = """
    SELECT coalesce(parent.relname, t.relname) AS tbl,
           sum(t.heap_blks_read), sum(t.heap_blks_hit),
           sum(coalesce(t.idx_blks_read, 0)), sum(coalesce(t.idx_blks_hit, 0))
    FROM pg_statio_user_tables t
    LEFT JOIN pg_inherits i ON i.inhrelid = t.relid
    LEFT JOIN pg_class parent ON parent.oid = i.inhparent
    GROUP BY 1"""


def block_counters(box: tb.Sandbox) -> dict[str, tuple[int, ...]]:
    with box.connect() as conn:
        return {row[0]: tuple(int(v) for v in row[1:])
                for row in conn.execute(BLOCK_COUNTERS)}


def blocks_during(before: dict[str, tuple[int, ...]], after: dict[str, tuple[int, ...]],
                  top: int = 8) -> list[dict[str, Any]]:
    """The tables that read the most blocks between two readings of `block_counters`:
    where a phase's working set did not fit in shared buffers."""
    rows: list[dict[str, Any]] = []
    for table, counts in after.items():
        old = before.get(table, (0, 0, 0, 0))
        heap_read, heap_hit, idx_read, idx_hit = (a - b for a, b in zip(counts, old,
                                                                        strict=True))
        rows.append({"table": table, "heap_read": heap_read, "heap_hit": heap_hit,
                     "idx_read": idx_read, "idx_hit": idx_hit})
    rows.sort(key=lambda r: -(r["heap_read"] + r["idx_read"]))
    return rows[:top]


def measure(box: tb.Sandbox, label: str, args: argparse.Namespace, plan: tb.Plan,
            history: bool) -> dict[str, Any]:
    """Every measurement on one database."""
    forget_run(box, history)
    result: dict[str, Any] = {"checkpoint_s": checkpoint(box)}
    log(f"{label}: checkpoint before measuring took {result['checkpoint_s']} s")
    db = e2e.Db(box.sa_url)
    try:
        with e2e.smtp_sink() as (smtp_port, _sink_pid):
            settings = e2e.service_settings(box.sa_url, box.amqp_url, smtp_port)
            result["quiet_hours"] = e2e.quiet_hours_off(settings["AFTERSALES_QUIET_HOURS"])
            services = e2e.Services(settings)
            try:
                for service in e2e.SERVICES:
                    extra = {"AFTERSALES_WORKER_PROCESSES": "2",
                             "AFTERSALES_INTAKE_BATCH": "200",
                             "AFTERSALES_INTAKE_PREFETCH": "400"} if service == "intake" else None
                    ok = services.start(service, extra)
                    log(f"{label}: {service} {'running' if ok else 'FAILED'}")
                if services.failed:
                    raise RuntimeError(f"services did not start: {services.failed}")
                log(f"{label}: latency at {args.latency_rate:.0f} events/s")
                result["latency"] = e2e.phase_latency(db, box.amqp_url, args.latency_rate,
                                                      args.latency_seconds)
                result["latency"].pop("timeline_second_count_p50ms_maxms", None)
                result["drain_after_latency"] = wait_notifications_drained(db, 300)
                counted = block_counters(box)
                result["throughput"] = intake_throughput(
                    db, box.amqp_url, args.events, 300, tag=str(os.getpid()))
                time.sleep(1)  # backends publish their counters within a second
                result["throughput"]["blocks"] = blocks_during(counted, block_counters(box))
                result["drain_after_throughput"] = wait_notifications_drained(db, 300)
            finally:
                services.stop_all()
        run_cases = [r[0] for r in db.rows(
            "SELECT case_id FROM cases WHERE case_id LIKE 'AS-%' ORDER BY case_id LIMIT 300")]
        groups = {"cases of this run": run_cases}
        if history:
            rng = random.Random(11)
            groups["finished a year back"] = [
                f"H{rng.randint(1, args.finished)}" for _ in range(300)]
            groups["open from the history"] = [
                f"HO{rng.randint(1, args.open)}" for _ in range(300)]
        result["case_show"] = case_show(box.sa_url, groups, {
            "AFTERSALES_DATABASE_URL": box.sa_url})
    finally:
        db.sql_engine.dispose()
    result["checkpoint_s_before_lateness"] = checkpoint(box)
    result["lateness"] = tb.ours_lateness(box, plan, plan.small, f"{label}-lateness")
    result["checkpoint_s_before_catchup"] = checkpoint(box)
    counted = block_counters(box)  # the catch-up's blocks include loading its cases
    result["catchup"] = tb.ours_catchup(box, plan, fresh=False)
    time.sleep(1)
    result["catchup"]["blocks"] = blocks_during(counted, block_counters(box))
    result["catchup"].pop("timeline", None)
    return result


def retention_under_traffic(box: tb.Sandbox, args: argparse.Namespace) -> dict[str, Any]:
    """`aftersales retention run` on the history's oldest month while intake takes traffic
    at the latency phase's rate: cases archived and removed per second, and intake's
    latency meanwhile (beside the same phase without retention, measured before)."""
    from shared.db.retention import Archive, RetentionPolicy, run_retention
    from shared.db.session import Database, make_engine

    forget_run(box, history=True)
    folder = ROOT / "bench-results" / f"history-archive-{os.getpid()}"
    policy = RetentionPolicy(args.retention_days, args.retention_days, 500)
    out: dict[str, Any] = {"retention_days": args.retention_days, "batch": policy.batch}
    db = e2e.Db(box.sa_url)
    sql_engine = make_engine(box.sa_url, pool_size=1)
    try:
        due = int(db.scalar("SELECT count(*) FROM cases WHERE status <> 'open' AND "
                            "closed_at < now() - make_interval(days => :d)",
                            d=args.retention_days))
        with e2e.smtp_sink() as (smtp_port, _sink_pid):
            services = e2e.Services(e2e.service_settings(box.sa_url, box.amqp_url, smtp_port))
            try:
                for service in e2e.SERVICES:
                    extra = {"AFTERSALES_WORKER_PROCESSES": "2",
                             "AFTERSALES_INTAKE_BATCH": "200",
                             "AFTERSALES_INTAKE_PREFETCH": "400"} if service == "intake" else None
                    services.start(service, extra)
                if services.failed:
                    raise RuntimeError(f"services did not start: {services.failed}")
                done: dict[str, Any] = {}

                def retain() -> None:
                    t = time.monotonic()
                    done["report"] = run_retention(Database(sql_engine), policy, Archive(folder))
                    done["seconds"] = time.monotonic() - t
                    done["ended"] = time.monotonic()

                log(f"retention: {due:,} cases closed more than {args.retention_days} days "
                    f"ago, while intake takes {args.latency_rate:.0f} events/s")
                worker = threading.Thread(target=retain, daemon=True)
                started = time.monotonic()
                worker.start()
                out["latency_during"] = e2e.phase_latency(
                    db, box.amqp_url, args.latency_rate, args.latency_seconds)
                out["latency_during"].pop("timeline_second_count_p50ms_maxms", None)
                latency_end = time.monotonic()
                worker.join(3600)
            finally:
                services.stop_all()
        report = done["report"]
        files = list(folder.rglob("*.jsonl.gz"))
        out |= {
            "cases_due": due, "cases_removed": report.cases, "rows": report.rows,
            "held_back": report.held_back, "busy": report.busy, "batches": report.batches,
            "partitions_dropped": report.partitions_dropped,
            "partitions_swept": report.partitions_kept,
            "seconds": round(done["seconds"], 1),
            "cases_per_s": round(report.cases / done["seconds"], 1) if done["seconds"] else None,
            "archive_mib": round(sum(f.stat().st_size for f in files) / 2**20, 1),
            "archive_files": len(files),
            # How much of the latency window had retention running.
            "overlap_share": round(min(1.0, (min(done["ended"], latency_end) - started)
                                       / max(1e-9, latency_end - started)), 2),
        }
        log(f"retention: {report.cases:,} cases in {done['seconds']:.0f} s "
            f"({out['cases_per_s']} /s), archive {out['archive_mib']} MiB; intake p99 "
            f"meanwhile {out['latency_during'].get('p99_ms')} ms")
    finally:
        sql_engine.dispose()
        db.sql_engine.dispose()
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return out


def measure_undisturbed(box: tb.Sandbox, label: str, args: argparse.Namespace,
                        plan: tb.Plan, history: bool, attempts: int = 8) -> dict[str, Any]:
    """`measure`, again from the start if PostgreSQL restarted meanwhile (its start time
    changed) or a phase failed on a lost connection: figures from a disturbed run would
    measure the restart, not the history."""
    for attempt in range(1, attempts + 1):
        broker_up(box)
        started = postgres_started(box)
        try:
            result = measure(box, label, args, plan, history)
        except Exception as exc:
            log(f"{label}: attempt {attempt} failed ({type(exc).__name__}: {exc}"[:300] + ")")
            for svc in list(tb.RUNNING):
                svc.stop()
            time.sleep(10)  # let a restart that is under way finish before waiting for it
            continue
        if postgres_started(box) == started:
            result["attempt"] = attempt
            return result
        log(f"{label}: PostgreSQL restarted during attempt {attempt} (other work on the "
            "machine): measuring again")
    raise RuntimeError(f"{label}: no undisturbed measurement in {attempts} attempts")


# ---- report -----------------------------------------------------------------------------------


FIGURES = (  # name, path in a side's result, higher is better
    ("intake events/s (sustained)", ("throughput", "rate_sustained"), True),
    ("intake p50 ms", ("latency", "p50_ms"), False),
    ("intake p99 ms", ("latency", "p99_ms"), False),
    ("firing lateness p50 s", ("lateness", "lateness", "p50", "s"), False),
    ("firing lateness p99 s", ("lateness", "lateness", "p99", "s"), False),
    ("catch-up decisions/s", ("catchup", "rate_per_s"), True),
    ("case show p50 ms (this run's cases)", ("case_show", "cases of this run", "p50_ms"), False),
    ("case show p99 ms (this run's cases)", ("case_show", "cases of this run", "p99_ms"), False),
    ("case show command, median wall ms", ("case_show", "command_wall_ms_median"), False),
)
KEYS = {"intake events/s (sustained)": "intake_per_s", "intake p99 ms": "intake_p99_ms",
        "firing lateness p99 s": "lateness_p99_s", "catch-up decisions/s": "catchup_per_s",
        "case show p99 ms (this run's cases)": "case_show_p99_ms"}


def dig(d: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def figure(rounds: list[dict[str, Any]], path: tuple[str, ...]) -> float | None:
    """The median over the rounds (the machine's load varies from one to the next)."""
    values = [v for v in (dig(r, path) for r in rounds) if isinstance(v, (int, float))]
    return statistics.median(values) if values else None


def compare(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, path, higher_better in FIGURES:
        empty = figure(result.get("empty", []), path)
        hist = figure(result.get("history", []), path)
        within = None
        if isinstance(empty, (int, float)) and isinstance(hist, (int, float)) and empty:
            # "Within 10 %": no more than 10 % worse (slower, later) than on the empty one.
            within = hist >= 0.9 * empty if higher_better else hist <= 1.1 * empty
        rows.append({"figure": name, "empty": empty, "history": hist,
                     "history_over_empty": round(hist / empty, 2)
                     if isinstance(empty, (int, float)) and isinstance(hist, (int, float))
                     and empty else None,
                     "within_10pct": within})
    for group in ("finished a year back", "open from the history"):
        value = figure(result.get("history", []), ("case_show", group, "p99_ms"))
        rows.append({"figure": f"case show p99 ms ({group})", "empty": None, "history": value,
                     "history_over_empty": None, "within_10pct": None})
    return rows


def show(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v >= 100:
            return f"{v:,.0f}"
        return f"{v:.1f}" if v >= 10 else f"{v:.3f}".rstrip("0").rstrip(".")
    return str(v)


def result_line(result: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    parts = [f"RESULT history scale={result['scale']:g} rounds={result['rounds']}",
             f"finished={result['sizes']['finished']}", f"open={result['sizes']['open']}"]
    for row in rows:
        key = KEYS.get(row["figure"])
        if key:
            parts.append(f"{key}={show(row['empty'])}/{show(row['history'])}")
    judged = [r["within_10pct"] for r in rows if r["within_10pct"] is not None]
    parts.append(f"within_10pct={sum(judged)}/{len(judged)}")
    ret = result.get("retention")
    if ret:
        parts.append(f"retention_cases_per_s={show(ret['cases_per_s'])}")
        parts.append(f"intake_p99_ms_during_retention={show(ret['latency_during']['p99_ms'])}")
    return " ".join(parts).replace(",", "")


def save(path: str, result: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(result, indent=2, default=str, ensure_ascii=False))


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=1.0,
                    help="fraction of the full history (10,000,000 finished and 1,000,000 "
                         "open cases); e.g. 0.05")
    ap.add_argument("--quick", action="store_true", help="shorter measuring phases")
    ap.add_argument("--latency-rate", type=float, default=500.0)
    ap.add_argument("--retention-days", type=int, default=335,
                    help="at the end, run retention with this many days on the history "
                         "database (335: its oldest month) while intake takes traffic; "
                         "0 = skip")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure each database this many times, in the order empty, "
                         "history, history, empty, ...; figures are medians (default 1)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    if not 0 < args.scale <= 1:
        ap.error("--scale must be in (0, 1]")
    signal.signal(signal.SIGTERM, _interrupted)
    args.finished = max(1, int(FULL_FINISHED * args.scale))
    args.open = max(1, int(FULL_OPEN * args.scale))
    args.latency_seconds = 10.0 if args.quick else 30.0
    args.events = 5000 if args.quick else 20000
    plan = tb.Plan(small=1_000, stream_seconds=15 if args.quick else 30, drain_seconds=15,
                   catchup=3000 if args.quick else 10000, catchup_timeout=300)
    result: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(), "scale": args.scale,
        "rounds": args.rounds,
        "sizes": {"finished": args.finished, "open": args.open,
                  "latency_seconds": args.latency_seconds, "throughput_events": args.events,
                  "lateness_stream": f"{plan.stream_rate:.0f}/s for {plan.stream_seconds:.0f} s",
                  "catchup": plan.catchup},
        "machine": tb.machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    boxes = {"empty": tb.Sandbox(f"{pid}_empty"), "history": tb.Sandbox(f"{pid}_history")}
    try:
        for box in boxes.values():
            box.create()
        log(f"loading {args.finished:,} finished and {args.open:,} open cases")
        result["history_load"] = load_history(boxes["history"], args.finished, args.open)
        order = [("empty", "history") if r % 2 == 0 else ("history", "empty")
                 for r in range(args.rounds)]
        for r, labels in enumerate(order):
            for label in labels:
                log(f"round {r + 1}/{args.rounds}: measuring on the {label} database")
                result.setdefault(label, []).append(measure_undisturbed(
                    boxes[label], label, args, plan, history=label == "history"))
                save(args.out, result)  # what is measured so far survives a later failure
        if args.retention_days:
            for attempt in range(1, 4):
                broker_up(boxes["history"])
                started = postgres_started(boxes["history"])
                try:
                    result["retention"] = retention_under_traffic(boxes["history"], args)
                except Exception as exc:  # a restart by other work: the rest still counts
                    log(f"retention: attempt {attempt} failed ({type(exc).__name__})")
                    result["retention_failures"] = attempt
                    for svc in list(tb.RUNNING):
                        svc.stop()
                    time.sleep(10)
                    continue
                result["retention"]["attempt"] = attempt
                result["retention"]["postgres_restarted"] = (
                    postgres_started(boxes["history"]) != started)
                break
    finally:
        for svc in list(tb.RUNNING):
            svc.stop()
        for box in boxes.values():
            box.drop()
    rows = compare(result)
    result["comparison"] = rows
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    print(f"\n{'figure':<44} | {'empty':>10} | {'history':>10} | ratio | within 10%")
    print("-" * 92)
    for row in rows:
        print(f"{row['figure']:<44} | {show(row['empty']):>10} | {show(row['history']):>10} "
              f"| {show(row['history_over_empty']):>5} | "
              f"{'' if row['within_10pct'] is None else ('yes' if row['within_10pct'] else 'NO')}")
    ret = result.get("retention")
    if ret:
        during = ret["latency_during"]
        print(f"\nretention ({ret['retention_days']} days, batch {ret['batch']}) on the "
              f"history while intake takes {during['offered_rate']:.0f} events/s: "
              f"{ret['cases_removed']:,} of {ret['cases_due']:,} cases archived and removed "
              f"in {ret['seconds']} s ({ret['cases_per_s']} cases/s), archive "
              f"{ret['archive_mib']} MiB; intake p50/p99 meanwhile {during['p50_ms']}/"
              f"{during['p99_ms']} ms (retention ran through {ret['overlap_share']:.0%} "
              "of that window)")
    load = result["history_load"]
    print(f"\nhistory: {load['rows']} rows, database {load['database_size']}, loaded in "
          f"{load['load_seconds']} s; load average at end {os.getloadavg()}")
    print(f"bytes per case (with indexes): {load['bytes_per_case']}")
    result["result_line"] = result_line(result, rows)
    save(args.out, result)
    log(f"wrote {args.out}")
    print(result["result_line"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
