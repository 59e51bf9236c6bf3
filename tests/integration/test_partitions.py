"""Monthly partitions of the growing tables (migration 0021, shared/db/partitions.py):
the migration keeps every row of a database with data while a writer goes on, the unique
keys hold across months (also between two transactions at once), partitions are created
ahead, and retention archives then drops an old partition whole, sweeps one a kept case
is still in, deletes row by row in the one that straddles the cutoff, and touches nothing
newer."""

from __future__ import annotations

import gzip
import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any, cast

import pytest
from alembic import command
from sqlalchemy import Engine, Table, text
from sqlalchemy.exc import IntegrityError

from shared.db.bulk import bulk_insert_claiming
from shared.db.case_log import INSERT_EVENTS
from shared.db.migrate import alembic_config, upgrade
from shared.db.models import (
    CaseEventRow,
    DecisionIdRow,
    DecisionRow,
    EventIdRow,
    NotificationKeyRow,
    NotificationRow,
)
from shared.db.notifications import INSERT_NOTIFICATIONS
from shared.db.outbox import INSERT_DECISIONS
from shared.db.partitions import (
    DEFAULT_MONTHS_AHEAD,
    PARTITIONED,
    add_index_concurrently,
    create_partition,
    ensure_partitions,
    list_partitions,
    month_start,
    next_month,
    partition_history_by_month,
    partition_name,
)
from shared.db.retention import Archive, RetentionPolicy, run_retention
from shared.db.session import Database, make_engine
from tests.conftest import PG_ADMIN_URL, RUN_ID
from tests.resources import unmigrated_database

pytestmark = pytest.mark.integration

KEYS = {"cases": "case_id", "case_events": "event_id", "deadlines": "id",
        "decisions": "decision_id", "notifications": "id", "outbox": "id"}


@pytest.fixture
def fresh_database() -> Iterator[tuple[str, Engine]]:
    """A database of its own (its partitions are rearranged by the tests)."""
    name = f"aftersales_test_{RUN_ID}_part_{uuid.uuid4().hex[:4]}"
    with unmigrated_database(PG_ADMIN_URL, name) as database:
        yield database


# Columns added by later migrations (each NULL on the rows from before; their own tests
# say so): left out, so a fingerprint taken before them can be compared with one after.
LATER_COLUMNS = "'records_since'"


def fingerprint(engine: Engine) -> dict[str, tuple[int, str]]:
    """Per table: the row count and an md5 of every row (as JSON, in key order)."""
    out = {}
    with engine.connect() as conn:
        for table, key in KEYS.items():
            count, digest = conn.execute(text(
                f"SELECT count(*), md5(coalesce(string_agg("
                f"(to_jsonb(t) - {LATER_COLUMNS})::text, '\n' "
                f"ORDER BY t.{key}), '')) FROM {table} t")).one()
            out[table] = (int(count), str(digest))
    return out


