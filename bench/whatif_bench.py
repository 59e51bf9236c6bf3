#!/usr/bin/env python
"""What-if benchmark: `aftersales rules what-if` on 100,000 open cases.

    .venv/bin/python bench/whatif_bench.py              # 100,000 open cases
    .venv/bin/python bench/whatif_bench.py --cases 10000

Not part of the test suite. Runs against a database of its own (`aftersales_bench_whatif_
<pid>`), created at start and dropped at the end.

The cases are loaded with SQL: a handful of template cases are made by the real engine
(kinds and platforms of the simulator, steps with fixed and working-day deadlines, some
on an estimated calendar), then copied with `generate_series` into N open cases with
their pending deadlines, opening times spread over the last 10 days.

Phases, each timed in the same run:
  baseline  read the same snapshot (REPEATABLE READ, the what-if's query) and decode every
            case, no engine work: what any what-if must pay at least;
  rules     the what-if of a rule file (a second version of the default set);
  holidays  the what-if of a holiday file for 2027 (estimated deadlines move).
Prints a table and writes bench-results/whatif.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from shared.domain.timeutil import CHINA_TZ

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402
from sqlalchemy.exc import OperationalError  # noqa: E402

from aftersales_cli.whatif import proposed_engine, what_if  # noqa: E402
from shared.db.cases import case_row as _case_row  # noqa: E402
from shared.db.deadlines import deadline_row as _deadline_row  # noqa: E402
from shared.db.migrate import upgrade  # noqa: E402
from shared.db.queries.whatif import OPEN_WITH_DEADLINE  # noqa: E402
from shared.db.session import Database, make_engine  # noqa: E402
from shared.domain import Case, Engine, Event, RuleBook, WorkCalendar  # noqa: E402

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
RULES = """[ruleset]
name = "default"
version = "2"
effective = 2000-01-02

