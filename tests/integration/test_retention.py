"""Retention against the real PostgreSQL: exactly what is past its time is removed, every
removed row is in the archive first, a crash between archiving and removing loses nothing,
a case a service is working on is skipped rather than waited for, and event ids are
remembered for the whole dedup window."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from services.intake.processor import IntakeProcessor
from shared.db.persist import lock_cases
from shared.db.retention import Archive, RetentionPolicy, plan_retention, run_retention
from shared.db.session import Database
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.notifications.policy import NotificationPolicy

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DAY_MINUTES = 24 * 60
KEYS = {"cases": "case_id", "case_events": "event_id", "deadlines": "id",
        "decisions": "decision_id", "notifications": "id"}


def typed(sql: str) -> Any:
    """The test's parameters are text, whatever the column they are compared with."""
    for name in ("cid", "status", "dl", "n"):
        sql = re.sub(rf":{name}\b", f"CAST(:{name} AS text)", sql)
    return text(sql)


def add_case(db: Database, case_id: str, *, closed_minutes_ago: int | None,
             opened_minutes_ago: int = 1000 * DAY_MINUTES, deadline: str = "cancelled",
             notification: str = "sent") -> None:
    """A case with two events, a deadline, a decision and a notification, its times set
    against the database clock (which is the one retention goes by)."""
    closed = closed_minutes_ago is not None
    params = {"cid": case_id, "opened": opened_minutes_ago, "closed": closed_minutes_ago or 0,
              "status": "closed" if closed else "open", "dl": deadline, "n": notification}
    closed_at = "now() - make_interval(mins => :closed)" if closed else "NULL"
    with db.transaction() as s:
        s.execute(typed(f"""
            INSERT INTO cases (case_id, platform, shop_id, order_id, kind, status, step,
                               version, rule_set, rule_version, opened_at, closed_at, snapshot)
            VALUES (:cid, 'kuaishou', 'S1', 'O-' || :cid, 'refund_only', :status,
                    CASE WHEN :status = 'open' THEN 'merchant_response' ELSE 'closed' END,
                    3, 'kuaishou', '2026.1', now() - make_interval(mins => :opened),
                    {closed_at}, jsonb_build_object('case_id', :cid))"""), params)
        s.execute(typed("""
            INSERT INTO case_events (event_id, case_id, type, occurred_at, outcome, body,
                                     received_at)
            SELECT :cid || '-e' || i, :cid, 'case.opened', now(), o, jsonb_build_object(
                       'event_id', :cid || '-e' || i, 'buyer', '13800000000'),
                   now() - make_interval(mins => :opened)
            FROM (VALUES (1, 'applied'), (2, 'out_of_state')) AS v(i, o)"""), params)
        s.execute(typed("""
            INSERT INTO deadlines (case_id, step, purpose, action, party, due_at, deadline_at,
                                   fence, rule_set, rule_version, rule_id, status)
            VALUES (:cid, 'merchant_response', 'deadline', 'auto_approve', 'merchant', now(),
                    now(), 1, 'kuaishou', '2026.1', 'r1', :dl)"""), params)
        s.execute(typed("""
            INSERT INTO decisions (decision_id, case_id, type, step, decided_at, body)
            VALUES ('d-' || :cid, :cid, 'decision.auto_approved', 'merchant_response', now(),
                    '{}')"""), params)
        s.execute(typed("""
            INSERT INTO notifications (dedup_key, case_id, reason, party, channel, recipient,
                                       template, params, status)
            VALUES ('n-' || :cid, :cid, 'auto_approved', 'buyer', 'sms', '13800000000', 't',
                    '{}', :n)"""), params)


def add_parked(db: Database, event_id: str, case_id: str, received_minutes_ago: int) -> None:
    with db.transaction() as s:
        s.execute(text("""
            INSERT INTO case_events (event_id, case_id, type, occurred_at, outcome, problem,
                                     body, received_at)
            VALUES (:e, :c, 'buyer.shipped', now(), 'parked', 'parked: case not opened yet',
                    '{"tracking": "SF1"}', now() - make_interval(mins => :m))"""),
                  {"e": event_id, "c": case_id, "m": received_minutes_ago})


def rows_of(db: Database, where: str = "true") -> dict[tuple[str, str], dict[str, Any]]:
    """Every row of the five tables (as row_to_json gives it) matching `where`, by key."""
    out = {}
    with db.transaction() as s:
        for table, key in KEYS.items():
            for row in s.execute(text(
                    f"SELECT row_to_json(t)::text FROM {table} t WHERE {where}")).scalars():
                doc = json.loads(row)
                out[(table, str(doc[key]))] = doc
    return out


def archived(folder: Path) -> list[tuple[tuple[str, str], dict[str, Any]]]:
    out = []
    for path in sorted(folder.rglob("*.jsonl.gz")):
        table = path.name.removesuffix(".jsonl.gz").split("-", 1)[1]
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)
                out.append(((table, str(doc[KEYS[table]])), doc))
    return out


@pytest.fixture
def archive_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "archive"