LOAD_0019 = """
    INSERT INTO cases (case_id, platform, shop_id, order_id, kind, status, step, version,
                       rule_set, rule_version, opened_at, closed_at, snapshot)
    SELECT 'C' || g, 'kuaishou', 'S', 'O' || g, 'refund_only',
           CASE WHEN g % 2 = 0 THEN 'closed' ELSE 'open' END, 'x', 1, 'r', '1',
           now() - make_interval(days => g % 400),
           CASE WHEN g % 2 = 0 THEN now() - make_interval(days => g % 300) END,
           jsonb_build_object('case_id', 'C' || g)
    FROM generate_series(1, 3000) g;
    INSERT INTO case_events (event_id, case_id, type, occurred_at, received_at, outcome,
                             body, body_sha256)
    SELECT 'e' || g, 'C' || (g % 3000 + 1), 'case.opened', now(),
           now() - make_interval(days => g % 400, secs => g), 'applied',
           jsonb_build_object('n', g), md5(g::text)
    FROM generate_series(1, 9000) g;
    INSERT INTO deadlines (case_id, step, purpose, action, party, due_at, deadline_at, fence,
                           rule_set, rule_version, rule_id, status, created_at)
    SELECT 'C' || (g % 3000 + 1), 's', 'deadline', 'a', 'merchant', now(), now(), 1, 'r',
           '1', 'id', CASE WHEN g % 3 = 0 THEN 'pending' ELSE 'cancelled' END,
           now() - make_interval(days => g % 400)
    FROM generate_series(1, 6000) g;
    INSERT INTO decisions (decision_id, case_id, type, step, decided_at, body)
    SELECT 'd' || g, 'C' || (g % 3000 + 1), 'decision.auto_approved', 's',
           now() - make_interval(days => g % 400), '{}'
    FROM generate_series(1, 3000) g;
    INSERT INTO notifications (dedup_key, case_id, reason, party, channel, recipient,
                               template, params, status, created_at)
    SELECT 'n' || g, 'C' || (g % 3000 + 1), 'r', 'buyer', 'sms', '138', 't', '{}', 'sent',
           now() - make_interval(days => g % 400)
    FROM generate_series(1, 3000) g;
    INSERT INTO outbox (exchange, routing_key, message_id, body, headers)
    SELECT 'x', 'k', 'd' || g, '\\x00', '{}' FROM generate_series(1, 100) g;
"""


def test_migration_keeps_every_row_while_a_writer_goes_on(
        fresh_database: tuple[str, Engine]) -> None:
    url, engine = fresh_database
    upgrade(url, "0020")
    with engine.begin() as conn:
        for statement in LOAD_0019.split(";"):
            if statement.strip():
                conn.execute(text(statement))
    before = fingerprint(engine)

    # A writer inserting events the whole time (as intake does: no ON CONFLICT target).
    written: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        try:
            i = 0
            while not stop.is_set():
                i += 1
                with engine.begin() as conn:
                    conn.execute(text(
                        "INSERT INTO case_events (event_id, case_id, type, occurred_at, "
                        "outcome, body) VALUES (:e, 'C1', 'buyer.modified', now(), "
                        "'applied', '{}') ON CONFLICT DO NOTHING"), {"e": f"w{i}"})
                written.append(f"w{i}")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        upgrade(url)
    finally:
        stop.set()
        thread.join(30)
    assert errors == []
    assert len(written) > 0

    with engine.connect() as conn:
        conn.execute(text("DELETE FROM case_events WHERE event_id LIKE 'w%'"))
        conn.commit()
        partitions = {table.table: list_partitions(conn, table.table)
                      for table in PARTITIONED}
        this_month = month_start(conn.execute(text("SELECT now()")).scalar_one())
        conn.rollback()
    after = fingerprint(engine)
    assert after == before
    horizon = this_month
    for _ in range(DEFAULT_MONTHS_AHEAD):
        horizon = next_month(horizon)
    for table, found in partitions.items():
        names = [p.name for p in found]
        assert names[0] == f"{table}_history" and names[-1] == f"{table}_default"
        # The months follow the history without a gap, up to three months after this one
        # (the switch is a month boundary two days ahead: near a month's end, the next).
        months = found[1:-1]
        assert months, names
        assert months[0].lower == found[0].upper
        assert all(a.upper == b.lower for a, b in pairwise(months))
        assert months[-1].lower is not None and months[-1].lower >= horizon, names
    # The keys of every row are claimed, so the old rows still stop duplicates.
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM event_ids")).scalar() == 9000
        assert conn.execute(text(  # with the content hash intake checks
            "SELECT count(*) FROM event_ids k JOIN case_events e USING (event_id) "
            "WHERE k.body_sha256 = e.body_sha256")).scalar() == 9000
        assert conn.execute(text("SELECT count(*) FROM decision_ids")).scalar() == 3000
        assert conn.execute(text("SELECT count(*) FROM notification_keys")).scalar() == 3000
        inserted = _EVENT.execute(conn, [
            {"event_id": e, "case_id": "C2", "type": "case.opened", "occurred_at": _in_days(0),
             "outcome": "applied", "body": {}, "received_at": _in_days(days)}
            for e, days in (("e1", 45), ("e-new", 0))]).scalars().all()
        assert inserted == ["e-new"]
        conn.rollback()

    command.downgrade(alembic_config(url), "0020")
    assert fingerprint(engine) == before
    upgrade(url)
    assert fingerprint(engine) == before


