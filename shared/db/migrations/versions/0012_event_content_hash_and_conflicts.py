"""event content hash and conflicts

Same event_id, other content: intake compares a hash of the normalised body with the one
stored with the first event, and keeps the second in `case_event_conflicts` for ops.

Revision ID: 0012
Revises: 0002
Create Date: 2026-11-27 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0012'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('case_events', sa.Column('body_sha256', sa.String(length=64), nullable=True))
    op.create_table(
        'case_event_conflicts',
        sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column('event_id', sa.String(length=256), nullable=False),
        sa.Column('case_id', sa.String(length=128), nullable=False),
        sa.Column('received_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.Column('body', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column('body_sha256', sa.String(length=64), nullable=False),
        sa.Column('first_sha256', sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_case_event_conflicts')),
    )
    op.create_index(op.f('ix_case_event_conflicts_event_id'), 'case_event_conflicts',
                    ['event_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_case_event_conflicts_event_id'), table_name='case_event_conflicts')
    op.drop_table('case_event_conflicts')
    op.drop_column('case_events', 'body_sha256')
