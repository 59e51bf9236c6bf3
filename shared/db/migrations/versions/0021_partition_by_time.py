"""partition case_events, decisions and notifications by month

Revision ID: 0021
Revises: 0020
Create Date: 2026-11-27 20:00:00

docs/design.md "Partitioning by time". Per table, without blocking writes for more than
a moment (each exclusive lock is taken with a lock_timeout and tried again):
1. the key that must stay unique across months (`event_id`, `decision_id`, `dedup_key`)
   gets its narrow key table, kept in step by a trigger on the old table (installed
   first) and back-filled in key order, a few thousand keys per transaction;
2. a switch time T (a month boundary at least two days ahead, and after every row's
   time) and `CHECK (time < T)` added NOT VALID, then VALIDATEd (writes go on);
3. the unique index (key, time) a partition of the new table needs, built CONCURRENTLY;
4. one short transaction: the old table (and its indexes) renamed `<table>_history`, the
   partitioned table created under the old name with the same columns and indexes (its
   writers claim keys in their insert statements; a trigger only releases the key of a
   deleted row), and the old table ATTACHed as its partition [MINVALUE, T): the validated
   CHECK lets PostgreSQL skip the scan, and the old indexes are attached, not rebuilt;
5. a DEFAULT partition, and the month partitions from T for the next three months.
Every step looks at what is there first, so a run that stopped half-way is run again.
The statements go through an engine of their own (autocommit, each transaction
explicit): Alembic's transaction holds nothing on these tables.

Downgrade copies each table back into a plain one (blocking: for going back in a test or
an emergency, not for a live system with a year of data).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

import sqlalchemy as sa
from alembic import op
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import OperationalError

revision: str = '0021'
down_revision: str | None = '0020'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONTHS_AHEAD = 3
BACKFILL_BATCH = 5000
LOCK_ATTEMPTS = 20


class Spec(NamedTuple):
    table: str
    column: str  # partition key
    pk: str  # the old primary key column; the new primary key is (pk, column)
    key: str | None = None  # unique across partitions, in key_table
    key_table: str | None = None
    key_type: str = ""
    serial: bool = False  # id from <table>_id_seq
    old_unique: str | None = None  # the old unique constraint on `key`, if not the PK
    # Copied into the key table with the key: intake's duplicate check reads it there
    # (one index probe instead of one per partition).
    key_extra: str | None = None
    key_extra_type: str = ""


SPECS = (
    Spec("case_events", "received_at", "event_id", "event_id", "event_ids",
         "varchar(256)", key_extra="body_sha256", key_extra_type="varchar(64)"),
    Spec("decisions", "decided_at", "decision_id", "decision_id", "decision_ids",
         "varchar(64)"),
    Spec("notifications", "created_at", "id", "dedup_key", "notification_keys",
         "varchar(128)", serial=True, old_unique="uq_notifications_dedup_key"),
)


def _key_functions(s: Spec) -> list[str]:
    """The key table and its triggers' functions: claim the key when a row goes into the
    old table (while it is back-filled), release it when the row is deleted, forget them
    all on TRUNCATE."""
    extra = f"{s.key_extra} {s.key_extra_type}, " if s.key_extra else ""
    columns = f"{s.key}, {s.key_extra}" if s.key_extra else s.key
    values = f"NEW.{s.key}, NEW.{s.key_extra}" if s.key_extra else f"NEW.{s.key}"
    return [
        f"CREATE TABLE IF NOT EXISTS {s.key_table} ({s.key} {s.key_type} NOT NULL, "
        f"{extra}CONSTRAINT pk_{s.key_table} PRIMARY KEY ({s.key}))",
        # Only on the old table, which still has its unique index on the key (that is
        # what skips a duplicate there): the row always goes on, whether its key was
        # claimed here or by the writer's own statement.
        f"""CREATE OR REPLACE FUNCTION {s.key_table}_claim() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
              INSERT INTO {s.key_table} ({columns}) VALUES ({values}) ON CONFLICT DO NOTHING;
              RETURN NEW;
            END $$""",
        f"""CREATE OR REPLACE FUNCTION {s.key_table}_release() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
              DELETE FROM {s.key_table} WHERE {s.key} = OLD.{s.key};
              RETURN NULL;
            END $$""",
        f"""CREATE OR REPLACE FUNCTION {s.key_table}_forget_all() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
              TRUNCATE {s.key_table};
              RETURN NULL;
            END $$""",
    ]


def _row_triggers(s: Spec, table: str, claim: bool = True) -> list[str]:
    """The claim trigger keeps the key table in step while the old table still takes
    writes of the services from before this revision (its backfill runs meanwhile); the
    partitioned table has none: its writers claim their keys in the insert statement
    itself (`shared.db.bulk.bulk_insert_claiming`), set-based, which a trigger per row
    cost several times over. Deleting a row still releases its key."""
    return [
        *([f"CREATE TRIGGER {s.key_table}_claim BEFORE INSERT ON {table} "
           f"FOR EACH ROW EXECUTE FUNCTION {s.key_table}_claim()"] if claim else []),
        f"CREATE TRIGGER {s.key_table}_release AFTER DELETE ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION {s.key_table}_release()",
    ]


def _drop_row_triggers(s: Spec, table: str) -> list[str]:
    return [f"DROP TRIGGER IF EXISTS {s.key_table}_claim ON {table}",
            f"DROP TRIGGER IF EXISTS {s.key_table}_release ON {table}"]


def _scalar(engine: Engine, sql: str, **params: object) -> object:
    with engine.connect() as conn:
        value = conn.execute(text(sql), params).scalar()
        conn.rollback()
    return value


def _is_partitioned(engine: Engine, table: str) -> bool:
    return bool(_scalar(engine, "SELECT relkind = 'p' FROM pg_class "
                        "WHERE oid = to_regclass(:t)", t=table))


def _in_short_transaction(engine: Engine, statements: Sequence[str]) -> None:
    """Run the statements in one transaction whose locks are never waited for long;
    if one is not granted at once, roll back and try again a little later."""
    for attempt in range(LOCK_ATTEMPTS):
        try:
            with engine.begin() as conn:
                conn.execute(text("SET LOCAL lock_timeout = '3s'"))
                for statement in statements:
                    conn.execute(text(statement))
            return
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != "55P03" or attempt == LOCK_ATTEMPTS - 1:
                raise
            time.sleep(min(0.2 * (attempt + 1), 2.0))


def _backfill_keys(engine: Engine, s: Spec) -> None:
    after = ""
    while True:
        with engine.begin() as conn:
            keys = list(conn.execute(text(
                f"SELECT {s.key} FROM {s.table} WHERE {s.key} > :after ORDER BY {s.key} "
                f"LIMIT :n"), {"after": after, "n": BACKFILL_BATCH}).scalars())
            if not keys:
                return
            columns = f"{s.key}, {s.key_extra}" if s.key_extra else s.key
            conn.execute(text(
                f"INSERT INTO {s.key_table} ({columns}) SELECT {columns} FROM {s.table} "
                f"WHERE {s.key} = ANY(:keys) ON CONFLICT DO NOTHING"), {"keys": keys})
        after = keys[-1]


def _switch_time(engine: Engine, s: Spec) -> str:
    """A month boundary at least two days ahead (the rows written meanwhile must still
    fit the CHECK) and after every row already there."""
    return str(_scalar(engine, f"""
        SELECT to_char(greatest(
                 date_trunc('month', now() + interval '2 days', 'UTC') + interval '1 month',
                 date_trunc('month', max({s.column}), 'UTC') + interval '1 month')
               AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"')
        FROM {s.table}"""))


def _build_unique_index(engine: Engine, name: str, definition: str) -> None:
    valid = _scalar(engine, "SELECT i.indisvalid FROM pg_index i JOIN pg_class c "
                    "ON c.oid = i.indexrelid WHERE c.oid = to_regclass(:n)", n=name)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if valid is False:  # a concurrent build that failed half-way
            conn.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {name}"))
        conn.execute(text(f"CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {name} "
                          f"ON {definition}"))


def _old_indexes(conn: Connection, table: str) -> list[tuple[str, str, bool]]:
    """(name, CREATE INDEX statement, is unique or primary) of the table's indexes."""
    return [(r[0], r[1], bool(r[2])) for r in conn.execute(text("""
        SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indisunique
          FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE i.indrelid = to_regclass(:t) ORDER BY c.relname"""), {"t": table}).all()]


def _partition(engine: Engine, s: Spec) -> None:
    if s.key is not None:
        _in_short_transaction(engine, [
            *_key_functions(s), *_drop_row_triggers(s, s.table), *_row_triggers(s, s.table)])
        _backfill_keys(engine, s)
    switch = _switch_time(engine, s)
    check = f"ck_{s.table}_before_partitioning"
    exists = _scalar(engine, "SELECT count(*) FROM pg_constraint WHERE conname = :n", n=check)
    if not exists:
        _in_short_transaction(engine, [
            f"ALTER TABLE {s.table} ADD CONSTRAINT {check} "
            f"CHECK ({s.column} < '{switch}') NOT VALID"])
    else:  # an earlier run's switch time
        switch = str(_scalar(engine, f"""
            SELECT substring(pg_get_constraintdef(oid) from '''([^'']+)''')
              FROM pg_constraint WHERE conname = :n""", n=check))
        switch = str(_scalar(engine, "SELECT to_char(CAST(:t AS timestamptz) AT TIME ZONE "
                             "'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"+00:00\"')", t=switch))
    with engine.begin() as conn:  # SHARE UPDATE EXCLUSIVE: writes go on while it scans
        conn.execute(text(f"ALTER TABLE {s.table} VALIDATE CONSTRAINT {check}"))
    history = f"{s.table}_history"
    by_time = f"{history}_{s.pk}_{s.column}"
    _build_unique_index(engine, by_time, f"{s.table} ({s.pk}, {s.column})")

    with engine.connect() as conn:
        indexes = _old_indexes(conn, s.table)
        conn.rollback()
    parent_indexes = [definition for name, definition, unique in indexes
                      if not unique and name != by_time]
    swap = [f"LOCK TABLE {s.table} IN ACCESS EXCLUSIVE MODE"]
    swap += [f"ALTER INDEX {name} RENAME TO {name}_history" for name, _d, _u in indexes
             if name != by_time]
    swap += [
        f"ALTER TABLE {s.table} RENAME TO {history}",
        f"CREATE TABLE {s.table} (LIKE {history} INCLUDING DEFAULTS) "
        f"PARTITION BY RANGE ({s.column})",
        f"ALTER TABLE {s.table} ADD CONSTRAINT pk_{s.table} PRIMARY KEY ({s.pk}, {s.column})",
        *parent_indexes,  # the old statements, naming the new table now
        f"ALTER TABLE {history} ADD CONSTRAINT uq_{history}_{s.pk}_{s.column} "
        f"UNIQUE USING INDEX {by_time}",
    ]
    if s.serial:
        swap.append(f"ALTER SEQUENCE {s.table}_id_seq OWNED BY {s.table}.id")
    if s.key is not None:
        swap += _drop_row_triggers(s, history)
        swap += _row_triggers(s, s.table, claim=False)
        swap.append(f"CREATE TRIGGER {s.key_table}_forget_all AFTER TRUNCATE ON {s.table} "
                    f"FOR EACH STATEMENT EXECUTE FUNCTION {s.key_table}_forget_all()")
    swap += [
        f"ALTER TABLE {s.table} ATTACH PARTITION {history} "
        f"FOR VALUES FROM (MINVALUE) TO ('{switch}')",
        f"CREATE TABLE {s.table}_default PARTITION OF {s.table} DEFAULT",
    ]
    _in_short_transaction(engine, swap)
    _months_ahead(engine, s, switch)


def _months_ahead(engine: Engine, s: Spec, switch: str) -> None:
    months = list(map(str, _scalars(engine, f"""
        SELECT to_char(m AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"')
          FROM generate_series(CAST(:switch AS timestamptz),
                               date_trunc('month', now(), 'UTC')
                                 + make_interval(months => {MONTHS_AHEAD}),
                               interval '1 month') AS m""", switch=switch)))
    for start in months:
        end = str(_scalar(engine, "SELECT to_char((CAST(:s AS timestamptz) + interval "
                          "'1 month') AT TIME ZONE 'UTC', "
                          "'YYYY-MM-DD\"T\"HH24:MI:SS\"+00:00\"')", s=start))
        name = f"{s.table}_p{start[:4]}{start[5:7]}"
        _in_short_transaction(engine, [
            f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {s.table} "
            f"FOR VALUES FROM ('{start}') TO ('{end}')"])


def _scalars(engine: Engine, sql: str, **params: object) -> list[object]:
    with engine.connect() as conn:
        values = list(conn.execute(text(sql), params).scalars())
        conn.rollback()
    return values


def _own_engine() -> Engine:
    return create_engine(op.get_bind().engine.url)


def upgrade() -> None:
    # Commits what the migrations before this one did, so the own engine sees it.
    with op.get_context().autocommit_block():
        engine = _own_engine()
        try:
            for s in SPECS:
                if not _is_partitioned(engine, s.table):
                    _partition(engine, s)
        finally:
            engine.dispose()


# -- downgrade: back to one plain table each (blocking) --------------------------------

def _downgrade_table(conn: Connection, s: Spec) -> None:
    indexes = [d.replace(" ON ONLY ", " ON ") for name, d, unique in _old_indexes(
        conn, s.table) if not unique]
    conn.execute(text(f"CREATE TABLE {s.table}_flat (LIKE {s.table} INCLUDING DEFAULTS)"))
    conn.execute(text(f"INSERT INTO {s.table}_flat SELECT * FROM {s.table}"))
    if s.serial:
        conn.execute(text(f"ALTER SEQUENCE {s.table}_id_seq OWNED BY {s.table}_flat.id"))
    conn.execute(text(f"DROP TABLE {s.table}"))  # and its partitions
    conn.execute(text(f"ALTER TABLE {s.table}_flat RENAME TO {s.table}"))
    conn.execute(text(f"ALTER TABLE {s.table} ADD CONSTRAINT pk_{s.table} "
                      f"PRIMARY KEY ({s.pk})"))
    if s.old_unique:
        conn.execute(text(f"ALTER TABLE {s.table} ADD CONSTRAINT {s.old_unique} "
                          f"UNIQUE ({s.key})"))
    for definition in indexes:
        conn.execute(text(definition))
    if s.key is not None:
        conn.execute(text(f"DROP TABLE IF EXISTS {s.key_table}"))
        for fn in ("claim", "release", "forget_all"):
            conn.execute(text(f"DROP FUNCTION IF EXISTS {s.key_table}_{fn}()"))


def downgrade() -> None:
    conn = op.get_bind()
    for s in SPECS:
        partitioned = conn.execute(sa.text(
            "SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass(:t)"),
            {"t": s.table}).scalar()
        if partitioned:
            _downgrade_table(conn, s)