# The services' insert statements, with the partition key given (it defaults to now()),
# so that a test can put the same key in two months' partitions.
_EVENT = bulk_insert_claiming(
    cast(Table, CaseEventRow.__table__),
    ["event_id", "case_id", "type", "occurred_at", "outcome", "body", "received_at"],
    cast(Table, EventIdRow.__table__), ["event_id"], "RETURNING event_id")
_DECISION = bulk_insert_claiming(
    cast(Table, DecisionRow.__table__),
    ["decision_id", "case_id", "type", "step", "decided_at", "body"],
    cast(Table, DecisionIdRow.__table__), ["decision_id"], "RETURNING decision_id")
_NOTIFICATION = bulk_insert_claiming(
    cast(Table, NotificationRow.__table__),
    ["dedup_key", "case_id", "reason", "party", "channel", "recipient", "template", "params",
     "created_at"], cast(Table, NotificationKeyRow.__table__), ["dedup_key"],
    "RETURNING dedup_key")


def _in_days(days: int) -> datetime:
    return datetime.now(UTC) + timedelta(days=days)


def _partition_of(conn: Any, table: str, at: datetime) -> str:
    return next(p.name for p in list_partitions(conn, table) if not p.is_default
                and (p.lower is None or p.lower <= at) and (p.upper is None or at < p.upper))


def test_the_services_statements_claim_their_keys() -> None:
    """What makes the rows of the three partitioned tables unique is that their writers'
    statements claim the key; a plain INSERT would not."""
    for statement, key_table in ((INSERT_EVENTS, "event_ids"),
                                 (INSERT_DECISIONS, "decision_ids"),
                                 (INSERT_NOTIFICATIONS, "notification_keys")):
        assert f"INSERT INTO {key_table}" in statement.statement.text


def test_a_key_is_unique_across_months_also_between_two_transactions(
        db: Database) -> None:
    """The same event id in two months' partitions at once: the second transaction waits
    for the first, then inserts nothing (as a unique index would do)."""
    def event(days: int) -> dict[str, Any]:
        return {"event_id": "same", "case_id": "C", "type": "case.opened",
                "occurred_at": _in_days(0), "outcome": "applied", "body": {},
                "received_at": _in_days(days)}

    second: list[list[str]] = []
    with db.sql_engine.connect() as first:
        assert list(_EVENT.execute(first, [event(0)]).scalars()) == ["same"]

        def other() -> None:
            with db.sql_engine.begin() as conn:
                second.append(list(_EVENT.execute(conn, [event(45)]).scalars()))

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()  # waiting for the first
        first.commit()
        thread.join(30)
    assert second == [[]]
    with db.transaction() as s:
        assert s.execute(text("SELECT count(*) FROM case_events "
                              "WHERE event_id = 'same'")).scalar() == 1
        # The two times are in different partitions: no unique index could have stopped it.
        assert _partition_of(s.connection(), "case_events", _in_days(0)) != _partition_of(
            s.connection(), "case_events", _in_days(45))
    # The same for decisions and notifications, and twice within one statement.
    with db.transaction() as s:
        for days in (0, 45):
            _DECISION.execute(s.connection(), [
                {"decision_id": "d1", "case_id": "C", "type": "t", "step": "s",
                 "decided_at": _in_days(days), "body": {}}] * 2)
            _NOTIFICATION.execute(s.connection(), [
                {"dedup_key": "n1", "case_id": "C", "reason": "r", "party": "buyer",
                 "channel": "sms", "recipient": "1", "template": "t", "params": {},
                 "created_at": _in_days(days)}] * 2)
    with db.transaction() as s:
        assert s.execute(text("SELECT count(*) FROM decisions")).scalar() == 1
        assert s.execute(text("SELECT count(*) FROM notifications")).scalar() == 1
        # A row deleted releases its key: the id may come again.
        s.execute(text("DELETE FROM decisions WHERE decision_id = 'd1'"))
        assert s.execute(text("SELECT count(*) FROM decision_ids")).scalar() == 0
        assert list(_DECISION.execute(s.connection(), [
            {"decision_id": "d1", "case_id": "C", "type": "t", "step": "s",
             "decided_at": _in_days(45), "body": {}}]).scalars()) == ["d1"]


