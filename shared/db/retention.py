"""Retention: closed cases and everything they caused are archived, then removed, once
their time has passed (`aftersales retention run`; docs/design.md "Retention").

What goes:
- a case closed more than `retention_days` ago (by the database clock), with its events,
  deadlines, decisions and notifications, unless it still has unfinished work: an open
  deadline, a notification not yet sent or failed, or a decision still in the outbox
  (such a case is "held back" and looked at again on the next run);
- an event parked for a case that never opened, `retention_days` after it was received;
- an event id kept only for dedup (see below), once its dedup window has passed.
Open cases never go, however old.

How, so the services are not blocked: in batches of `batch` cases, one short transaction
each. Cases are claimed with `FOR UPDATE SKIP LOCKED` and the same advisory case locks
intake and the resolver take, tried without waiting (a case a service is working on is
skipped, not waited for). Each table's rows are removed with `DELETE ... RETURNING
row_to_json(row)`, so the archive holds exactly the rows removed, columns added later
included; the batch's archive files are written and fsynced before the transaction
commits. A crash before the commit removes nothing (the rows are archived again by the
next run, so a row may appear in two files, never in none); a crash after it leaves the
archive complete. Re-running is always safe.

Dedup: an event id is remembered as long as its row is in `case_events`. When the dedup
window outlasts the retention, the case's event rows are not removed with the case but
emptied (outcome `retired`, body `{}`, problem cleared, so no personal data stays) and
removed at `forget_after`.

Partitions (shared/db/partitions.py): `case_events`, `decisions` and `notifications` are
partitioned by month. A run first creates the partitions of the coming
months. A partition whose whole range is before the cutoff ("old") is not deleted from row
by row: the per-case removal leaves its rows, and once none of them belongs to a case
still kept (nor is unfinished work, nor an event id still within its dedup window), the
partition is archived as a whole (one file, same format), its keys released, and dropped:
no dead tuples, no index bloat. An old partition a kept case still has rows in (a case
open for longer than the retention) cannot go yet: the rows of removed cases in it are
then archived and deleted row by row, like those in the partition that straddles the
cutoff.

Archive format: under `archive_dir`, one folder per run (`<UTC time>-<random>`), and in it
one file per batch and table, `<batch>-<table>.jsonl.gz`: gzip'd UTF-8 JSON lines, one row
per line as PostgreSQL's `row_to_json` writes it (timestamps in ISO 8601 with offset).
"""

from __future__ import annotations

import gzip
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from shared.db.partitions import (
    BY_TABLE,
    DEFAULT_MONTHS_AHEAD,
    Partition,
    PartitionedTable,
    ensure_partitions,
    is_partitioned,
    list_partitions,
)
from shared.db.persist import try_lock_cases
from shared.db.session import Database

# The order rows are removed in; `cases` last, because retiring events reads `closed_at`.
CASE_TABLES = ("case_events", "case_event_conflicts", "case_notes", "deadlines", "decisions",
               "notifications", "cases")

# Writers never wait long on retention, and retention never waits long on them.
SHORT_LOCKS = text("SET LOCAL lock_timeout = '2s'")

_CUTOFF = "now() - make_interval(days => :days)"

# Keyset over (closed_at, case_id): held-back and skipped cases are passed once per run,
# not scanned again by every batch.
CANDIDATE_CASES = text(f"""
    SELECT case_id, closed_at FROM cases
    WHERE status <> 'open' AND closed_at < {_CUTOFF}
      AND (closed_at, case_id) > (CAST(:after_at AS timestamptz), CAST(:after_id AS text))
    ORDER BY closed_at, case_id
    LIMIT :batch
    FOR UPDATE SKIP LOCKED""")

UNFINISHED = text("""
    SELECT case_id FROM deadlines
     WHERE case_id = ANY(:ids) AND status IN ('pending', 'dispatched')
    UNION
    SELECT case_id FROM notifications
     WHERE case_id = ANY(:ids) AND status NOT IN ('sent', 'failed')
    UNION
    SELECT d.case_id FROM decisions d JOIN outbox o ON o.message_id = d.decision_id
     WHERE d.case_id = ANY(:ids)""")

