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

Archive format: under `archive_dir`, one folder per run (`<UTC time>-<random>`), and in it
one file per batch and table, `<batch>-<table>.jsonl.gz`: gzip'd UTF-8 JSON lines, one row
per line as PostgreSQL's `row_to_json` writes it (timestamps in ISO 8601 with offset).
"""

from __future__ import annotations

import gzip
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

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

REMOVE_BY_CASE = {
    table: text(f"DELETE FROM {table} AS r WHERE case_id = ANY(:ids) "
                "RETURNING row_to_json(r)::text")
    for table in CASE_TABLES if table != "case_events"
}
REMOVE_CASE_EVENTS = text(
    "DELETE FROM case_events AS r WHERE case_id = ANY(:ids) AND outcome <> 'retired' "
    "RETURNING row_to_json(r)::text")
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


@dataclass(frozen=True)
class RetentionPolicy:
    retention_days: int
    dedup_window_days: int  # >= retention_days (checked by the settings)
    batch: int = 500

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

    def write(self, name: str, rows: Sequence[str]) -> Path:
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
                _remove_cases(s, sorted(locked), policy, archive, report, on_archived)
    while budget_left() and _remove_parked(db, policy, archive, report, on_archived):
        pass
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
                  report: RetentionReport, on_archived: ArchivedHook | None) -> None:
    removed: dict[str, list[str]] = {}
    params = {"ids": ids, "window": policy.dedup_window_days}
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
