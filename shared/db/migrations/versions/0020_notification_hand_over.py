"""notifications: which claim holds a row, and when it was handed to a provider

Revision ID: 0020
Revises: 0019
Create Date: 2026-11-27 20:00:00

A notifier worker claims a chunk of rows (`sending`, `claim_token`) and, just before
each provider call, stamps that row `handed_over_at`. A row of a dead worker's chunk
without the stamp was never sent and is claimed again; only a stamped one is "unknown".
Both columns are nullable without a default: a catalog change only, no rewrite.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0020'
down_revision: str | None = '0019'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("notifications", sa.Column("claim_token", sa.String(64), nullable=True))
    op.add_column("notifications",
                  sa.Column("handed_over_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("notifications", "handed_over_at")
    op.drop_column("notifications", "claim_token")
