"""`cases.records_since` (migration 0023): a case's reads (`case show`, `case explain`)
name the time its first row was written, so PostgreSQL skips the months before, and they
still find every row about the case, those written before it opened (parked, expired,
error) included. Cases from before the migration keep NULL and are read whole."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Engine, event, text

from services.intake.parked import expire_parked
from services.intake.processor import IntakeProcessor
from services.ops.caseview import case_document
from shared.db.case_log import CASE_LOG, SqlCaseLog
from shared.db.migrate import alembic_config, upgrade
from shared.db.models import CaseRow
from shared.db.partitions import list_partitions
from shared.db.queries.case_view import load_case_history, load_case_record
from shared.db.session import KEEP_INDEX_PLANS, USUAL_PLANS, Database, make_engine
from shared.domain import Engine as RuleEngine
from shared.domain import Event, RuleBook, WorkCalendar
from shared.domain.model import Case, Outcome
from shared.notifications.policy import NotificationPolicy
from tests.conftest import PG_ADMIN_URL, RUN_ID
from tests.resources import unmigrated_database

pytestmark = pytest.mark.integration

PARTITIONED = ("case_events", "decisions", "notifications")


class BuggyRules(RuleEngine):
    """Rules with a bug one event id sets off: intake records that event as an error."""

    def apply(self, case: Case | None, event: Event, now: datetime) -> Outcome:
        if event.event_id.startswith("boom"):
            raise RuntimeError("a bug")
        return super().apply(case, event, now)


@pytest.fixture
def processor(db: Database) -> IntakeProcessor:
    return IntakeProcessor(
        db=db, engine=BuggyRules(RuleBook.load(None), WorkCalendar(None)),
        policy=NotificationPolicy.load(None), ops_contacts={"emails": [], "phones": []},
        max_event_bytes=64 * 1024)


def body(event_id: str, type_: str, case_id: str, at: datetime,
         data: dict[str, Any] | None = None) -> bytes:
    return json.dumps({
        "event_id": event_id, "type": type_, "occurred_at": at.isoformat(),
        "platform": "kuaishou", "shop_id": "S1", "order_id": "O1", "case_id": case_id,
        "data": data or {}}).encode()


def opened(event_id: str, case_id: str, at: datetime) -> bytes:
    return body(event_id, "case.opened", case_id, at, {
        "kind": "refund_only", "amount_fen": 12900, "reason": "不想要了",
        "buyer": {"phone": "13800000000"}, "merchant": {"email": "shop@example.com"}})


def database_now(db: Database) -> datetime:
    with db.transaction() as s:
        now = s.execute(text("SELECT now()")).scalar_one()
    assert isinstance(now, datetime)
    return now


def test_every_row_written_before_the_case_opened_is_still_shown(
        db: Database, processor: IntakeProcessor) -> None:
    t0 = database_now(db) - timedelta(hours=2)
    # Before the case opens: one event parked then expired (its case did not come in
    # time), one that hits a bug (an error row), and one parked that waits.
    processor.process([body("expires", "buyer.modified", "C1", t0 + timedelta(minutes=1))])
    assert expire_parked(db, lambda _body, _reason: None, max_age_seconds=0) == 1
    processor.process([body("boom", "buyer.modified", "C1", t0 + timedelta(minutes=2))])
    processor.process([body("waits", "merchant.approved", "C1", t0 + timedelta(minutes=3))])
    # Each of those was written in a transaction of its own, before this one.
    processor.process([opened("opens", "C1", t0)])

    with db.transaction() as s:
        received = dict(s.execute(text(
            "SELECT event_id, received_at FROM case_events WHERE case_id = 'C1'")).all())
        case = s.get(CaseRow, "C1")
        assert case is not None and case.records_since is not None
        assert case.records_since == min(received.values())
        assert case.records_since < received["opens"]

    history = load_case_history(db, "C1")
    assert history is not None
    assert {e.event_id: e.outcome for e in history.events} == {
        "expires": "expired", "boom": "error", "waits": "applied", "opens": "applied"}
    record = load_case_record(db, "C1")
    assert record is not None
    assert {e.event_id for e in record.events} == set(received)
    document = case_document(db, "C1")
    assert document is not None
    assert {item.get("event_id") for item in document["timeline"]} >= set(received)


def test_an_error_row_older_than_the_cases_bound_lowers_it(
        db: Database, processor: IntakeProcessor) -> None:
    """An error row's transaction may have begun before the one that created its case (it
    waited for the case's lock meanwhile): its `received_at`, that transaction's time, is
    then older than the case's `records_since`, which intake must lower to it."""
    t0 = database_now(db) - timedelta(hours=1)
    processor.process([opened("opens", "C2", t0)])
    with db.transaction() as s:
        # As if the case had been created after the error's transaction began.
        s.execute(text("UPDATE cases SET records_since = now() + interval '1 hour' "
                       "WHERE case_id = 'C2'"))
    processor.process([body("boom-late", "buyer.modified", "C2", t0 + timedelta(minutes=1))])
    with db.transaction() as s:
        error_at = s.execute(text("SELECT received_at FROM case_events "
                                  "WHERE event_id = 'boom-late'")).scalar_one()
        case = s.get(CaseRow, "C2")
        assert case is not None and case.records_since == error_at
    history = load_case_history(db, "C2")
    assert history is not None
    assert [(e.event_id, e.outcome) for e in history.events
            if e.event_id == "boom-late"] == [("boom-late", "error")]