def test_removes_exactly_what_is_past_its_time_and_archives_it_first(
        db: Database, archive_dir: Path) -> None:
    for i in range(3):  # closed a year and a month ago, and just past the window
        add_case(db, f"OLD{i}", closed_minutes_ago=430 * DAY_MINUTES)
    add_case(db, "EDGE-OUT", closed_minutes_ago=400 * DAY_MINUTES + 5)
    add_case(db, "EDGE-IN", closed_minutes_ago=400 * DAY_MINUTES - 5)
    add_case(db, "ANCIENT-OPEN", closed_minutes_ago=None, opened_minutes_ago=3000 * DAY_MINUTES,
             deadline="pending")
    add_case(db, "UNSENT", closed_minutes_ago=800 * DAY_MINUTES, notification="deferred")
    add_parked(db, "parked-old", "NEVER-OPENED", 401 * DAY_MINUTES)
    add_parked(db, "parked-new", "NOT-YET-OPENED", 10 * DAY_MINUTES)
    policy = RetentionPolicy(retention_days=400, dedup_window_days=400, batch=2)
    plan = plan_retention(db, policy)
    assert (plan.cases_due, plan.cases_held_back, plan.parked_events_due) == (5, 1, 1)

    gone = ("'OLD0', 'OLD1', 'OLD2', 'EDGE-OUT', 'NEVER-OPENED'")
    expected = rows_of(db, f"case_id IN ({gone})")
    kept = rows_of(db, f"case_id NOT IN ({gone})")
    report = run_retention(db, policy, Archive(archive_dir))

    assert rows_of(db) == kept
    assert set(kept) >= {("cases", "EDGE-IN"), ("cases", "ANCIENT-OPEN"), ("cases", "UNSENT"),
                         ("case_events", "parked-new")}
    in_archive = archived(archive_dir)
    assert dict(in_archive) == expected  # every removed row, exactly as it was
    assert len(in_archive) == len(expected)  # and once
    assert (report.cases, report.parked_events, report.held_back, report.busy) == (4, 1, 1, 0)
    # In closing order, 2 a batch: UNSENT (held back) + OLD0, OLD1 + OLD2, EDGE-OUT; then
    # the parked event.
    assert report.batches == 4
    assert report.rows == {"cases": 4, "case_events": 9, "deadlines": 4, "decisions": 4,
                           "notifications": 4, "case_event_conflicts": 0, "case_notes": 0}

    again = run_retention(db, policy, Archive(archive_dir))  # nothing left to do
    assert (again.cases, again.parked_events, again.files) == (0, 0, [])
    assert rows_of(db) == kept


CRASH = """
import os, sys
from pathlib import Path
from shared.db.retention import Archive, RetentionPolicy, run_retention
from shared.db.session import Database, make_engine
db = Database(make_engine(sys.argv[1]))
run_retention(db, RetentionPolicy(400, 400, 2), Archive(Path(sys.argv[2])),
              on_archived=lambda: os._exit(9))
"""


