"""Month arithmetic and partition bounds of shared/db/partitions.py (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from shared.db.partitions import Partition, _bound, _overlaps, month_start, next_month


def test_months_are_utc_calendar_months() -> None:
    # 00:30 on 1 March in UTC+8 is still February in UTC.
    late_february = datetime(2027, 3, 1, 0, 30, tzinfo=timezone(timedelta(hours=8)))
    assert month_start(late_february) == datetime(2027, 2, 1, tzinfo=UTC)
    assert next_month(datetime(2026, 12, 1, tzinfo=UTC)) == datetime(2027, 1, 1, tzinfo=UTC)
    assert next_month(datetime(2027, 1, 1, tzinfo=UTC)) == datetime(2027, 2, 1, tzinfo=UTC)


def test_bounds_as_postgresql_prints_them() -> None:
    assert _bound("MINVALUE") is None
    assert _bound("'2026-12-01 00:00:00+00'") == datetime(2026, 12, 1, tzinfo=UTC)


def test_a_month_is_covered_by_a_partition_that_overlaps_it() -> None:
    dec, jan, feb = (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC),
                     datetime(2027, 2, 1, tzinfo=UTC))
    history = Partition("t_history", None, jan)
    assert _overlaps(history, dec, jan)
    assert not _overlaps(history, jan, feb)  # the upper bound is exclusive
    assert not _overlaps(Partition("t_default", None, None, is_default=True), jan, feb)