def plans_of_case_show(db: Database, case_id: str) -> str:
    """The plans of the statements `case show` runs for `case_id` (EXPLAIN of each, with
    its own parameters)."""
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any,
                _many: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, parameters))

    event.listen(db.sql_engine, "before_cursor_execute", capture)
    try:
        assert case_document(db, case_id) is not None
    finally:
        event.remove(db.sql_engine, "before_cursor_execute", capture)
    plans = []
    with db.sql_engine.connect() as conn:
        for statement, parameters in statements:
            plans.extend(str(line) for line in conn.exec_driver_sql(
                f"EXPLAIN {statement}", parameters).scalars())
    return "\n".join(plans)


def test_case_show_reads_only_the_months_since_the_case_began(
        db: Database, processor: IntakeProcessor) -> None:
    processor.process([opened("new-opens", "NEW", database_now(db) - timedelta(hours=1))])
    # A fresh database keeps this month in `<table>_history` (what was there before
    # partitioning); the month partitions begin with the next month. As if the case had
    # begun then (its rows are found by the tests above), the reads skip the months before.
    with db.sql_engine.connect() as conn:
        months = [p for p in list_partitions(conn, "case_events")
                  if not p.is_default and p.lower is not None]
    first_month = months[0]
    with db.transaction() as s:
        s.execute(text("UPDATE cases SET records_since = :at WHERE case_id = 'NEW'"),
                  {"at": first_month.lower})
    plans = plans_of_case_show(db, "NEW")
    for table in PARTITIONED:
        assert first_month.name.replace("case_events", table) in plans
        assert f"{table}_history" not in plans

    # A case from before migration 0023 (no bound): every month is read, as before.
    with db.transaction() as s:
        s.execute(text("UPDATE cases SET records_since = NULL WHERE case_id = 'NEW'"))
    plans = plans_of_case_show(db, "NEW")
    for table in PARTITIONED:
        assert f"{table}_history" in plans
        assert first_month.name.replace("case_events", table) in plans


def test_a_rebuild_reads_the_events_logged_before_the_case_opened(
        db: Database, processor: IntakeProcessor) -> None:
    """A rebuild reads the case's log from its `records_since` on: the shipment parked
    before the case opened is older than the case, and must still count."""
    t0 = database_now(db) - timedelta(hours=3)
    # happened after the approval, arrives before the case: parked
    processor.process([body("ship", "buyer.shipped", "C3", t0 + timedelta(hours=2),
                            {"carrier": "SF", "tracking_no": "SF1"})])
    processor.process([body("opens", "case.opened", "C3", t0, {  # the shipment does not fit
        "kind": "exchange", "amount_fen": 12900, "reason": "尺码不合适",
        "buyer": {"phone": "13800000000"}, "merchant": {"email": "shop@example.com"}})])
    # the approval happened before the shipment: the case is rebuilt from its log
    processor.process([body("ok", "merchant.approved", "C3", t0 + timedelta(hours=1))])
    with db.transaction() as s:
        outcomes = dict(s.execute(text(
            "SELECT event_id, outcome FROM case_events WHERE case_id = 'C3'")).all())
        case = s.get(CaseRow, "C3")
        assert case is not None
        assert outcomes == {"ship": "applied", "opens": "applied", "ok": "applied"}
        assert case.snapshot["data"]["return_tracking_no"] == "SF1"


