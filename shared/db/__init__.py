"""PostgreSQL: the system of record (SQLAlchemy 2.x models, Alembic migrations)."""
