"""The services' statements keep using their indexes while the tables grow.

psycopg prepares a statement after a few executions and PostgreSQL may then pin a generic
plan made while the table was small: a sequential scan that stays until the next ANALYZE.
In the end-to-end benchmark that made every intake batch scan all of `case_events`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
from sqlalchemy import Connection, Engine, TextClause, create_engine, text
from sqlalchemy.orm import Session

from shared.db.backlog import NOTIFICATIONS_PENDING, OVERDUE
from shared.db.case_log import SEEN_EVENTS, SqlCaseLog
from shared.db.notifications import HandOverLine, record_values
from shared.db.session import KEEP_INDEX_PLANS, Database, make_engine

# What sequential scans did in this transaction, on tables whose name is LIKE `tables`:
# how many (`seq_scan`) or how many rows they read (`seq_tup_read`). This transaction's own
# counters: visible at once, unlike the cumulative statistics.
SCANS, ROWS_SCANNED = "seq_scan", "seq_tup_read"
# Rows read by sequential scans and fetched from the heap by index scans.
ROWS_READ = "seq_tup_read + coalesce(idx_tup_fetch, 0)"


def _scanned(conn: Connection, counter: str, tables: str) -> int:
    return int(conn.execute(text(
        f"SELECT coalesce(sum({counter}), 0) FROM pg_stat_xact_user_tables "
        "WHERE relname LIKE :tables"), {"tables": tables}).scalar())


def _seq_scans_of_event_ids(conn: Connection) -> int:
    # The duplicate check reads `event_ids`, whose rows intake's insert claims.
    return _scanned(conn, SCANS, "event_ids")


def seq_scans_after_growth(sql_engine: Engine) -> int:
    """Run intake's duplicate check often on an empty table, fill the table (no ANALYZE,
    as between autovacuum runs), run the check again: how many sequential scans did the
    runs after the growth make?"""
    with sql_engine.connect() as conn, conn.begin():
        for i in range(15):  # enough for psycopg to prepare and PostgreSQL to go generic
            conn.execute(SEEN_EVENTS, {"ids": [f"none-{i}"]})
        conn.execute(text(
            "INSERT INTO case_events (event_id, case_id, type, occurred_at, outcome, body) "
            "SELECT 'ev-' || g, 'C-' || g, 'case.opened', now(), 'applied', '{}' "
            "FROM generate_series(1, 20000) g"))
        conn.execute(text("INSERT INTO event_ids (event_id) "  # as intake's insert claims them
                          "SELECT 'ev-' || g FROM generate_series(1, 20000) g"))
        before = _seq_scans_of_event_ids(conn)
        for i in range(5):
            conn.execute(SEEN_EVENTS, {"ids": [f"ev-{i}", f"ev-{i + 100}"]})
        seq_scans = _seq_scans_of_event_ids(conn) - before
        conn.rollback()
    return seq_scans


@pytest.fixture
def empty_case_events(db: Database, database_url: str) -> Iterator[str]:
    yield database_url  # `db` has emptied every table


def test_service_engine_uses_the_index_after_the_table_grows(empty_case_events: str) -> None:
    sql_engine = make_engine(empty_case_events)
    try:
        assert seq_scans_after_growth(sql_engine) == 0
    finally:
        sql_engine.dispose()


def test_without_per_execution_plans_the_stale_plan_scans(empty_case_events: str) -> None:
    """The control: a plain engine keeps the plan made on the empty table, so the test
    above would catch the setting going missing."""
    sql_engine = create_engine(empty_case_events)
    try:
        assert seq_scans_after_growth(sql_engine) > 0
    finally:
        sql_engine.dispose()


def _seq_scans_of_notifications(conn: Connection) -> int:
    return _scanned(conn, SCANS, "notifications%")


def hand_over_seq_scans_after_growth(sql_engine: Engine, settings: Sequence[str],
                                     plain: bool = False) -> int:
    """The notifier's hand-over statements (a stamp alone, a result and a stamp, two
    results and a stamp) run often on an empty table with `settings`, then again once the
    table has rows (no ANALYZE): the sequential scans of the runs after the growth.
    `plain`: on a table that is not partitioned (a temporary one of the same shape, which
    the statements find first), where the planner's choices differ."""
    def run_all(line: HandOverLine, first: int) -> None:
        line.record_and_hand_over([], [first], "t")
        line.record_and_hand_over([record_values(first, "t", "sent", 1, None)], [first], "t")
        line.record_and_hand_over([record_values(first + i, "t", "sent", 1, None)
                                   for i in (1, 2)], [first + 1, first + 2], "t")

    with sql_engine.connect() as conn, conn.begin():
        if plain:
            conn.execute(text("CREATE TEMPORARY TABLE notifications "
                              "(LIKE public.notifications INCLUDING ALL) ON COMMIT DROP"))
        for setting in settings:
            conn.execute(text(setting))
        line = HandOverLine(conn)
        for i in range(15):  # enough for psycopg to prepare and PostgreSQL to go generic
            run_all(line, -10 * (i + 1))
        conn.execute(text(
            "INSERT INTO notifications (dedup_key, case_id, reason, party, channel, recipient, "
            "template, params) SELECT 'n-' || g, 'C-' || g, 'r', 'buyer', 'sms', '1', 't', '{}' "
            "FROM generate_series(1, 20000) g"))
        before = _seq_scans_of_notifications(conn)
        for i in range(5):
            run_all(line, 100 * (i + 1))
        seq_scans = _seq_scans_of_notifications(conn) - before
        conn.rollback()
    return seq_scans


