"""notifications: an index for the rows still `pending` from before migration 0002

Revision ID: 0022
Revises: 0021
Create Date: 2026-11-28 04:30:00

The backlog gauge counts the notifications not yet sent (new, queued, deferred, and
`pending`, what `queued` was called before 0002). The first three have partial indexes;
`pending` had none, so every backlog read (every 10 s) scanned every notification ever
kept, a year of them with history. Nothing writes `pending` any more, so this index
stays as small as the rows left from before and costs writes nothing. Built per
partition CONCURRENTLY and attached (shared.db.partitions.add_index_concurrently): no
write waits for it.
"""

from collections.abc import Sequence

from alembic import op

from shared.db.partitions import add_index_concurrently

revision: str = '0022'
down_revision: str | None = '0021'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_notifications_pending"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        add_index_concurrently(op.get_bind(), NAME, "notifications",
                               "(id) WHERE status = 'pending'")


def downgrade() -> None:
    op.execute(f"DROP INDEX IF EXISTS {NAME}")