def test_partitions_are_created_ahead(fresh_database: tuple[str, Engine]) -> None:
    url, engine = fresh_database
    upgrade(url)
    db = Database(make_engine(url))
    try:
        first = ensure_partitions(db, months_ahead=8)
        again = ensure_partitions(db, months_ahead=8)
        with engine.connect() as conn:
            now = conn.execute(text("SELECT now()")).scalar_one()
            covered = {spec.table: list_partitions(conn, spec.table) for spec in PARTITIONED}
    finally:
        db.sql_engine.dispose()
    assert first.created and again.created == [] and not first.failed
    assert first.default_rows == dict.fromkeys(covered, 0)
    horizon = month_start(now)
    for _ in range(9):
        horizon = next_month(horizon)
    for table, partitions in covered.items():
        months = [p for p in partitions if not p.is_default]
        assert months[-1].upper == horizon, table  # up to the end of the 8th month ahead
        for earlier, later in pairwise(months):
            assert earlier.upper == later.lower  # no gap


def _partition_indexes(conn: Any, index: str) -> dict[str, bool]:
    """Partition -> whether its index attached to the parent `index` is valid."""
    return {str(table): bool(valid) for table, valid in conn.execute(text("""
        SELECT x.indrelid::regclass::text, x.indisvalid FROM pg_inherits i
          JOIN pg_index x ON x.indexrelid = i.inhrelid
         WHERE i.inhparent = to_regclass(:n)"""), {"n": index})}


def test_an_index_is_added_to_every_partition_without_a_blocking_build(
        fresh_database: tuple[str, Engine]) -> None:
    """`add_index_concurrently` (what a migration uses for a new index of a partitioned
    table): it replaces a half-built partition index left by a failed run, attaches one
    per partition, the parent's is then valid, a partition made later has one too, and a
    second run changes nothing."""
    url, engine = fresh_database
    upgrade(url)
    name, spec = "ix_test_case_events_type", "(type)"
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(
            "INSERT INTO case_events (event_id, case_id, type, occurred_at, outcome, body) "
            "SELECT 'e' || g, 'C', 'same', now(), 'applied', '{}' "
            "FROM generate_series(1, 50) g"))
        current = conn.execute(text("SELECT tableoid::regclass::text FROM case_events "
                                    "LIMIT 1")).scalar_one()  # the rows' partition
        # A failed concurrent build leaves its index behind, invalid.
        with pytest.raises(IntegrityError):
            conn.execute(text(f"CREATE UNIQUE INDEX CONCURRENTLY {name}_{current} "
                              f"ON {current} (type)"))
        assert conn.execute(text("SELECT indisvalid FROM pg_index WHERE indexrelid = "
                                 "to_regclass(:n)"), {"n": f"{name}_{current}"}).scalar() is False

        add_index_concurrently(conn, name, "case_events", spec)
        partitions = {p.name for p in list_partitions(conn, "case_events")}
        assert _partition_indexes(conn, name) == dict.fromkeys(partitions, True)
        assert conn.execute(text("SELECT indisvalid, indisunique FROM pg_index "
                                 "WHERE indexrelid = to_regclass(:n)"), {"n": name}
                            ).one() == (True, False)
        add_index_concurrently(conn, name, "case_events", spec)  # again: nothing to do
        later = datetime(2100, 1, 1, tzinfo=UTC)
        create_partition(conn, "case_events", "case_events_p210001", later, next_month(later))
        assert _partition_indexes(conn, name) == dict.fromkeys(
            {*partitions, "case_events_p210001"}, True)


