"""`aftersales retention run [--dry-run] [--batch N]`: archive and remove closed cases (and
parked events) past their retention, archive and drop the monthly partitions wholly past
it, and create the coming months' partitions (`shared/db/retention.py`,
`shared/db/partitions.py`)."""

from __future__ import annotations

import argparse
import sys

from shared.config import Settings
from shared.db.retention import (
    Archive,
    RetentionPolicy,
    old_partitions,
    plan_retention,
    run_retention,
)
from shared.db.session import Database, make_engine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="only count what would be archived and removed")
    parser.add_argument("--batch", type=int, default=None, metavar="N",
                        help="cases per transaction (default AFTERSALES_RETENTION_BATCH)")
    parser.add_argument("--max-batches", type=int, default=None, metavar="N",
                        help="stop after N batches (default: until nothing is left)")


def run_command(settings: Settings, args: argparse.Namespace) -> int:
    batch = args.batch if args.batch is not None else settings.retention_batch
    if batch < 1:
        print("aftersales: --batch must be at least 1", file=sys.stderr)
        return 2
    policy = RetentionPolicy(settings.retention_days, settings.dedup_window, batch,
                             settings.partition_months_ahead)
    if not args.dry_run and settings.archive_dir is None:
        print("aftersales: bad setting: AFTERSALES_ARCHIVE_DIR: not set (retention archives "
              "every row before removing it)", file=sys.stderr)
        return 2
    sql_engine = make_engine(settings.database_url, pool_size=1)
    db = Database(sql_engine)
    try:
        if args.dry_run:
            plan = plan_retention(db, policy)
            print(f"retention {policy.retention_days} days, dedup window "
                  f"{policy.dedup_window_days} days (dry run: nothing changed)")
            print(f"  closed cases past retention: {plan.cases_due} "
                  f"({plan.cases_held_back} held back by unfinished work)")
            print(f"  parked events past retention: {plan.parked_events_due}")
            print(f"  dedup-only event ids to forget: {plan.ids_to_forget}")
            old = [p.name for parts in old_partitions(db, policy).values() for p in parts]
            print(f"  partitions wholly past retention: {len(old)}"
                  + (f" ({', '.join(old)})" if old else ""))
            return 0
        assert settings.archive_dir is not None
        report = run_retention(db, policy, Archive(settings.archive_dir),
                               max_batches=args.max_batches)
    finally:
        sql_engine.dispose()
    print(f"retention run {report.run_id}: {report.cases} cases and "
          f"{report.parked_events} parked events archived and removed in "
          f"{report.batches} batches")
    for table in sorted(report.rows):
        print(f"  {table}: {report.rows[table]} rows")
    if report.retired_events:
        print(f"  {report.retired_events} event ids kept for dedup until their window ends")
    print(f"  {report.forgotten_ids} dedup-only event ids forgotten; "
          f"{report.held_back} cases held back by unfinished work; "
          f"{report.busy} busy (next run)")
    if report.partitions_dropped:
        print(f"  partitions archived and dropped: {', '.join(report.partitions_dropped)}")
    if report.partitions_kept:
        print(f"  partitions past retention kept for cases still kept (their other rows "
              f"removed): {', '.join(report.partitions_kept)}")
    if report.partitions_deferred:
        print(f"  partitions archived but not dropped (lock not granted; next run): "
              f"{', '.join(report.partitions_deferred)}")
    if report.partitions_created:
        print(f"  partitions created ahead: {', '.join(report.partitions_created)}")
    if report.files:
        print(f"  archive: {report.files[0].parent} ({len(report.files)} files)")
    stray = {t: n for t, n in report.default_partition_rows.items() if n}
    if stray:
        print("  WARNING: rows in default partitions (no month partition for their time; "
              "run retention more often or raise AFTERSALES_PARTITION_MONTHS_AHEAD): "
              + ", ".join(f"{t} {n}" for t, n in sorted(stray.items())), file=sys.stderr)
    return 0