def test_a_rebuild_reads_only_the_months_since_the_case_began(
        db: Database, processor: IntakeProcessor) -> None:
    processor.process([opened("new-opens", "NEW", database_now(db) - timedelta(hours=1))])
    with db.sql_engine.connect() as conn:
        first_month = next(p for p in list_partitions(conn, "case_events")
                           if not p.is_default and p.lower is not None)

    def scanned(records_since: datetime | None, kept: bool = False) -> set[str]:
        """The partitions of `case_events` the rebuild's log read opens; `kept`: with
        its plan kept, as `SqlCaseLog.accepted_of` runs it (one generic plan, made before
        the case's bound is known)."""
        with db.transaction() as s:
            s.execute(text("UPDATE cases SET records_since = :at WHERE case_id = 'NEW'"),
                      {"at": records_since})
            statement = str(CASE_LOG.params(case_id="NEW").compile(
                dialect=s.get_bind().dialect, compile_kwargs={"literal_binds": True}))
            conn = s.connection()
            if kept:
                conn.exec_driver_sql(KEEP_INDEX_PLANS)
                by_parameter = statement.replace("'NEW'", "$1")
                conn.exec_driver_sql(f"PREPARE case_log(text) AS {by_parameter}")
                statement = "EXECUTE case_log('NEW')"
            lines = list(conn.exec_driver_sql(
                f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) {statement}").scalars())
            if kept and records_since is not None:  # the months before it pruned at run time
                assert any("never executed" in line for line in lines)
            if kept:  # the pooled connection as it was (its settings, no prepared statement)
                conn.exec_driver_sql(f"DEALLOCATE case_log; {USUAL_PLANS}")
            return {name for line in lines if "never executed" not in line
                    for name in re.findall(r"on (case_events_\w+)", line)}

    for kept in (False, True):
        assert "case_events_history" not in scanned(first_month.lower, kept)
        assert first_month.name in scanned(first_month.lower, kept)
        # a case from before migration 0023 (no bound) is read whole, as before
        assert {"case_events_history", first_month.name} <= scanned(None, kept)
    # and the rebuild's own read finds the case's events with its plan kept
    with db.transaction() as s:
        assert [e for e, _ in SqlCaseLog(s).accepted_of("NEW")] == ["new-opens"]


@pytest.fixture
def database() -> Iterator[tuple[str, Engine]]:
    name = f"aftersales_test_{RUN_ID}_m23_{uuid.uuid4().hex[:4]}"
    with unmigrated_database(PG_ADMIN_URL, name) as database:
        yield database


def test_0023_keeps_every_case_and_leaves_the_old_ones_unbounded(
        database: tuple[str, Engine]) -> None:
    url, sql_engine = database
    upgrade(url, "0022")
    long_ago = datetime.now(UTC) - timedelta(days=200)
    with sql_engine.begin() as conn:
        conn.execute(text("""
            INSERT INTO cases (case_id, platform, shop_id, order_id, kind, status, step,
                               version, rule_set, rule_version, opened_at, snapshot)
            SELECT 'OLD' || g, 'kuaishou', 'S', 'O' || g, 'refund_only', 'open', 'x', 1,
                   'r', '1', :at, '{}'
            FROM generate_series(1, 500) g"""), {"at": long_ago})
        conn.execute(text("""
            INSERT INTO case_events (event_id, case_id, type, occurred_at, received_at,
                                     outcome, body)
            SELECT 'e' || g, 'OLD' || (g % 500 + 1), 'case.opened', :at, :at, 'applied', '{}'
            FROM generate_series(1, 1500) g"""), {"at": long_ago})

    def scalar(sql: str) -> Any:
        with sql_engine.connect() as conn:
            return conn.execute(text(sql)).scalar()

    def rows() -> tuple[int, int]:
        return (scalar("SELECT count(*) FROM cases"), scalar("SELECT count(*) FROM case_events"))

    unbounded = "SELECT count(*) FROM cases WHERE records_since IS NULL"
    assert rows() == (500, 1500)
    upgrade(url, "0023")
    assert rows() == (500, 1500)  # every row kept
    assert scalar(unbounded) == 500  # none of them given a bound
    with sql_engine.connect() as conn:
        assert conn.execute(text(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = "
            "'ix_case_events_unapplied'::regclass")).scalar() is True
    # An old case is still read whole; a case created now gets its bound.
    migrated = Database(make_engine(url, pool_size=1))
    try:
        history = load_case_history(migrated, "OLD1")
        assert history is not None and len(history.events) == 3
        with migrated.transaction() as s:
            s.execute(text("""
                INSERT INTO cases (case_id, platform, shop_id, order_id, kind, status, step,
                                   version, rule_set, rule_version, opened_at, snapshot)
                VALUES ('NEW', 'kuaishou', 'S', 'O', 'refund_only', 'open', 'x', 1, 'r', '1',
                        now(), '{}')"""))
        with migrated.transaction() as s:
            assert s.execute(text("SELECT records_since IS NOT NULL FROM cases "
                                  "WHERE case_id = 'NEW'")).scalar() is True
    finally:
        migrated.sql_engine.dispose()

    command.downgrade(alembic_config(url), "0022")
    assert rows() == (501, 1500)
    assert scalar("SELECT count(*) FROM information_schema.columns WHERE table_name = "
                  "'cases' AND column_name = 'records_since'") == 0
    upgrade(url, "0023")  # and up again
    assert rows() == (501, 1500)
    assert scalar(unbounded) == 501
