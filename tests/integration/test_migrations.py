"""The Alembic migrations build exactly the schema the SQLAlchemy models describe."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text

from shared.db.models import Base


def test_migrations_and_models_agree(database_url: str) -> None:
    sql_engine = create_engine(database_url)
    try:
        with sql_engine.connect() as conn:
            # The models describe the partitioned tables; their partitions are made by
            # shared/db/partitions.py, one a month, and are not in the models.
            partitions = set(conn.execute(text(
                "SELECT inhrelid::regclass::text FROM pg_inherits")).scalars())
            assert partitions, "the growing tables are partitioned"

            def include_name(name: str | None, type_: str, _parent: Any) -> bool:
                return not (type_ == "table" and name in partitions)

            context = MigrationContext.configure(conn, opts={"include_name": include_name})
            diff = compare_metadata(context, Base.metadata)
    finally:
        sql_engine.dispose()
    assert diff == []


def test_upgrade_is_idempotent(database_url: str) -> None:
    from shared.db.migrate import upgrade

    upgrade(database_url)  # already at head: must be a no-op, not an error