[[rule]]
id = "any.buyer_return_shipping"
kind = "any"
step = "buyer_return_shipping"
party = "buyer"
duration = "3d"
on_timeout = "auto_close"
"""
HOLIDAYS = "[2027]\nholidays = [2027-01-01]\nworkdays = [2027-01-02]\n"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def templates(engine: Engine, now: datetime) -> list[tuple[Case, list[dict[str, Any]]]]:
    """Open cases in a few steps, made by the engine: (case, its deadline rows)."""
    out = []
    n = 0

    def event(case_id: str, type_: str, at: datetime, platform: str, **data: Any) -> Event:
        nonlocal n
        n += 1
        return Event(f"t{n}", type_, at, platform, "S1", "O1", case_id, None, data)

    for platform in ("kuaishou", "douyin", "taobao"):
        for kind, then in (("refund_only", None), ("exchange", "merchant.approved"),
                           ("return_refund", "merchant.approved"), ("repair", None)):
            for estimated in (False, True):
                at = datetime(2026, 12, 23, 10, tzinfo=CHINA_TZ) if estimated else now - \
                    timedelta(hours=30)
                if estimated and kind != "refund_only":
                    continue
                cid = f"T-{platform}-{kind}-{estimated}"
                o = engine.apply(None, event(cid, "case.opened", at, platform, kind=kind,
                                             amount_fen=100), at)
                if estimated or then:
                    o = engine.apply(o.case, event(cid, then or "merchant.approved",
                                                   at + timedelta(hours=1), platform),
                                     at + timedelta(hours=1))
                assert o.case is not None and o.deadlines is not None
                out.append((o.case, [_deadline_row(d) for d in o.deadlines]))
    return out


def load(conn: psycopg.Connection, engine: Engine, count: int, now: datetime) -> None:
    """N open cases copied from the templates with SQL, shifted back by up to 10 days."""
    conn.execute("CREATE TEMP TABLE tpl (k int, snapshot jsonb, row jsonb, deadlines jsonb)")
    for k, (case, deadlines) in enumerate(templates(engine, now)):
        row = _case_row(case, now)
        row = {key: (v.isoformat() if isinstance(v, datetime) else v) for key, v in row.items()
               if key != "snapshot"}
        conn.execute("INSERT INTO tpl VALUES (%s, %s, %s, %s)", (
            k, json.dumps(case.to_dict()), json.dumps(row),
            json.dumps([{key: (v.isoformat() if isinstance(v, datetime) else v)
                         for key, v in d.items()} for d in deadlines])))
    (templates_count,) = conn.execute("SELECT count(*) FROM tpl").fetchone() or (0,)
    # shift: i-th case moved back by (i mod 10 days) seconds, estimated ones left as they are
    conn.execute("""
        INSERT INTO cases (case_id, platform, shop_id, order_id, kind, status, step, version,
                           rule_set, rule_version, step_due_at, opened_at, closed_at,
                           updated_at, snapshot)
        SELECT 'B-' || i, t.row->>'platform', 'S' || (i %% 200), 'O-' || i, t.row->>'kind',
               'open', t.row->>'step', (t.row->>'version')::int, t.row->>'rule_set',
               t.row->>'rule_version',
               (t.row->>'step_due_at')::timestamptz - s.shift,
               (t.row->>'opened_at')::timestamptz - s.shift, NULL, now(),
               jsonb_set(jsonb_set(jsonb_set(jsonb_set(t.snapshot,
                   '{case_id}', to_jsonb('B-' || i)),
                   '{opened_at}', to_jsonb((t.row->>'opened_at')::timestamptz - s.shift)),
                   '{step_started_at}', to_jsonb(((t.snapshot->>'step_started_at')::timestamptz
                                                   - s.shift))),
                   '{step_due_at}', to_jsonb((t.row->>'step_due_at')::timestamptz - s.shift))
        FROM generate_series(0, %(n)s - 1) AS i
        JOIN tpl t ON t.k = i %% %(k)s
        CROSS JOIN LATERAL (SELECT CASE WHEN t.row->>'step' = 'refund_pending'
                                        AND (t.row->>'opened_at')::timestamptz > now()
                                   THEN interval '0' ELSE make_interval(secs => i %% 864000)
                                   END AS shift) s
    """, {"n": count, "k": templates_count})
    conn.execute("""
        INSERT INTO deadlines (case_id, step, purpose, action, party, due_at, deadline_at,
                               fence, rule_set, rule_version, rule_id, status, calendar_source)
        SELECT c.case_id, d->>'step', d->>'purpose', d->>'action', d->>'party',
               (d->>'due_at')::timestamptz - (t.row->>'opened_at')::timestamptz + c.opened_at,
               (d->>'deadline_at')::timestamptz - (t.row->>'opened_at')::timestamptz
                   + c.opened_at,
               (d->>'fence')::int, d->>'rule_set', d->>'rule_version', d->>'rule_id',
               'pending', d->>'calendar_source'
        FROM cases c JOIN tpl t ON t.k = substr(c.case_id, 3)::int %% %(k)s
        CROSS JOIN LATERAL jsonb_array_elements(t.deadlines) d
    """, {"k": templates_count})
    conn.execute("ANALYZE cases")
    conn.execute("ANALYZE deadlines")


def timed(fn: Any, tries: int = 3) -> tuple[Any, float, float]:
    """Result, seconds, and the process's peak RSS so far in MB (rows are streamed, so it
    should not grow with the number of cases). A phase cut by a PostgreSQL restart (other
    work on a shared machine restarts it) is run again."""
    for attempt in range(1, tries + 1):
        started = time.perf_counter()
        try:
            result = fn()
        except OperationalError as exc:
            if attempt == tries:
                raise
            log(f"phase cut by the database ({exc.orig!r}); waiting and running it again")
            _wait_for_database()
            continue
        took = time.perf_counter() - started
        return result, took, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    raise AssertionError("unreachable")


def _wait_for_database(timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(PG_ADMIN, connect_timeout=5).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def baseline(db: Database) -> int:
    n = 0
    with db.transaction() as s:
        s.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
        for row in s.execute(OPEN_WITH_DEADLINE.execution_options(yield_per=2000)):
            Case.from_dict(row.snapshot)
            n += 1
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=100_000)
    args = parser.parse_args()
    name = f"aftersales_bench_whatif_{os.getpid()}"
    admin = psycopg.connect(PG_ADMIN, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    sa_url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    results: dict[str, Any] = {"cases": args.cases, "cpus": os.cpu_count(),
                               "load_average": os.getloadavg()}
    try:
        upgrade(sa_url)
        current = Engine(RuleBook.load(None), WorkCalendar(None))
        now = datetime.now(UTC)
        with psycopg.connect(url, autocommit=True) as conn:
            started = time.perf_counter()
            load(conn, current, args.cases, now)
            results["load_seconds"] = round(time.perf_counter() - started, 1)
        log(f"loaded {args.cases} open cases in {results['load_seconds']} s")
        db = Database(make_engine(sa_url, pool_size=1))
        with tempfile.TemporaryDirectory() as tmp:
            rules, holidays = Path(tmp) / "rules.toml", Path(tmp) / "holidays.toml"
            rules.write_text(RULES)
            holidays.write_text(HOLIDAYS)
            read, took, peak = timed(lambda: baseline(db))
            results["baseline"] = {"cases": read, "seconds": round(took, 2),
                                   "max_rss_mb": round(peak, 1)}
            log(f"baseline (read + decode): {read} cases in {took:.2f} s")
            for label, path in (("rules", rules), ("holidays", holidays)):
                proposed, _kind = proposed_engine(None, None, path)
                report, took, peak = timed(lambda p=proposed: what_if(db, current, p))
                doc = report.to_dict()
                results[label] = {
                    "seconds": round(took, 2), "max_rss_mb": round(peak, 1),
                    "cases_per_second": round(report.compared / took),
                    "vs_baseline": round(took / results["baseline"]["seconds"], 1),
                    "moved": doc["deadlines_moved"], "decisions": doc["automatic_decisions"],
                }
                log(f"{label}: {report.compared} cases in {took:.2f} s")
        db.sql_engine.dispose()
    finally:
        admin.close()
        # a fresh connection: a PostgreSQL restart during the run ends the first one
        _wait_for_database()
        with psycopg.connect(PG_ADMIN, autocommit=True) as cleanup:
            cleanup.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "whatif.json").write_text(json.dumps(results, indent=2))
    print(f"{'phase':<10} {'seconds':>8} {'cases/s':>8} {'x baseline':>10} {'max RSS MB':>8}")
    b = results["baseline"]
    print(f"{'baseline':<10} {b['seconds']:>8} {round(b['cases'] / b['seconds']):>8} "
          f"{1.0:>10} {b['max_rss_mb']:>8}")
    for label in ("rules", "holidays"):
        r = results[label]
        print(f"{label:<10} {r['seconds']:>8} {r['cases_per_second']:>8} "
              f"{r['vs_baseline']:>10} {r['max_rss_mb']:>8}")
    print(json.dumps({k: results[k]["moved"] for k in ("rules", "holidays")}))
    print(json.dumps({k: results[k]["decisions"] for k in ("rules", "holidays")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
