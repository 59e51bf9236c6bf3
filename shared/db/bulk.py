"""Many rows in one statement with one parameter: a JSON array, expanded by PostgreSQL's
`json_to_recordset`.

psycopg's `executemany` sends one execution per row (pipelined) and adapts every value of
every row on its own; that per-row cost was about a third of the resolver's and intake's
CPU. Array parameters per column (`unnest`) were no better: psycopg quotes each element of
a text array with a regular expression. orjson encodes the whole batch in C (datetimes
included; the standard library's encoder was a quarter of the resolver's CPU), PostgreSQL
parses it in C, and the SQL text is the same for every batch size, so it is parsed and
planned once (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from sqlalchemy import Table, TextClause, text
from sqlalchemy.dialects import postgresql

_DIALECT = postgresql.dialect()


def _json_default(value: Any) -> Any:
    # orjson writes datetimes itself, in RFC 3339 with their UTC offset (timestamptz).
    if isinstance(value, bytes):
        return "\\x" + value.hex()  # bytea's hex input format
    if isinstance(value, Mapping):  # e.g. a read-only view inside a case's data
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class BulkStatement:
    """A statement over rows given as dicts, run as one execution with one parameter.

    `sql` is written against `rows`, a relation with the given columns (typed as in
    `table`), e.g. "INSERT INTO t (a, b) SELECT a, b FROM rows" or
    "UPDATE t SET ... FROM rows WHERE ...". Keys of a row dict that are not columns are
    ignored."""

    def __init__(self, table: Table, columns: Sequence[str], sql: str, with_: str = "") -> None:
        """`with_`: more common table expressions after `rows` (", name AS (...)")."""
        self.columns = tuple(columns)
        types = ", ".join(f"{c} {table.c[c].type.compile(dialect=_DIALECT)}" for c in columns)
        self.statement: TextClause = text(
            f"WITH rows AS (SELECT * FROM json_to_recordset(CAST(:rows AS json)) "
            f"AS r({types})){with_} {sql}")

    def params(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
        return {"rows": orjson.dumps(rows, default=_json_default).decode()}

    def execute(self, conn: Any, rows: Sequence[Mapping[str, Any]]) -> Any:
        return conn.execute(self.statement, self.params(rows))


def bulk_insert(table: Table, columns: Sequence[str], tail: str = "") -> BulkStatement:
    """INSERT of the given columns (others take their defaults); `tail` is e.g. an
    ON CONFLICT or RETURNING clause."""
    names = ", ".join(columns)
    return BulkStatement(
        table, columns, f"INSERT INTO {table.name} ({names}) SELECT {names} FROM rows {tail}")


def bulk_insert_claiming(table: Table, columns: Sequence[str], key_table: Table,
                         key_columns: Sequence[str], tail: str = "") -> BulkStatement:
    """INSERT of the rows whose key (`key_columns[0]`) this statement claims in
    `key_table`: a key claimed before (or twice in the batch) skips its row. A table
    partitioned by time cannot hold a unique index on the key alone, so its key table is
    what keeps it unique; claiming in the statement itself, set-based, costs far less
    than a trigger per row (docs/benchmarks.md, "Session 7"). No `ON CONFLICT` on the
    table itself: the claimed key is what makes the row new, and an arbiter check of
    every unique index of the partition cost another sixth of the insert. `tail`: e.g. a
    RETURNING clause."""
    names = ", ".join(columns)
    key = key_columns[0]
    keys = ", ".join(key_columns)
    return BulkStatement(
        table, columns,
        f"""INSERT INTO {table.name} ({names})
            SELECT DISTINCT ON (rows.{key}) {", ".join(f"rows.{c}" for c in columns)}
              FROM rows JOIN claimed ON claimed.{key} = rows.{key} {tail}""",
        f""", claimed AS (INSERT INTO {key_table.name} ({keys})
                SELECT DISTINCT ON ({key}) {keys} FROM rows
                ON CONFLICT DO NOTHING RETURNING {key})""")
