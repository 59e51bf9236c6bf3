#!/usr/bin/env python
"""CPU cost of intake per event (the end-to-end bottleneck of bench/e2e_bench.py).

    .venv/bin/python bench/intake_profile.py [--events N] [--batch N] [--profile]
                                             [--sort cumulative|tottime]

Creates its own database (dropped at the end), generates simulator traffic (well-formed
events only), runs `IntakeProcessor.process` over it in batches in one thread, and prints
events/s and CPU ms per event; `--profile` prints the cProfile top 35 by cumulative time
(`--sort tottime`: by the time spent in each function itself).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.resources

from aftersales_cli.simulate.generator import SimConfig, generate  # noqa: E402
from services.intake.processor import IntakeProcessor  # noqa: E402
from shared.bootstrap import build_database, build_domain, build_policy  # noqa: E402
from shared.config import Settings  # noqa: E402
from tests.resources import own_database  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--events", type=int, default=6000)
ap.add_argument("--batch", type=int, default=200)
ap.add_argument("--profile", action="store_true")
ap.add_argument("--sort", choices=("cumulative", "tottime"), default="cumulative")
args = ap.parse_args()

admin_url = os.environ.get("AFTERSALES_BENCH_PG_ADMIN",
                           "postgresql+psycopg://postgres@127.0.0.1/postgres")
name = f"aftersales_bench_intake_{os.getpid()}"
with own_database(admin_url, name) as url:
    settings = Settings(database_url=url)
    processor = IntakeProcessor(build_database(settings), build_domain(settings),
                                build_policy(settings), {"emails": [], "phones": []}, 64 * 1024)
    config = SimConfig(rate=1000, duration=None, count=args.events, duplicate_share=0,
                       malformed_share=0, run_id=uuid.uuid4().hex[:6])
    bodies = [m.body for m in generate(config, args.events, seed=1)]
    warm, rest = bodies[:1000], bodies[1000:]
    for i in range(0, len(warm), args.batch):
        processor.process(warm[i:i + args.batch])
    prof = cProfile.Profile() if args.profile else None
    wall, cpu = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    for i in range(0, len(rest), args.batch):
        processor.process(rest[i:i + args.batch])
    if prof:
        prof.disable()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(json.dumps({"events": len(rest), "batch": args.batch,
                      "events_per_s": round(len(rest) / wall, 1),
                      "cpu_ms_per_event": round(1000 * cpu / len(rest), 3),
                      "load1": os.getloadavg()[0]}))
    if prof:
        pstats.Stats(prof).sort_stats(args.sort).print_stats(35)
