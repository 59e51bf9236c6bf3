"""The Alembic migrations build exactly the schema the SQLAlchemy models describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from shared.db.models import Base


def test_migrations_and_models_agree(database_url: str) -> None:
    sql_engine = create_engine(database_url)
    try:
        with sql_engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        sql_engine.dispose()
    assert diff == []


def test_upgrade_is_idempotent(database_url: str) -> None:
    from shared.db.migrate import upgrade

    upgrade(database_url)  # already at head: must be a no-op, not an error