def _not_in_old_partitions(table: str) -> str:
    """Rows in partitions wholly before the cutoff go with their partition, not here
    (`:since_<table>` is the start of the first partition that is not old)."""
    spec = BY_TABLE.get(table)
    if spec is None:
        return ""
    return f" AND r.{spec.column} >= CAST(:since_{table} AS timestamptz)"


REMOVE_BY_CASE = {
    table: text(f"DELETE FROM {table} AS r WHERE case_id = ANY(:ids)"
                f"{_not_in_old_partitions(table)} RETURNING row_to_json(r)::text")
    for table in CASE_TABLES if table != "case_events"
}
REMOVE_CASE_EVENTS = text(
    "DELETE FROM case_events AS r WHERE case_id = ANY(:ids) AND outcome <> 'retired'"
    f"{_not_in_old_partitions('case_events')} RETURNING row_to_json(r)::text")
# The full rows as they were (for the archive), then emptied to an id with a forget time.
RETIRE_CASE_EVENTS = text("""
    WITH old AS (
        SELECT r.event_id, row_to_json(r)::text AS row FROM case_events AS r
        WHERE r.case_id = ANY(:ids) AND r.outcome <> 'retired' FOR UPDATE),
    retired AS (
        UPDATE case_events AS e
           SET outcome = 'retired', body = '{}'::jsonb, problem = NULL,
               forget_after = c.closed_at + make_interval(days => :window)
          FROM old, cases AS c
         WHERE e.event_id = old.event_id AND c.case_id = e.case_id)
    SELECT row FROM old""")

CANDIDATE_PARKED = text(f"""
    SELECT e.event_id, e.case_id FROM case_events AS e
    WHERE e.outcome = 'parked' AND e.received_at < {_CUTOFF}
      AND NOT EXISTS (SELECT 1 FROM cases AS c WHERE c.case_id = e.case_id)
    ORDER BY e.received_at, e.event_id
    LIMIT :batch
    FOR UPDATE OF e SKIP LOCKED""")
REMOVE_EVENTS = text(
    "DELETE FROM case_events AS r WHERE event_id = ANY(:ids) RETURNING row_to_json(r)::text")
RETIRE_EVENTS = text("""
    WITH old AS (
        SELECT r.event_id, row_to_json(r)::text AS row FROM case_events AS r
        WHERE r.event_id = ANY(:ids)),
    retired AS (
        UPDATE case_events AS e
           SET outcome = 'retired', body = '{}'::jsonb, problem = NULL,
               forget_after = e.received_at + make_interval(days => :window)
          FROM old WHERE e.event_id = old.event_id)
    SELECT row FROM old""")

FORGET_EVENT_IDS = text("""
    DELETE FROM case_events WHERE event_id IN (
        SELECT event_id FROM case_events
        WHERE forget_after IS NOT NULL AND forget_after < now()
        ORDER BY forget_after LIMIT :batch FOR UPDATE SKIP LOCKED)""")

PLAN = text(f"""
    SELECT
      (SELECT count(*) FROM cases WHERE status <> 'open' AND closed_at < {_CUTOFF}),
      (SELECT count(*) FROM cases c WHERE c.status <> 'open' AND c.closed_at < {_CUTOFF}
         AND (EXISTS (SELECT 1 FROM deadlines d WHERE d.case_id = c.case_id
                        AND d.status IN ('pending', 'dispatched'))
              OR EXISTS (SELECT 1 FROM notifications n WHERE n.case_id = c.case_id
                        AND n.status NOT IN ('sent', 'failed'))
              OR EXISTS (SELECT 1 FROM decisions d JOIN outbox o
                           ON o.message_id = d.decision_id WHERE d.case_id = c.case_id))),
      (SELECT count(*) FROM case_events e WHERE e.outcome = 'parked'
         AND e.received_at < {_CUTOFF}
         AND NOT EXISTS (SELECT 1 FROM cases c WHERE c.case_id = e.case_id)),
      (SELECT count(*) FROM case_events
         WHERE forget_after IS NOT NULL AND forget_after < now())""")


