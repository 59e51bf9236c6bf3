#!/usr/bin/env python3
"""Deadline rows intake writes for a fixed stream of simulator events (issue 19, 'less
churn'): rows inserted, updated (moved to the case's new version, or marked cancelled
before session 17) and deleted (cancelled since), the rows and bytes the table holds at
the end (rewritten by VACUUM FULL), and intake's CPU, for 20,000 events (seed 1) applied
in batches of 200 by one `IntakeProcessor`, on a database of its own. Run it from two
checkouts to compare (`cd OTHER && python /path/to/bench/deadline_churn.py`): it imports
the code of the checkout it is started from (the current directory).

    .venv/bin/python bench/deadline_churn.py [--events N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.getcwd())

from sqlalchemy import create_engine, text

from aftersales_cli.simulate.generator import SimConfig, generate
from services.intake.processor import IntakeProcessor
from shared.db.migrate import upgrade
from shared.db.session import Database, make_engine
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.notifications.policy import NotificationPolicy

PG_ADMIN = os.environ.get("AFTERSALES_BENCH_PG_ADMIN",
                          "postgresql+psycopg://postgres@127.0.0.1/postgres")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args()
    name = f"aftersales_bench_churn_{os.getpid()}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        db = Database(make_engine(url))
        intake = IntakeProcessor(db, Engine(RuleBook.load(None), WorkCalendar(None)),
                                 NotificationPolicy.load(None), {"emails": [], "phones": []},
                                 64 * 1024)
        bodies = [m.body for m in generate(SimConfig(duplicate_share=0, malformed_share=0),
                                           args.events, seed=1, rate=1000.0)]
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(bodies), 200):
            intake.process(bodies[start:start + 200])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        with db.sql_engine.connect() as c:
            applied = c.execute(text(
                "SELECT count(*) FROM case_events WHERE outcome = 'applied'")).scalar_one()
            c.execute(text("SELECT pg_stat_force_next_flush()"))
        with db.sql_engine.connect() as c:
            inserted, updated, hot, deleted = c.execute(text(
                "SELECT n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del FROM pg_stat_user_tables "
                "WHERE relname = 'deadlines'")).one()
        with db.sql_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            # Rewritten compact: the bytes its rows and indexes need (plain VACUUM frees
            # dead rows' space for reuse, but the files keep their size).
            c.execute(text("VACUUM FULL deadlines"))
            rows, size = c.execute(text(
                "SELECT count(*), pg_total_relation_size('deadlines') FROM deadlines")).one()
        db.sql_engine.dispose()
        print(f"RESULT deadline_churn events={len(bodies)} applied={applied} "
              f"rows_inserted={inserted} rows_updated={updated} hot_updates={hot} "
              f"rows_deleted={deleted} rows_kept={rows} table_kib={size // 1024} "
              f"intake_wall_s={wall:.1f} intake_cpu_s={cpu:.1f}")
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    return 0


if __name__ == "__main__":
    sys.exit(main())