def test_a_crash_between_archive_and_removal_loses_nothing(
        db: Database, database_url: str, archive_dir: Path) -> None:
    for i in range(3):
        add_case(db, f"OLD{i}", closed_minutes_ago=500 * DAY_MINUTES)
    before = rows_of(db)
    # A real crash: the process dies with its first batch archived, before the commit.
    crashed = subprocess.run([sys.executable, "-c", CRASH, database_url, str(archive_dir)],
                             cwd=ROOT, capture_output=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert crashed.returncode == 9, crashed.stderr.decode()[-2000:]
    assert rows_of(db) == before  # nothing removed
    first = archived(archive_dir)
    assert len(first) == 12 and dict(first).items() <= before.items()  # 2 cases, 6 rows each
    assert not list(archive_dir.rglob("*.partial"))

    run_retention(db, RetentionPolicy(400, 400, 2), Archive(archive_dir))
    assert rows_of(db) == {}
    union = archived(archive_dir)
    assert dict(union) == before  # every row archived, some of them twice
    assert len(union) == len(before) + len(first)


def test_a_case_a_service_holds_is_skipped_not_waited_for(
        db: Database, archive_dir: Path) -> None:
    add_case(db, "HELD", closed_minutes_ago=500 * DAY_MINUTES)
    add_case(db, "FREE", closed_minutes_ago=500 * DAY_MINUTES)
    with db.transaction() as other:  # e.g. intake applying a late event to HELD
        lock_cases(other, ["HELD"])
        report = run_retention(db, RetentionPolicy(400, 400, 10), Archive(archive_dir))
    assert (report.cases, report.busy) == (1, 1)
    assert set(rows_of(db, "case_id = 'HELD'")) and not rows_of(db, "case_id = 'FREE'")


@pytest.fixture
def processor(db: Database) -> IntakeProcessor:
    return IntakeProcessor(
        db=db, engine=Engine(RuleBook.load(None), WorkCalendar(None)),
        policy=NotificationPolicy.load(None), ops_contacts={"emails": [], "phones": []},
        max_event_bytes=64 * 1024)


def event(event_id: str, type_: str, case_id: str, data: dict[str, Any]) -> bytes:
    return json.dumps({
        "event_id": event_id, "type": type_, "occurred_at": datetime.now(UTC).isoformat(),
        "platform": "kuaishou", "shop_id": "S1", "order_id": "O-" + case_id,
        "case_id": case_id, "data": data}).encode()


def closed_case(processor: IntakeProcessor, db: Database, case_id: str,
                closed_days_ago: int) -> list[bytes]:
    """A case opened and closed through intake, its closing moved into the past."""
    bodies = [
        event(f"{case_id}-open", "case.opened", case_id, {
            "kind": "refund_only", "amount_fen": 1990, "reason": "不想要了",
            "buyer": {"phone": "13800000000"}, "merchant": {"email": "shop@example.com"}}),
        event(f"{case_id}-cancel", "buyer.cancelled", case_id, {}),
    ]
    outcomes = [h.outcome for b in bodies for h in processor.process([b]).handled]
    assert outcomes == ["accepted", "accepted"]
    with db.transaction() as s:
        status = s.execute(text(
            "UPDATE cases SET closed_at = now() - make_interval(days => :d) "
            "WHERE case_id = :c RETURNING status"), {"c": case_id, "d": closed_days_ago}
        ).scalar_one()
        # Long since sent, as the notifier would have.
        s.execute(text("UPDATE notifications SET status = 'sent' WHERE case_id = :c"),
                  {"c": case_id})
    assert status == "closed"
    return bodies


def redelivered(processor: IntakeProcessor, bodies: list[bytes]) -> list[str]:
    return [h.outcome for h in processor.process(bodies).handled]


def test_dedup_holds_within_the_window(processor: IntakeProcessor, db: Database,
                                       archive_dir: Path) -> None:
    """Retention 400 days, ids remembered for 500: a case closed 300 days ago is kept
    whole; one closed 450 days ago is archived and removed, its event ids kept without
    their data; one closed 600 days ago is forgotten entirely."""
    kept = closed_case(processor, db, "KEPT", 300)
    retired = closed_case(processor, db, "RETIRED", 450)
    forgotten = closed_case(processor, db, "FORGOTTEN", 600)
    report = run_retention(db, RetentionPolicy(400, 500, 100), Archive(archive_dir))
    assert (report.cases, report.retired_events, report.forgotten_ids, report.held_back
            ) == (2, 4, 2, 0)

    with db.transaction() as s:
        left = {r.event_id: r for r in s.execute(text(
            "SELECT event_id, case_id, outcome, body, problem, forget_after > now() AS later"
            " FROM case_events WHERE outcome = 'retired'"))}
        assert s.execute(text(
            "SELECT count(*) FROM cases WHERE case_id IN ('RETIRED', 'FORGOTTEN')"
        )).scalar_one() == 0
    assert set(left) == {"RETIRED-open", "RETIRED-cancel"}
    assert all(r.body == {} and r.problem is None and r.later for r in left.values())
    archived_events = {key[1] for key, _ in archived(archive_dir) if key[0] == "case_events"}
    assert archived_events == {"RETIRED-open", "RETIRED-cancel", "FORGOTTEN-open",
                               "FORGOTTEN-cancel"}

    assert redelivered(processor, kept) == ["duplicate", "duplicate"]
    assert redelivered(processor, retired) == ["duplicate", "duplicate"]
    # Past the window the id is new again: a case is opened afresh (documented).
    assert redelivered(processor, forgotten[:1]) == ["accepted"]


def aftersales(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aftersales_cli.cli", *args], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


def test_the_command_counts_then_archives_and_removes(
        db: Database, database_url: str, archive_dir: Path) -> None:
    add_case(db, "OLD", closed_minutes_ago=500 * DAY_MINUTES)
    add_case(db, "RECENT", closed_minutes_ago=5 * DAY_MINUTES)
    env = {"AFTERSALES_DATABASE_URL": database_url}
    dry = aftersales("retention", "run", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "closed cases past retention: 1 (0 held back" in dry.stdout
    assert set(rows_of(db, "case_id = 'OLD'"))  # a dry run changes nothing

    refused = aftersales("retention", "run", env=env)  # nowhere to archive: nothing removed
    assert refused.returncode == 2 and "AFTERSALES_ARCHIVE_DIR" in refused.stderr
    assert set(rows_of(db, "case_id = 'OLD'"))

    done = aftersales("retention", "run", "--batch", "1",
                      env={**env, "AFTERSALES_ARCHIVE_DIR": str(archive_dir)})
    assert done.returncode == 0, done.stderr
    assert "1 cases and 0 parked events archived and removed in 1 batches" in done.stdout
    assert not rows_of(db, "case_id = 'OLD'") and set(rows_of(db, "case_id = 'RECENT'"))
    assert {key for key, _ in archived(archive_dir)} == {
        ("cases", "OLD"), ("case_events", "OLD-e1"), ("case_events", "OLD-e2"),
        ("deadlines", "1"), ("decisions", "d-OLD"), ("notifications", "1")}