def test_the_hand_over_line_keeps_index_plans_made_on_an_empty_table(
        empty_case_events: str) -> None:
    """Plans kept for the connection, made while the table was empty, still use the index
    once it has rows. (Before partitioning, a kept plan of the stamp, `id = ANY(...)`
    alone, scanned without `enable_seqscan = off`; the statements' creation-time bounds
    now lead PostgreSQL 15 to the index anyway, and the setting stays for any statement
    without them.)"""
    sql_engine = make_engine(empty_case_events)
    try:
        for plain in (False, True):
            assert hand_over_seq_scans_after_growth(
                sql_engine, [KEEP_INDEX_PLANS], plain) == 0, plain
    finally:
        sql_engine.dispose()


def _rows_scanned_of_notifications(conn: Connection) -> int:
    return _scanned(conn, ROWS_SCANNED, "notifications%")


def backlog_rows_scanned(sql_engine: Engine, statement: TextClause
                                       ) -> tuple[dict[str, int], int]:
    """The backlog's count of waiting notifications on a table of mostly sent ones (as a
    year of history leaves it, analyzed): its figures, and how many rows it read by
    sequential scans (a scan of an empty partition reads none and costs nothing)."""
    statuses = ["sent"] * 50 + ["new", "queued", "deferred", "pending", "failed"]
    with sql_engine.connect() as conn, conn.begin():
        conn.execute(text(
            "INSERT INTO notifications (dedup_key, case_id, reason, party, channel, recipient, "
            "template, params, status) SELECT 'n-' || g, 'C-' || g, 'r', 'buyer', "
            "CASE WHEN g % 2 = 0 THEN 'sms' ELSE 'email' END, '1', 't', '{}', "
            "(CAST(:statuses AS text[]))[g % 55 + 1] FROM generate_series(1, 22000) g"),
            {"statuses": statuses})
        conn.execute(text("ANALYZE notifications"))
        before = _rows_scanned_of_notifications(conn)
        figures = {str(channel): int(n) for channel, n in conn.execute(statement)}
        rows_scanned = _rows_scanned_of_notifications(conn) - before
        conn.rollback()
    return figures, rows_scanned


def test_the_backlog_counts_waiting_notifications_without_reading_the_sent_ones(
        empty_case_events: str) -> None:
    sql_engine = make_engine(empty_case_events)
    try:
        figures, rows_scanned = backlog_rows_scanned(sql_engine, NOTIFICATIONS_PENDING)
        # 400 rows of each of the four waiting statuses, half of each per channel.
        assert figures == {"sms": 800, "email": 800}
        assert rows_scanned == 0
        # The control: the one-statement form this replaced read every row.
        _, control_rows = backlog_rows_scanned(sql_engine, text(
            "SELECT channel, count(*) FROM notifications "
            "WHERE status IN ('new', 'queued', 'pending', 'deferred') GROUP BY 1"))
        assert control_rows == 22000
    finally:
        sql_engine.dispose()


