"""notifications are the notifier outbox

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 10:39:16.099934
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Notifications become the notifier's outbox: written `new`, handed over by the timer.
    # Rows still `pending` from before were already handed over; the notifier takes them.
    op.add_column('notifications', sa.Column('queued_at', sa.DateTime(timezone=True), nullable=True))
    op.alter_column('notifications', 'status', server_default='new')
    op.create_index('ix_notifications_new', 'notifications', ['id'], unique=False, postgresql_where=sa.text("status = 'new'"))
    op.create_index('ix_notifications_queued', 'notifications', ['queued_at'], unique=False, postgresql_where=sa.text("status = 'queued'"))


def downgrade() -> None:
    op.alter_column('notifications', 'status', server_default='pending')
    op.drop_index('ix_notifications_queued', table_name='notifications', postgresql_where=sa.text("status = 'queued'"))
    op.drop_index('ix_notifications_new', table_name='notifications', postgresql_where=sa.text("status = 'new'"))
    op.drop_column('notifications', 'queued_at')