def _add_case(engine: Engine, case_id: str, at: datetime, closed: datetime | None) -> None:
    """A case whose event, deadline, decision and notification all date from `at`."""
    p: dict[str, Any] = {"c": case_id, "at": at, "closed": closed,
                         "status": "open" if closed is None else "closed"}
    with engine.begin() as conn:
        conn.execute(text("""
            INSERT INTO cases (case_id, platform, shop_id, order_id, kind, status, step,
                               version, rule_set, rule_version, opened_at, closed_at, snapshot)
            VALUES (:c, 'kuaishou', 'S', 'O', 'refund_only', :status, 'x', 1, 'r', '1', :at,
                    :closed, '{}')"""), p)
        conn.execute(text("""
            INSERT INTO case_events (event_id, case_id, type, occurred_at, received_at,
                                     outcome, body)
            SELECT :c || '-e' || i, :c, 'case.opened', :at, :at, 'applied',
                   '{"buyer": "13800000000"}' FROM generate_series(1, 2) i"""), p)
        # The keys, as the services' insert statements claim them.
        conn.execute(text("INSERT INTO event_ids (event_id) SELECT :c || '-e' || i "
                          "FROM generate_series(1, 2) i"), p)
        conn.execute(text("INSERT INTO decision_ids (decision_id) VALUES ('d-' || :c)"), p)
        conn.execute(text("INSERT INTO notification_keys (dedup_key) VALUES ('n-' || :c)"), p)
        conn.execute(text("""
            INSERT INTO deadlines (case_id, step, purpose, action, party, due_at, deadline_at,
                                   fence, rule_set, rule_version, rule_id, status, created_at)
            VALUES (:c, 's', 'deadline', 'a', 'merchant', :at, :at, 1, 'r', '1', 'r1',
                    CASE WHEN :status = 'open' THEN 'pending' ELSE 'cancelled' END, :at)"""),
            p)
        conn.execute(text("""
            INSERT INTO decisions (decision_id, case_id, type, step, decided_at, body)
            VALUES ('d-' || :c, :c, 't', 's', :at, '{}')"""), p)
        conn.execute(text("""
            INSERT INTO notifications (dedup_key, case_id, reason, party, channel,
                                       recipient, template, params, status, created_at)
            VALUES ('n-' || :c, :c, 'r', 'buyer', 'sms', '138', 't', '{}', 'sent', :at)"""),
            p)


def _rows(engine: Engine) -> dict[tuple[str, str], str]:
    """(table, case) -> the partition the case's row is in, for the partitioned tables
    and `deadlines` (not partitioned: removed row by row with its case)."""
    out = {}
    with engine.connect() as conn:
        for table in [spec.table for spec in PARTITIONED] + ["deadlines"]:
            for case_id, partition in conn.execute(text(
                    f"SELECT DISTINCT case_id, tableoid::regclass::text FROM {table}")):
                out[(table, case_id)] = partition
    return out


def _archived(folder: Path) -> set[tuple[str, str]]:
    found = set()
    for path in folder.rglob("*.jsonl.gz"):
        table = path.name.removesuffix(".jsonl.gz").split("-", 1)[1]
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                found.add((table, json.loads(line)["case_id"]))
    return found


