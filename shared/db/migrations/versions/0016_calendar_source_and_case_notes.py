"""deadlines record the calendar data they stand on; case notes for the timeline

Revision ID: 0016
Revises: 0002
Create Date: 2026-11-27 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql


revision: str = '0016'
down_revision: str | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # "library" | "file" | "estimated" for working-day deadlines; NULL for fixed durations
    # and rows written before this column existed.
    op.add_column('deadlines', sa.Column('calendar_source', sa.String(length=16), nullable=True))
    op.create_index('ix_deadlines_pending_estimated', 'deadlines', ['case_id'], unique=False,
                    postgresql_where=sa.text("status = 'pending' AND calendar_source = 'estimated'"))
    op.create_table(
        'case_notes',
        sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column('case_id', sa.String(length=128), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('type', sa.String(length=64), nullable=False),
        sa.Column('body', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_case_notes')),
    )
    op.create_index('ix_case_notes_case_id', 'case_notes', ['case_id', 'at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_case_notes_case_id', table_name='case_notes')
    op.drop_table('case_notes')
    op.drop_index('ix_deadlines_pending_estimated', table_name='deadlines',
                  postgresql_where=sa.text("status = 'pending' AND calendar_source = 'estimated'"))
    op.drop_column('deadlines', 'calendar_source')
