"""Alembic environment: the URL comes from the caller (`aftersales db upgrade`)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from shared.db.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations() -> None:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("sqlalchemy.url is not set: run through `aftersales db upgrade`")
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    sql_engine = create_engine(url)
    with sql_engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
    sql_engine.dispose()


run_migrations()
