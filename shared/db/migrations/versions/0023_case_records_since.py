"""cases.records_since: when the first row about a case was written, so a case's reads skip
the months before it

Revision ID: 0023
Revises: 0022
Create Date: 2026-11-28 18:30:00

`case show`, `case explain` and the console read a case's events, decisions and
notifications by `case_id`: one index probe per monthly partition of each table, a year of
them with history, though a case's rows lie in a month or two. `records_since` is a lower
bound of every such row's partition key (docs/design.md "Partitioning by time"); with it
the reads name a time and PostgreSQL prunes the months before.

- New cases get it from the column default, `now()`: the transaction that creates the case
  row writes its first applied events with the same `now()`, and every later row comes
  later. Rows about the case written before it existed (parked, expired, error) are found
  by intake when it creates the case (`ix_case_events_unapplied`) and lower it.
- Cases from before this migration keep NULL: their reads still probe every month (as
  before) until retention removes them. The column is added without a default (a catalog
  change only; a default now would be the migration's time, not a bound of their rows),
  and the default is set afterwards, for new rows only.
- The index is built per partition CONCURRENTLY and attached: no write waits for it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.db.partitions import add_index_concurrently

revision: str = '0023'
down_revision: str | None = '0022'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_case_events_unapplied"


def upgrade() -> None:
    # A moment's exclusive lock on `cases`: give up rather than queue writers behind a
    # long transaction (run the upgrade again later).
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.add_column('cases', sa.Column('records_since', sa.DateTime(timezone=True),
                                     nullable=True))
    op.alter_column('cases', 'records_since', server_default=sa.text('now()'))
    with op.get_context().autocommit_block():
        add_index_concurrently(op.get_bind(), INDEX, "case_events",
                               "(case_id) WHERE outcome IN ('parked', 'expired', 'error')")


def downgrade() -> None:
    op.execute(f"DROP INDEX IF EXISTS {INDEX}")
    op.drop_column('cases', 'records_since')
