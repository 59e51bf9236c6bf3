from __future__ import annotations

import json

from domain_support import Driver, cst

from shared.domain import Case


def test_case_round_trips_through_json(driver: Driver) -> None:
    driver.open("onsite_repair", cst(2026, 11, 2, 10))
    driver.send("repair.scheduled", cst(2026, 11, 3, 9), visit_at="2026-11-07T14:00:00+08:00")
    driver.send("intervention.requested", cst(2026, 11, 4, 9))
    case = driver.case
    assert case is not None
    restored = Case.from_dict(json.loads(json.dumps(case.to_dict())))
    assert restored == case
    assert driver.engine.deadlines_for(restored, cst(2026, 11, 4, 9)) == \
        driver.engine.deadlines_for(case, cst(2026, 11, 4, 9))


def test_domain_core_imports_no_infrastructure() -> None:
    import subprocess
    import sys

    code = ("import sys, shared.domain, shared.domain.ruledoc; "
            "bad = {'sqlalchemy','pika','dramatiq','redis','prometheus_client'} & "
            "{m.split('.')[0] for m in sys.modules}; print(sorted(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
