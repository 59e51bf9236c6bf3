#!/usr/bin/env python
"""What monthly partitions cost and save, statement by statement (docs/benchmarks.md
"Partitioned"): the same statements on a database at revision 0019 (plain tables, the
baseline) and at head (partitioned by month, 13 months of partitions laid out), in the
same run, with the same rows:

    .venv/bin/python bench/partition_bench.py [--events 300000] [--batch 200]

  insert     intake's event insert (shared statement, `ON CONFLICT DO NOTHING`, a batch of
             `--batch` rows as one JSON parameter), events/s: the key-claiming trigger's cost
  seen       intake's duplicate check (`--batch` ids, half known), checks/s: on
             `case_events` (one primary-key probe per partition when partitioned), and
             on the partitioned database also on `event_ids` (one probe)
  remove     a month of events removed: row by row (`DELETE ... RETURNING row_to_json`,
             as retention does per case, in batches of 5,000) on the plain table, against
             archive + release keys + DROP of the month's partition: rows/s
Prints a table and a last line `RESULT partitions ...`; writes bench-results/partitions.json.
BENCH_PG_ADMIN chooses the PostgreSQL (default the local one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, Table, create_engine, text  # noqa: E402

from shared.db.bulk import BulkStatement, bulk_insert  # noqa: E402
from shared.db.case_log import INSERT_EVENTS  # noqa: E402
from shared.db.migrate import upgrade  # noqa: E402
from shared.db.models import CaseEventRow  # noqa: E402
from shared.db.partitions import month_start, partition_history_by_month  # noqa: E402

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
OUT = ROOT / "bench-results" / "partitions.json"
# Intake's event insert before partitioning (revision 0019: a unique index on event_id).
PLAIN_INSERT_EVENTS = bulk_insert(cast(Table, CaseEventRow.__table__), [
    "event_id", "case_id", "type", "occurred_at", "outcome", "problem", "case_version", "body",
    "body_sha256"], "ON CONFLICT (event_id) DO NOTHING")
SEEN_IN_EVENTS = text("SELECT event_id, body_sha256 FROM case_events "
                      "WHERE event_id = ANY(CAST(:ids AS text[]))")
SEEN_IN_KEYS = text("SELECT event_id, body_sha256 FROM event_ids "
                    "WHERE event_id = ANY(CAST(:ids AS text[]))")


def sa_url(database: str) -> str:
    return (PG_ADMIN.rsplit("/", 1)[0] + f"/{database}").replace(
        "postgresql://", "postgresql+psycopg://", 1)


def rows(start: int, count: int) -> list[dict[str, Any]]:
    return [{"event_id": f"ev-{i}", "case_id": f"C-{i // 5}", "type": "buyer.modified",
             "occurred_at": "2026-01-01T00:00:00+00:00", "outcome": "applied",
             "problem": None, "case_version": 1, "body": {"n": i}, "body_sha256": None}
            for i in range(start, start + count)]


def load_history(engine: Engine, events: int) -> None:
    """`events` rows spread evenly over the last 390 days, by SQL."""
    with engine.begin() as conn:
        conn.execute(text("""
            INSERT INTO case_events (event_id, case_id, type, occurred_at, received_at,
                                     outcome, body)
            SELECT 'h-' || g, 'HC-' || (g / 5), 'buyer.modified', now(),
                   now() - make_interval(secs => 3600 + (g::bigint * 7919) % 33696000),
                   'applied', jsonb_build_object('n', g)
            FROM generate_series(1, :n) g"""), {"n": events})
        if conn.execute(text("SELECT to_regclass('event_ids')")).scalar() is not None:
            conn.execute(text("INSERT INTO event_ids (event_id, body_sha256) "  # as intake
                              "SELECT event_id, body_sha256 FROM case_events"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE case_events"))


def measure_insert(engine: Engine, batch: int, batches: int,
                   statement: BulkStatement = INSERT_EVENTS, first: int = 0) -> float:
    t0 = time.perf_counter()
    for b in range(first, first + batches):
        with engine.begin() as conn:
            statement.execute(conn, rows(b * batch, batch))
    return batch * batches / (time.perf_counter() - t0)


def measure_seen(engine: Engine, batch: int, checks: int, known: int,
                 statement: Any = SEEN_IN_EVENTS) -> float:
    with engine.connect() as conn:
        t0 = time.perf_counter()
        for c in range(checks):
            ids = [f"h-{(c * 7919 + i * 104729) % known + 1}" for i in range(batch // 2)]
            ids += [f"none-{c}-{i}" for i in range(batch // 2)]
            conn.execute(statement, {"ids": sorted(ids)}).all()
        elapsed = time.perf_counter() - t0
        conn.rollback()
    return checks / elapsed


def oldest_month(engine: Engine) -> tuple[str, Any, Any]:
    with engine.connect() as conn:
        now = conn.execute(text("SELECT now()")).scalar_one()
    start = month_start(now - timedelta(days=370))
    end = month_start(start + timedelta(days=40))
    return f"case_events_p{start:%Y%m}", start, end


def measure_remove_rows(engine: Engine, start: Any, end: Any) -> tuple[int, float]:
    removed, t0 = 0, time.perf_counter()
    while True:
        with engine.begin() as conn:
            n = len(conn.execute(text("""
                DELETE FROM case_events AS r WHERE event_id IN (
                    SELECT event_id FROM case_events WHERE received_at >= :s
                       AND received_at < :e LIMIT 5000)
                RETURNING row_to_json(r)::text"""), {"s": start, "e": end}).all())
        if not n:
            return removed, time.perf_counter() - t0
        removed += n


def measure_drop(engine: Engine, partition: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    with engine.begin() as conn:
        archived = len(conn.execute(text(
            f"SELECT row_to_json(r)::text FROM {partition} AS r")).all())
        conn.execute(text(f"DELETE FROM event_ids AS k USING {partition} AS r "
                          f"WHERE k.event_id = r.event_id"))
        conn.execute(text(f"DROP TABLE {partition}"))
    return archived, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=300_000, help="history rows")
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--batches", type=int, default=300, help="insert batches")
    ap.add_argument("--checks", type=int, default=2000, help="duplicate checks")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    admin = create_engine(PG_ADMIN.replace("postgresql://", "postgresql+psycopg://", 1),
                          isolation_level="AUTOCOMMIT")
    tag = uuid.uuid4().hex[:6]
    names = {"plain": f"aftersales_partbench_{tag}_plain",
             "partitioned": f"aftersales_partbench_{tag}_part"}
    result: dict[str, Any] = {"args": vars(args)}
    try:
        engines = {}
        for label, name in names.items():
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            upgrade(sa_url(name), "0020" if label == "plain" else "head")
            engines[label] = create_engine(sa_url(name))
        with engines["partitioned"].begin() as conn:
            now = conn.execute(text("SELECT now()")).scalar_one()
            partition_history_by_month(conn, month_start(now - timedelta(days=400)))
            result["partitions"] = int(conn.execute(text(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = "
                "'case_events'::regclass")).scalar_one())
        for label, engine in engines.items():
            print(f"[{label}] loading {args.events:,} events over 13 months", file=sys.stderr)
            load_history(engine, args.events)
        figures: dict[str, dict[str, Any]] = {}
        for label, engine in engines.items():
            f = figures.setdefault(label, {})
            f["seen_per_s"] = measure_seen(engine, args.batch, args.checks, args.events)
        # Inserts in alternating rounds (this machine's speed drifts), each round on new ids.
        inserts: dict[str, list[float]] = {"plain": [], "partitioned": []}
        for r in range(3):
            for label in (("plain", "partitioned") if r % 2 == 0 else
                          ("partitioned", "plain")):
                inserts[label].append(measure_insert(
                    engines[label], args.batch, args.batches // 3, PLAIN_INSERT_EVENTS
                    if label == "plain" else INSERT_EVENTS, first=r * args.batches))
        for label, rates in inserts.items():
            figures[label]["insert_per_s"] = statistics.median(rates)
            figures[label]["insert_rounds"] = [round(x) for x in rates]
        figures["plain"]["seen_keys_per_s"] = figures["plain"]["seen_per_s"]
        figures["partitioned"]["seen_keys_per_s"] = measure_seen(
            engines["partitioned"], args.batch, args.checks, args.events, SEEN_IN_KEYS)
        partition, start, end = oldest_month(engines["partitioned"])
        n, s = measure_remove_rows(engines["plain"], start, end)
        figures["plain"] |= {"month_rows": n, "remove_s": s, "remove_rows_per_s": n / s}
        n, s = measure_drop(engines["partitioned"], partition)
        figures["partitioned"] |= {"month_rows": n, "remove_s": s,
                                   "remove_rows_per_s": n / s}
        result["figures"] = figures
    finally:
        for engine in locals().get("engines", {}).values():
            engine.dispose()
        with admin.connect() as conn:
            for name in names.values():
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    p, q = figures["plain"], figures["partitioned"]
    print(f"{'figure':40} | {'plain':>10} | {'partitioned':>11} | ratio")
    for key, title in (("insert_per_s", "event insert, events/s"),
                       ("seen_per_s", f"duplicate check ({args.batch} ids), checks/s"),
                       ("seen_keys_per_s", "  the same on event_ids, checks/s"),
                       ("remove_rows_per_s", "a month removed, rows/s"),
                       ("remove_s", "a month removed, s")):
        print(f"{title:40} | {p[key]:>10,.1f} | {q[key]:>11,.1f} | {q[key] / p[key]:.2f}")
    load = os.getloadavg()
    result["load_average"] = load
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"RESULT partitions events={args.events} partitions={result['partitions']} "
          f"insert_per_s={p['insert_per_s']:.0f}/{q['insert_per_s']:.0f} "
          f"seen_per_s={p['seen_per_s']:.0f}/{q['seen_per_s']:.0f} "
          f"seen_keys_per_s={p['seen_per_s']:.0f}/{q['seen_keys_per_s']:.0f} "
          f"month_rows={p['month_rows']}/{q['month_rows']} "
          f"month_remove_s={p['remove_s']:.2f}/{q['remove_s']:.2f} "
          f"load={load[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
