"""Monthly time partitions of the tables that grow with traffic (docs/design.md
"Partitioning by time").

Partitioned by RANGE on a time set once at insert (a row never moves):
- `case_events` by `received_at`, `decisions` by `decided_at`, `notifications` by
  `created_at`.
`cases` (one row per case, updated in place), `deadlines` (updated in place until fired
or stale, then removed with their case; found by id and by due time, neither of which
prunes by creation time: partitioned, every timer claim and every fence check probed one
index per month), `outbox` (only the unpublished backlog),
`case_notes` and `case_event_conflicts` (small) are not partitioned.

Each partitioned table has:
- `<table>_history`: the table as it was before partitioning (migration 0021), for
  everything before the switch time; it ages out by retention like any other partition;
- `<table>_pYYYYMM`: one per calendar month (UTC), created ahead by `ensure_partitions`
  (at migrate time, and by every `aftersales retention run`);
- `<table>_default`: catches a row no month partition takes (an insert never fails for
  lack of a partition); it should stay empty and `ensure_partitions` reports its rows.

A unique key that must hold across months (`event_id`, `decision_id`, `dedup_key`) cannot
be a unique index of the partitioned table (PostgreSQL requires the partition key in it),
so it lives in a narrow unpartitioned key table. The services' insert statements claim
the key there (`shared.db.bulk.bulk_insert_claiming`: `INSERT ... ON CONFLICT DO NOTHING
RETURNING` in the same statement) and skip the row when the key was already claimed (the
same as `ON CONFLICT DO NOTHING`, RETURNING included; a second transaction claiming the
same key waits for the first, as a unique index would), and an AFTER DELETE trigger
releases it. Dropping a partition releases its keys first
(`release_keys`), since a DROP fires no trigger.

pg_partman (a Debian package) would create partitions ahead, but not archive before a drop
nor check that no kept case still has rows in the partition, and the PostgreSQL image the
deploy files use does not ship it; creating a month's partition is one statement.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, text
from sqlalchemy.exc import OperationalError

from shared.db.session import Database


@dataclass(frozen=True)
class PartitionedTable:
    table: str
    column: str  # the partition key: a time set at insert
    key: str | None = None  # unique across partitions, kept in `key_table`
    key_table: str | None = None


PARTITIONED = (
    PartitionedTable("case_events", "received_at", "event_id", "event_ids"),
    PartitionedTable("decisions", "decided_at", "decision_id", "decision_ids"),
    PartitionedTable("notifications", "created_at", "dedup_key", "notification_keys"),
)
BY_TABLE = {p.table: p for p in PARTITIONED}

DEFAULT_MONTHS_AHEAD = 3

# The parent's lock for CREATE TABLE ... PARTITION OF / DROP TABLE is exclusive: never
# queue writers behind a long query for it; try again a little later instead.
SHORT_LOCK = text("SET LOCAL lock_timeout = '2s'")
LOCK_ATTEMPTS = 5


@dataclass(frozen=True)
class Partition:
    name: str
    lower: datetime | None  # None: MINVALUE
    upper: datetime | None  # None: MAXVALUE
    is_default: bool = False


_BOUND = re.compile(r"FOR VALUES FROM \((.+)\) TO \((.+)\)")


def _bound(value: str) -> datetime | None:
    value = value.strip()
    if value in ("MINVALUE", "MAXVALUE"):
        return None
    return datetime.fromisoformat(value.strip("'")).astimezone(UTC)


def list_partitions(conn: Connection, table: str) -> list[Partition]:
    """The table's partitions, oldest first (the default partition last)."""
    conn.execute(text("SET LOCAL TimeZone = 'UTC'"))  # bounds printed in UTC
    rows = conn.execute(text("""
        SELECT c.relname, pg_get_expr(c.relpartbound, c.oid)
          FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = to_regclass(:t)"""), {"t": table}).all()
    found = []
    for name, bound in rows:
        if bound == "DEFAULT":
            found.append(Partition(name, None, None, is_default=True))
            continue
        match = _BOUND.match(bound)
        if match is None:
            raise ValueError(f"{name}: unexpected partition bound {bound!r}")
        found.append(Partition(name, _bound(match.group(1)), _bound(match.group(2))))
    return sorted(found, key=lambda p: (
        p.is_default, p.lower or datetime.min.replace(tzinfo=UTC)))


def is_partitioned(conn: Connection, table: str) -> bool:
    return bool(conn.execute(text(
        "SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass(:t)"), {"t": table}
    ).scalar())


def month_start(at: datetime) -> datetime:
    at = at.astimezone(UTC)
    return datetime(at.year, at.month, 1, tzinfo=UTC)


def next_month(start: datetime) -> datetime:
    return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)


def partition_name(table: str, start: datetime) -> str:
    return f"{table}_p{start:%Y%m}"


def create_partition(conn: Connection, table: str, name: str, lower: datetime | None,
                     upper: datetime | None) -> None:
    """One partition [lower, upper) (None: MINVALUE / MAXVALUE). Its indexes and triggers
    are the parent's, made by PostgreSQL."""
    low = "MINVALUE" if lower is None else f"'{lower.isoformat()}'"
    high = "MAXVALUE" if upper is None else f"'{upper.isoformat()}'"
    conn.execute(text(
        f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} "
        f"FOR VALUES FROM ({low}) TO ({high})"))


@dataclass
class EnsureReport:
    created: list[str]
    default_rows: dict[str, int]  # rows that found no month partition, per table
    failed: dict[str, str]  # partition -> why (e.g. its month's rows are in the default)