def overdue_rows_read(sql_engine: Engine, statement: TextClause) -> tuple[tuple[int, str], int]:
    """The backlog's overdue count on a table of a million open cases' shape, scaled down
    (analyzed): 20,000 pending deadlines due in the coming weeks, 20,000 finished ones,
    and a few overdue: 60 pending, 30 dispatched (and 10 dispatched not yet due). Its
    figures (count, earliest due as text), and how many deadline rows it read."""
    with sql_engine.connect() as conn, conn.begin():
        conn.execute(text(
            "INSERT INTO deadlines (case_id, step, purpose, action, party, due_at, "
            "deadline_at, fence, rule_set, rule_version, rule_id, status, dispatched_at) "
            "SELECT 'C-' || g, 's', 'deadline', 'a', 'merchant', due, due, 1, 'r', '1', "
            "'r1', status, CASE WHEN status = 'dispatched' THEN now() END "
            "FROM (SELECT g, CASE WHEN g <= 20000 THEN 'pending' WHEN g <= 40000 THEN 'fired' "
            "                     WHEN g <= 40060 THEN 'pending' ELSE 'dispatched' END status,"
            "             CASE WHEN g <= 20000 THEN now() + make_interval(hours => g % 500 + 1)"
            "                  WHEN g <= 40090 THEN timestamptz '2026-01-01' "
            "                                       + make_interval(mins => g - 40000)"
            "                  ELSE now() + interval '1 hour' END due"
            "        FROM generate_series(1, 40100) g) t"))
        conn.execute(text("ANALYZE deadlines"))
        before = _scanned(conn, ROWS_READ, "deadlines")
        count, earliest = conn.execute(statement).one()
        rows_read = _scanned(conn, ROWS_READ, "deadlines") - before
        conn.rollback()
    return (int(count), earliest.isoformat()), rows_read


def test_the_backlog_counts_overdue_deadlines_without_reading_the_open_ones(
        empty_case_events: str) -> None:
    sql_engine = make_engine(empty_case_events)
    try:
        figures, rows_read = overdue_rows_read(sql_engine, OVERDUE)
        assert figures == (90, "2026-01-01T00:01:00+00:00")
        # The overdue rows, and the dispatched ones (read to check their due time).
        assert rows_read <= 100, rows_read
        # The control: the one-statement form this replaced read every open deadline.
        control, control_rows = overdue_rows_read(sql_engine, text(
            "SELECT count(*), min(due_at) FROM deadlines "
            "WHERE status IN ('pending', 'dispatched') AND due_at <= now()"))
        assert control == figures
        assert control_rows >= 20000  # (a sequential scan of all 40,100)
    finally:
        sql_engine.dispose()


def early_rows_after_growth(sql_engine: Engine) -> tuple[int, int, int]:
    """Intake's read of the rows written about cases before they existed (its plan kept
    for the connection: `index_plans_kept`), run often while `case_events` is empty, then
    again once it holds 20,000 rows, a hundred of them parked (no ANALYZE, as between
    autovacuum runs): the parked rows found, and the sequential scans and the rows they
    read in the runs after the growth. (That the kept plan is cheaper is a matter of
    speed: bench/intake_sql_profile.py.)"""
    with Session(sql_engine) as session, session.begin():
        log = SqlCaseLog(session)
        for i in range(15):  # enough for psycopg to prepare and PostgreSQL to go generic
            log.early_rows_of([f"none-{i}"])
        session.execute(text(
            "INSERT INTO case_events (event_id, case_id, type, occurred_at, outcome, body) "
            "SELECT 'ev-' || g, 'C-' || g, 'shipment.sent', now(), "
            "CASE WHEN g % 200 = 0 THEN 'parked' ELSE 'applied' END, '{}' "
            "FROM generate_series(1, 20000) g"))
        conn = session.connection()
        scans, rows = _scanned(conn, SCANS, "case_events%"), _scanned(
            conn, ROWS_SCANNED, "case_events%")
        found = sum(len(log.early_rows_of([f"C-{g}" for g in range(i, 20001, 50)]))
                    for i in range(1, 51))
        scans = _scanned(conn, SCANS, "case_events%") - scans
        rows = _scanned(conn, ROWS_SCANNED, "case_events%") - rows
        # The connection's own settings are back after the read.
        assert conn.execute(text("SHOW plan_cache_mode")).scalar() == "force_custom_plan"
        session.rollback()
    return found, scans, rows


def test_the_early_rows_read_keeps_an_index_plan_made_on_an_empty_table(
        empty_case_events: str) -> None:
    sql_engine = make_engine(empty_case_events)
    try:
        found, scans, rows = early_rows_after_growth(sql_engine)
        assert found == 100
        assert rows == 0, scans
    finally:
        sql_engine.dispose()
