"""Every database session the services open has a statement and a lock timeout and TCP
keepalives, from the settings."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

from shared.bootstrap import build_database
from shared.config import DatabaseSessionSettings, Settings

pytestmark = pytest.mark.integration


def test_sessions_carry_timeouts_and_keepalives(database_url: str) -> None:
    settings = Settings(database_url=database_url, db=DatabaseSessionSettings(
        statement_timeout_ms=1234, lock_timeout_ms=567, keepalives_idle_seconds=42))
    db = build_database(settings, pool_size=1)
    try:
        with db.transaction() as s:
            assert s.execute(text("SHOW statement_timeout")).scalar_one() == "1234ms"
            assert s.execute(text("SHOW lock_timeout")).scalar_one() == "567ms"
            # The client side of the TCP connection: libpq's keepalive parameters.
            info = s.connection().connection.dbapi_connection.info  # type: ignore[union-attr]
            params = info.get_parameters()
            assert params.get("keepalives") == "1"
            assert params.get("keepalives_idle") == "42"
            with pytest.raises(Exception, match="statement timeout"):
                s.execute(text("SELECT pg_sleep(3)"))
    finally:
        db.sql_engine.dispose()


def test_json_read_back_is_what_the_standard_library_reads(database_url: str) -> None:
    """Sessions parse JSON columns with orjson; every value jsonb holds comes back as
    json.loads gives it, a number beyond a double included (orjson refuses that one:
    jsonb holds it as a 401-digit integer)."""
    stored = ('{"case_id": "C1", "reason": "尺码不合适", "nested": {"list": [1, 2.5, null, true]},'
              ' "int64": 9223372036854775807, "beyond_a_double": 1e400}')
    db = build_database(Settings(database_url=database_url), pool_size=1)
    try:
        with db.transaction() as s:
            for doc in (stored, '{"plain": "text", "n": -42}'):
                got, as_text = s.execute(text("SELECT CAST(:doc AS jsonb), CAST(:doc AS jsonb)"
                                              "::text"), {"doc": doc}).one()
                assert got == json.loads(as_text)
        assert got == {"plain": "text", "n": -42}
    finally:
        db.sql_engine.dispose()