def ensure_partitions(db: Database, months_ahead: int = DEFAULT_MONTHS_AHEAD
                      ) -> EnsureReport:
    """Every partitioned table gets a partition for this month (database clock) and the
    next `months_ahead` ones, where none covers them yet. Each is its own short
    transaction; a lock not granted at once is tried again, a few times."""
    report = EnsureReport([], {}, {})
    with db.sql_engine.connect() as conn:
        now = conn.execute(text("SELECT now()")).scalar_one()
        conn.rollback()
    for spec in PARTITIONED:
        with db.sql_engine.connect() as conn:
            if not is_partitioned(conn, spec.table):
                conn.rollback()
                continue
            existing = list_partitions(conn, spec.table)
            conn.rollback()
        start = month_start(now)
        for _ in range(months_ahead + 1):
            end = next_month(start)
            if not any(_overlaps(p, start, end) for p in existing):
                name = partition_name(spec.table, start)
                problem = _create_with_retries(db, spec.table, name, start, end)
                if problem is None:
                    report.created.append(name)
                else:
                    report.failed[name] = problem
            start = end
        with db.sql_engine.connect() as conn:
            rows = conn.execute(text(f"SELECT count(*) FROM {spec.table}_default")).scalar()
            conn.rollback()
        report.default_rows[spec.table] = int(rows or 0)
    return report


def _overlaps(p: Partition, start: datetime, end: datetime) -> bool:
    if p.is_default:
        return False
    return (p.lower is None or p.lower < end) and (p.upper is None or p.upper > start)


def _create_with_retries(db: Database, table: str, name: str, start: datetime,
                         end: datetime) -> str | None:
    for attempt in range(LOCK_ATTEMPTS):
        try:
            with db.sql_engine.begin() as conn:
                conn.execute(SHORT_LOCK)
                create_partition(conn, table, name, start, end)
            return None
        except OperationalError as exc:
            # lock_timeout (55P03): a long query holds the table; anything else (e.g. rows
            # of that month already in the default partition, 23514) will not go away.
            if getattr(exc.orig, "sqlstate", None) != "55P03" or attempt == LOCK_ATTEMPTS - 1:
                return str(exc.orig).strip().splitlines()[0]
            time.sleep(0.5 * (attempt + 1))
    return "lock not granted"


def release_keys(db: Database, spec: PartitionedTable, partition: str,
                 batch: int = 5000) -> int:
    """Remove from the key table the keys of a partition's rows, before it is dropped (DROP
    fires no DELETE trigger): in key order, a short transaction per batch. Returns how
    many keys went."""
    if spec.key is None:
        return 0
    released, after = 0, ""
    while True:
        with db.sql_engine.begin() as conn:
            keys = list(conn.execute(text(
                f"SELECT {spec.key} FROM {partition} WHERE {spec.key} > :after "
                f"ORDER BY {spec.key} LIMIT :batch"), {"after": after, "batch": batch}
            ).scalars())
            if not keys:
                return released
            released += int(conn.execute(text(
                f"DELETE FROM {spec.key_table} WHERE {spec.key} = ANY(:keys)"),
                {"keys": keys}).rowcount)
        after = keys[-1]


def partition_history_by_month(conn: Connection, first_month: datetime) -> None:
    """For a database without data yet (a benchmark's, a test's): the `<table>_history`
    partition made to end at `first_month`, and a partition per month from there, as a
    database partitioned since then would look. Refuses a history partition with rows."""
    for spec in PARTITIONED:
        history = f"{spec.table}_history"
        boundary = next(p.upper for p in list_partitions(conn, spec.table)
                        if p.name == history)
        if conn.execute(text(f"SELECT EXISTS (SELECT 1 FROM {history})")).scalar():
            raise ValueError(f"{history} has rows: it is split by retention, not here")
        conn.execute(text(f"DROP TABLE {history}"))
        create_partition(conn, spec.table, history, None, first_month)
        start = first_month
        while boundary is not None and start < boundary:
            create_partition(conn, spec.table, partition_name(spec.table, start), start,
                             next_month(start))
            start = next_month(start)


# The partitions of `:table` that have no index attached to the parent index `:index`.
_UNINDEXED_PARTITIONS = text("""
    SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = to_regclass(:table)
       AND NOT EXISTS (SELECT 1 FROM pg_inherits ii JOIN pg_index x ON x.indexrelid = ii.inhrelid
                        WHERE ii.inhparent = to_regclass(:index) AND x.indrelid = c.oid)
     ORDER BY 1""")


def add_index_concurrently(conn: Connection, name: str, table: str, spec: str) -> None:
    """A new index `name` ON `table` `spec` ("(columns) WHERE ...") of a partitioned table,
    without blocking writes: PostgreSQL cannot build it CONCURRENTLY on the parent, so the
    parent's index is made ON ONLY (empty, invalid), each partition's is built
    CONCURRENTLY and attached, and the parent's turns valid with the last. A partition
    created meanwhile gets its own from the parent; a build that failed half-way (an
    invalid index) is dropped and made again; run again, it finishes what is missing.
    `conn` must be in autocommit (a concurrent build cannot run in a transaction)."""
    conn.execute(text(f"CREATE INDEX IF NOT EXISTS {name} ON ONLY {table} {spec}"))
    while missing := list(conn.execute(_UNINDEXED_PARTITIONS,
                                       {"table": table, "index": name}).scalars()):
        for partition in missing:
            own = f"{name}_{partition}"
            if len(own) > 63:
                raise ValueError(f"index name {own!r} is longer than PostgreSQL keeps")
            valid = conn.execute(text(
                "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
                {"n": own}).scalar()
            if valid is False:
                conn.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {own}"))
            conn.execute(text(
                f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {own} ON {partition} {spec}"))
            conn.execute(text(f"ALTER INDEX {name} ATTACH PARTITION {own}"))