def test_retention_drops_an_old_partition_after_archiving_it(
        fresh_database: tuple[str, Engine], tmp_path: Path) -> None:
    url, engine = fresh_database
    upgrade(url)
    with engine.connect() as conn:
        now: datetime = conn.execute(text("SELECT now()")).scalar_one()
    this_month = month_start(now)
    months = [this_month]
    for _ in range(4):  # the four months before this one
        months.insert(0, month_start(months[0] - timedelta(days=1)))
    m4, m3, m2, _m1, _m0 = months
    with engine.begin() as conn:
        partition_history_by_month(conn, m4)
    # The cutoff in the middle of month m2: m4 and m3 are old, m2 straddles it.
    cutoff = m2 + timedelta(days=15)
    retention_days = (now - cutoff).days
    day = timedelta(days=1)
    _add_case(engine, "A", m4 + 10 * day, closed=m4 + 20 * day)  # due; alone in m4
    _add_case(engine, "B", m3 + 5 * day, closed=None)  # open: keeps m3
    _add_case(engine, "C", m3 + 8 * day, closed=m3 + 20 * day)  # due; in m3 with B
    _add_case(engine, "D", m2 + 2 * day, closed=m2 + 5 * day)  # due; straddling month
    _add_case(engine, "E", m2 + 3 * day, closed=now - 3 * day)  # closed lately: kept
    _add_case(engine, "F", now - day, closed=None)  # this month, open
    before = _rows(engine)

    db = Database(make_engine(url))
    try:
        report = run_retention(db, RetentionPolicy(retention_days, retention_days, 100),
                               Archive(tmp_path))
    finally:
        db.sql_engine.dispose()

    tables = [spec.table for spec in PARTITIONED]
    assert report.cases == 3
    assert sorted(report.partitions_dropped) == sorted(
        [partition_name(t, m4) for t in tables] + [f"{t}_history" for t in tables])
    assert sorted(report.partitions_kept) == sorted(partition_name(t, m3) for t in tables)
    after = _rows(engine)
    # Exactly the due cases' rows went, each archived, and what stays did not move.
    assert set(after) == {key for key in before if key[1] in ("B", "E", "F")}
    assert all(after[key] == before[key] for key in after)
    assert _archived(tmp_path) == {key for key in before if key[1] in ("A", "C", "D")} | {
        ("cases", c) for c in ("A", "C", "D")}
    with engine.connect() as conn:
        gone = conn.execute(text(
            "SELECT to_regclass(:n) IS NULL"), {"n": partition_name("case_events", m4)})
        assert gone.scalar()
        ids = set(conn.execute(text("SELECT event_id FROM event_ids")).scalars())
        assert ids == {f"{c}-e{i}" for c in "BEF" for i in (1, 2)}  # released with rows
        assert set(conn.execute(text("SELECT decision_id FROM decision_ids")).scalars()) == {
            "d-B", "d-E", "d-F"}


def test_a_drop_that_cannot_get_its_lock_waits_for_the_next_run(
        fresh_database: tuple[str, Engine], tmp_path: Path) -> None:
    """A long query on `case_events` holds the lock DROP needs: retention gives up on
    those partitions after its lock_timeout (archived, not dropped, nothing lost) instead
    of queueing every writer behind it, and drops them on the next run."""
    url, engine = fresh_database
    upgrade(url)
    with engine.connect() as conn:
        now: datetime = conn.execute(text("SELECT now()")).scalar_one()
    old_month = month_start(month_start(month_start(now) - timedelta(days=1))
                            - timedelta(days=1))  # two months back
    with engine.begin() as conn:
        partition_history_by_month(conn, old_month)
    _add_case(engine, "A", old_month + timedelta(days=3), closed=old_month + timedelta(days=5))
    retention_days = (now - next_month(old_month)).days  # the old month is past the cutoff
    db = Database(make_engine(url))
    try:
        with engine.connect() as reader:
            reader.execute(text("SELECT count(*) FROM case_events")).scalar()  # lock held
            first = run_retention(db, RetentionPolicy(retention_days, retention_days, 100),
                                  Archive(tmp_path / "first"))
            reader.rollback()
        second = run_retention(db, RetentionPolicy(retention_days, retention_days, 100),
                               Archive(tmp_path / "second"))
    finally:
        db.sql_engine.dispose()
    old_events = partition_name("case_events", old_month)
    assert first.partitions_deferred == ["case_events_history", old_events]
    assert old_events not in first.partitions_dropped
    assert partition_name("decisions", old_month) in first.partitions_dropped
    assert ("case_events", "A") in _archived(tmp_path / "first")  # archived all the same
    assert second.partitions_dropped == ["case_events_history", old_events]
    assert ("case_events", "A") in _archived(tmp_path / "second")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM case_events")).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM event_ids")).scalar() == 0
