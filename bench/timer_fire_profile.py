#!/usr/bin/env python
"""Cost of one `Resolver.fire` (the catch-up bottleneck of bench/timer_bench.py).

    .venv/bin/python bench/timer_fire_profile.py [--root DIR] [--profile]

Creates its own database (`aftersales_bench_<pid>_fire`), loads `--fires` + 200 open cases
with an overdue deadline the way timer_bench's catch-up does, fires `--fires` (default
1,000) of them one after the other in one thread, prints fires/s, CPU ms per fire and the
resulting row counts, and drops the database. `--root DIR` imports `shared`/`services`
from another checkout (e.g. one with bench/proposed-persist-core-statements.diff applied)
to compare; `--profile` prints the cProfile top 40 by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
ap.add_argument("--profile", action="store_true")
ap.add_argument("--batch", type=int, default=50, help="deadlines per fire_many (default 50)")
ap.add_argument("--fires", type=int, default=1000, help="deadlines fired and timed (default 1000)")
args = ap.parse_args()
sys.path.insert(0, args.root)
sys.path.insert(1, str(Path(__file__).resolve().parent))

import psycopg  # noqa: E402
import timer_bench as tb  # noqa: E402

from services.resolver.resolve import Resolver  # noqa: E402
from shared.bootstrap import build_database, build_domain, build_policy  # noqa: E402
from shared.config import Settings  # noqa: E402

box = tb.Sandbox()
box.db_name += "_fire"
box.pg_url += "_fire"
box.sa_url += "_fire"
with psycopg.connect(tb.PG_ADMIN, autocommit=True) as c:
    c.execute(f'CREATE DATABASE "{box.db_name}"')
box.created_db = True
try:
    tb.upgrade(box.sa_url)
    with box.connect() as conn:
        tb.load_overdue_cases(conn, args.fires + 200)
    settings = Settings(database_url=box.sa_url)
    resolver = Resolver(build_database(settings, 2), build_domain(settings),
                        build_policy(settings), {"emails": [], "phones": []})
    for i in range(1, 101):  # warm-up: caches, prepared statements
        assert resolver.fire(i).outcome == "fired"
    cpu = tb.cpu_check()
    prof = cProfile.Profile() if args.profile else None
    t, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    # As the timer hands them over: `--batch` deadlines per resolver transaction.
    last = 100 + args.fires
    for start in range(101, last + 1, args.batch):
        batch = resolver.fire_many(list(range(start, min(start + args.batch, last + 1))))
        assert {r.outcome for r in batch.resolutions} == {"fired"}
    if prof:
        prof.disable()
    wall, cpu_s = time.perf_counter() - t, time.process_time() - c0
    with box.connect() as conn:
        counts = {q: conn.execute(f"SELECT count(*) FROM {q}").fetchone()[0]
                  for q in ("decisions", "notifications", "outbox", "deadlines")}
    print(json.dumps({"root": args.root, "fires_per_s": round(args.fires / wall, 1),
                      "cpu_ms_per_fire": round(1000 * cpu_s / args.fires, 3), "machine": cpu,
                      "rows": counts}))
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
finally:
    box.drop()