# What keeps a row of an old partition from going, besides its case still being kept.
UNFINISHED_ROW = {
    "case_events": "coalesce(r.forget_after >= now(), false)",  # id still within its window
    "deadlines": "r.status IN ('pending', 'dispatched')",
    "notifications": "r.status NOT IN ('sent', 'failed')",
    "decisions": "EXISTS (SELECT 1 FROM outbox o WHERE o.message_id = r.decision_id)",
}


def _held_in_partition(spec: PartitionedTable, partition: str, keeps_ids_longer: bool
                       ) -> str:
    """A row of the partition that must stay: its case is kept, or it is unfinished."""
    held = (f"EXISTS (SELECT 1 FROM cases c WHERE c.case_id = r.case_id) "
            f"OR {UNFINISHED_ROW[spec.table]}")
    if spec.table == "case_events" and keeps_ids_longer:
        held += " OR r.outcome <> 'retired'"  # its id is retired (kept) first, not dropped
    return f"SELECT 1 FROM {partition} AS r WHERE {held}"


@dataclass(frozen=True)
class RetentionPolicy:
    retention_days: int
    dedup_window_days: int  # >= retention_days (checked by the settings)
    batch: int = 500
    partition_months_ahead: int = DEFAULT_MONTHS_AHEAD

    @property
    def keeps_ids_longer(self) -> bool:
        return self.dedup_window_days > self.retention_days


