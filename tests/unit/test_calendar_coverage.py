"""How far the holiday data reaches: ops are warned before working-day deadlines run past
it (a user file with next year's schedule extends it)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from shared.domain import WorkCalendar


def test_library_data_reaches_the_end_of_its_last_year() -> None:
    last = WorkCalendar(None).covered_until()
    assert last.month == 12 and last.day == 31
    assert last.year >= 2026


def test_a_user_file_for_next_year_extends_coverage(tmp_path: Path) -> None:
    library_last = WorkCalendar(None).covered_until().year
    next_year = library_last + 1
    holidays = tmp_path / "holidays.toml"
    holidays.write_text(f"[{next_year}]\nholidays = [{next_year}-01-01]\nworkdays = []\n")
    assert WorkCalendar(holidays).covered_until() == date(next_year, 12, 31)
