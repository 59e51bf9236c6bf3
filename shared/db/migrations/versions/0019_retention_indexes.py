"""retention: indexes to find what is past its time, and dedup-only event rows

Revision ID: 0019
Revises: 0002
Create Date: 2026-11-27 16:50:00

Additive and without blocking writes: the new column is nullable without a default (a
catalog change only), and every index is built CONCURRENTLY outside a transaction. A
concurrent build that failed half-way leaves an invalid index behind; it is dropped and
built again.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0019'
down_revision: str | None = '0016'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = (
    ("ix_cases_closed_at", "cases (closed_at, case_id) WHERE status <> 'open'"),
    ("ix_deadlines_case_id", "deadlines (case_id)"),
    ("ix_case_events_forget_after",
     "case_events (forget_after) WHERE forget_after IS NOT NULL"),
)


def _build_concurrently(name: str, definition: str) -> None:
    conn = op.get_bind()
    valid = conn.execute(sa.text(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relname = :n AND pg_table_is_visible(c.oid)"), {"n": name}).scalar()
    if valid is False:
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
    op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {definition}")


def upgrade() -> None:
    # The column needs a moment's exclusive lock: give up rather than queue writers behind
    # a long transaction (run the upgrade again later).
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.add_column('case_events',
                  sa.Column('forget_after', sa.DateTime(timezone=True), nullable=True))
    with op.get_context().autocommit_block():
        for name, definition in INDEXES:
            _build_concurrently(name, definition)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name, _definition in INDEXES:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
    op.drop_column('case_events', 'forget_after')