class Archive:
    """One run's folder of gzip'd JSON-lines files, each durable before it is named."""

    def __init__(self, root: Path, run_id: str | None = None) -> None:
        self.root = root
        self.run_id = run_id or (
            f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}")
        self.folder = root / self.run_id
        self.files: list[Path] = []

    def write(self, name: str, rows: Iterable[str]) -> Path:
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            _fsync_dir(self.folder.parent)
        path = self.folder / f"{name}.jsonl.gz"
        partial = path.with_name(path.name + ".partial")
        with open(partial, "wb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
                for row in rows:
                    gz.write(row.encode())
                    gz.write(b"\n")
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(partial, path)
        _fsync_dir(self.folder)
        self.files.append(path)
        return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class RetentionReport:
    run_id: str
    batches: int = 0
    cases: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # archived and removed (or retired)
    parked_events: int = 0
    retired_events: int = 0  # kept as dedup-only ids
    forgotten_ids: int = 0
    held_back: int = 0  # closed long enough, but with unfinished work
    busy: int = 0  # a service held the case's lock: next run
    files: list[Path] = field(default_factory=list)
    partitions_created: list[str] = field(default_factory=list)
    partitions_dropped: list[str] = field(default_factory=list)  # archived first
    partitions_kept: list[str] = field(default_factory=list)  # old, but a kept case in it
    # archived, but the drop waited too long for its lock (or rows changed): next run
    partitions_deferred: list[str] = field(default_factory=list)
    default_partition_rows: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RetentionPlan:
    cases_due: int
    cases_held_back: int
    parked_events_due: int
    ids_to_forget: int


def plan_retention(db: Database, policy: RetentionPolicy) -> RetentionPlan:
    """What a run would do now (counts only, nothing locked or changed)."""
    with db.transaction() as s:
        due, held, parked, forget = s.execute(
            PLAN, {"days": policy.retention_days}).one()
    return RetentionPlan(int(due), int(held), int(parked), int(forget))


# Called once a batch's archive is durable, before its removal commits (tests crash here).
ArchivedHook = Callable[[], None]


def run_retention(db: Database, policy: RetentionPolicy, archive: Archive, *,
                  max_batches: int | None = None,
                  on_archived: ArchivedHook | None = None) -> RetentionReport:
    """Archive and remove everything past its time, batch by batch, until nothing is left
    (or `max_batches`)."""
    report = RetentionReport(archive.run_id)
    after: tuple[Any, str] = ("-infinity", "")
    created = ensure_partitions(db, policy.partition_months_ahead)
    report.partitions_created = created.created
    report.default_partition_rows = created.default_rows
    old = old_partitions(db, policy)
    since: dict[str, Any] = {f"since_{table}": "-infinity" for table in BY_TABLE}
    since.update({f"since_{table}": parts[-1].upper for table, parts in old.items() if parts})

    def budget_left() -> bool:
        return max_batches is None or report.batches < max_batches

    while budget_left():
        with db.transaction() as s:
            s.execute(SHORT_LOCKS)
            claimed = s.execute(CANDIDATE_CASES, {
                "days": policy.retention_days, "batch": policy.batch,
                "after_at": after[0], "after_id": after[1]}).all()
            if not claimed:
                break
            after = (claimed[-1].closed_at, claimed[-1].case_id)
            ids = [r.case_id for r in claimed]
            unfinished = set(s.execute(UNFINISHED, {"ids": ids}).scalars())
            ready = [c for c in ids if c not in unfinished]
            locked = try_lock_cases(s, ready)
            report.held_back += len(unfinished)
            report.busy += len(ready) - len(locked)
            if locked:
                _remove_cases(s, sorted(locked), policy, archive, report, on_archived,
                              since)
    while budget_left() and _remove_parked(db, policy, archive, report, on_archived):
        pass
    for table, partitions in old.items():
        for partition in partitions:
            if budget_left():
                _drop_or_sweep(db, BY_TABLE[table], partition.name, policy, archive, report,
                               on_archived, budget_left)
    while budget_left():
        with db.transaction() as s:
            s.execute(SHORT_LOCKS)
            forgotten = s.connection().execute(
                FORGET_EVENT_IDS, {"batch": policy.batch}).rowcount
        report.forgotten_ids += forgotten
        if not forgotten:
            break
    report.files = list(archive.files)
    return report


def _archive_and_count(archive: Archive, report: RetentionReport,
                       removed: dict[str, list[str]], on_archived: ArchivedHook | None
                       ) -> None:
    report.batches += 1
    for table, rows in removed.items():
        if rows:
            archive.write(f"{report.batches:06d}-{table}", rows)
    if on_archived is not None:
        on_archived()
    for table, rows in removed.items():
        report.rows[table] = report.rows.get(table, 0) + len(rows)


def _remove_cases(s: Session, ids: list[str], policy: RetentionPolicy, archive: Archive,
                  report: RetentionReport, on_archived: ArchivedHook | None,
                  since: dict[str, Any]) -> None:
    removed: dict[str, list[str]] = {}
    params = {"ids": ids, "window": policy.dedup_window_days, **since}
    events = RETIRE_CASE_EVENTS if policy.keeps_ids_longer else REMOVE_CASE_EVENTS
    removed["case_events"] = list(s.execute(events, params).scalars())
    for table, statement in REMOVE_BY_CASE.items():
        removed[table] = list(s.execute(statement, params).scalars())
    _archive_and_count(archive, report, removed, on_archived)
    report.cases += len(removed["cases"])
    if policy.keeps_ids_longer:
        report.retired_events += len(removed["case_events"])


def _remove_parked(db: Database, policy: RetentionPolicy, archive: Archive,
                   report: RetentionReport, on_archived: ArchivedHook | None) -> bool:
    """One batch of parked events whose case never opened; False when none is left."""
    with db.transaction() as s:
        s.execute(SHORT_LOCKS)
        claimed = s.execute(CANDIDATE_PARKED, {
            "days": policy.retention_days, "batch": policy.batch}).all()
        if not claimed:
            return False
        # Intake opening one of these cases right now would apply its parked events.
        locked = try_lock_cases(s, {r.case_id for r in claimed})
        ids = sorted(r.event_id for r in claimed if r.case_id in locked)
        report.busy += len(claimed) - len(ids)
        if not ids:
            return False
        statement = RETIRE_EVENTS if policy.keeps_ids_longer else REMOVE_EVENTS
        rows = list(s.execute(statement, {"ids": ids, "window": policy.dedup_window_days}
                              ).scalars())
        _archive_and_count(archive, report, {"case_events": rows}, on_archived)
        report.parked_events += len(rows)
        if policy.keeps_ids_longer:
            report.retired_events += len(rows)
    return True


def old_partitions(db: Database, policy: RetentionPolicy) -> dict[str, list[Partition]]:
    """Per partitioned table, its partitions wholly before the cutoff, oldest first."""
    found: dict[str, list[Partition]] = {}
    with db.sql_engine.connect() as conn:
        cutoff = conn.execute(text(f"SELECT {_CUTOFF}"),
                              {"days": policy.retention_days}).scalar_one()
        for table in BY_TABLE:
            if not is_partitioned(conn, table):
                continue
            found[table] = [p for p in list_partitions(conn, table)
                            if not p.is_default and p.upper is not None
                            and p.upper <= cutoff]
        conn.rollback()
    return found


class _Changed(Exception):
    """A partition's rows changed between its archive and its drop."""


def _counted(rows: Iterable[str], counter: list[int]) -> Iterator[str]:
    for row in rows:
        counter[0] += 1
        yield row


def _drop_or_sweep(db: Database, spec: PartitionedTable, partition: str,
                   policy: RetentionPolicy, archive: Archive, report: RetentionReport,
                   on_archived: ArchivedHook | None, budget_left: Callable[[], bool]
                   ) -> None:
    """An old partition: archived whole and dropped if nothing in it must stay; else the
    rows of removed cases in it are archived and deleted batch by batch."""
    held = _held_in_partition(spec, partition, policy.keeps_ids_longer)
    # Checked and archived without a lock: a lock on the partition would stop the
    # services' statements that name rows by case or id alone (they touch every
    # partition) for as long as the archive takes. Nothing changes rows here any more:
    # their times are long past (new rows get now()), none is unfinished work, no case
    # they belong to is kept. The drop then checks the count is still what was archived.
    with db.sql_engine.connect() as conn:
        if conn.execute(text(f"SELECT EXISTS ({held})")).scalar_one():
            conn.rollback()
            held_back = True
        else:
            held_back = False
            count = [0]
            report.batches += 1
            stream = conn.execute(text(
                f"SELECT row_to_json(r)::text FROM {partition} AS r"
            ).execution_options(yield_per=5000)).scalars()
            archive.write(f"{report.batches:06d}-{spec.table}", _counted(stream, count))
            conn.rollback()
            if on_archived is not None:
                on_archived()
    if not held_back:
        try:
            with db.sql_engine.begin() as conn:
                conn.execute(SHORT_LOCKS)
                if conn.execute(text(f"SELECT count(*) FROM {partition}")
                                ).scalar_one() != count[0]:
                    raise _Changed
                if spec.key is not None:
                    conn.execute(text(
                        f"DELETE FROM {spec.key_table} AS k USING {partition} AS r "
                        f"WHERE k.{spec.key} = r.{spec.key}"))
                # A moment's exclusive lock on the table, under lock_timeout.
                conn.execute(text(f"DROP TABLE {partition}"))
        except (_Changed, OperationalError) as exc:
            if isinstance(exc, OperationalError) and getattr(
                    exc.orig, "sqlstate", None) not in ("55P03", "40P01"):
                raise
            report.partitions_deferred.append(partition)  # archived again next run
            return
        report.rows[spec.table] = report.rows.get(spec.table, 0) + count[0]
        report.partitions_dropped.append(partition)
        return
    report.partitions_kept.append(partition)
    if spec.table == "case_events" and policy.keeps_ids_longer:
        return  # retired ids are forgotten at their time (FORGET_EVENT_IDS)
    unheld = held.replace("SELECT 1 FROM", "SELECT r.ctid FROM", 1).replace(
        " WHERE ", " WHERE NOT (", 1) + ") LIMIT :batch"
    while budget_left():
        with db.sql_engine.begin() as conn:
            conn.execute(SHORT_LOCKS)
            rows = list(conn.execute(text(
                f"DELETE FROM {partition} AS d WHERE d.ctid = ANY(ARRAY({unheld})) "
                f"RETURNING row_to_json(d)::text"), {"batch": policy.batch}).scalars())
            if not rows:
                return
            _archive_and_count(archive, report, {spec.table: rows}, on_archived)
