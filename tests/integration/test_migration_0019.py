"""Migration 0019 (retention's indexes and `case_events.forget_after`) on a database that
already has data: every row kept, the indexes built (concurrently) and valid, and back."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from shared.db.migrate import alembic_config, upgrade
from tests.conftest import PG_ADMIN_URL, RUN_ID
from tests.resources import unmigrated_database

pytestmark = pytest.mark.integration

TABLES = ("cases", "case_events", "deadlines", "decisions", "notifications")
NEW_INDEXES = ("ix_cases_closed_at", "ix_deadlines_case_id", "ix_case_events_forget_after")


@pytest.fixture
def database() -> Iterator[tuple[str, Engine]]:
    name = f"aftersales_test_{RUN_ID}_m19_{uuid.uuid4().hex[:4]}"
    with unmigrated_database(PG_ADMIN_URL, name) as database:
        yield database


def counts(sql_engine: Engine) -> dict[str, int]:
    with sql_engine.connect() as conn:
        return {t: int(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one())
                for t in TABLES}


def test_0019_keeps_every_row_and_builds_valid_indexes(database: tuple[str, Engine]) -> None:
    url, sql_engine = database
    # The revision before 0019, whatever the migrations are chained after (0002 today).
    previous = ScriptDirectory.from_config(alembic_config(url)).get_revision("0019")
    assert previous is not None
    before_0019 = str(previous.down_revision)
    upgrade(url, before_0019)
    with sql_engine.begin() as conn:
        conn.execute(text("""
            INSERT INTO cases (case_id, platform, shop_id, order_id, kind, status, step,
                               version, rule_set, rule_version, opened_at, closed_at, snapshot)
            SELECT 'C' || g, 'kuaishou', 'S', 'O' || g, 'refund_only',
                   CASE WHEN g % 2 = 0 THEN 'closed' ELSE 'open' END, 'x', 1, 'r', '1',
                   now(), CASE WHEN g % 2 = 0 THEN now() END, '{}'
            FROM generate_series(1, 2000) g"""))
        conn.execute(text("""
            INSERT INTO case_events (event_id, case_id, type, occurred_at, outcome, body)
            SELECT 'e' || g, 'C' || (g % 2000 + 1), 'case.opened', now(), 'applied', '{}'
            FROM generate_series(1, 5000) g"""))
        conn.execute(text("""
            INSERT INTO deadlines (case_id, step, purpose, action, party, due_at, deadline_at,
                                   fence, rule_set, rule_version, rule_id)
            SELECT 'C' || (g % 2000 + 1), 's', 'deadline', 'a', 'merchant', now(), now(), 1,
                   'r', '1', 'id' FROM generate_series(1, 5000) g"""))
    before = counts(sql_engine)

    upgrade(url, "0019")
    assert counts(sql_engine) == before
    with sql_engine.connect() as conn:
        valid = dict(conn.execute(text(
            "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c "
            "ON c.oid = i.indexrelid WHERE c.relname = ANY(:n)"), {"n": list(NEW_INDEXES)}
        ).all())
        assert conn.execute(text(
            "SELECT count(*) FROM case_events WHERE forget_after IS NOT NULL")).scalar() == 0
    assert valid == dict.fromkeys(NEW_INDEXES, True)

    command.downgrade(alembic_config(url), before_0019)
    assert counts(sql_engine) == before
    upgrade(url, "0019")  # and up again
    assert counts(sql_engine) == before
