"""Schema migration through Alembic, driven from code so no alembic.ini is needed."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation would eat the % of URL-encoded passwords.
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def ensure_database(database_url: str) -> bool:
    """Create the database if it does not exist (local set-up); True if created."""
    url = make_url(database_url)
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": url.database}
            ).scalar()
            if exists:
                return False
            conn.execute(text(f'CREATE DATABASE "{url.database}"'))
            return True
    finally:
        admin.dispose()


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate, then (at head) create the monthly partitions this month and the next ones
    need where none covers them yet (`shared/db/partitions.py`; retention runs do it too)."""
    ensure_database(database_url)
    command.upgrade(alembic_config(database_url), revision)
    if revision == "head":
        from shared.db.partitions import ensure_partitions
        from shared.db.session import Database

        engine = create_engine(database_url)
        try:
            ensure_partitions(Database(engine))
        finally:
            engine.dispose()
