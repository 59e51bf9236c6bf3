from __future__ import annotations

import dataclasses
import json

import orjson
import pytest
from domain_support import Driver, cst

from shared.domain import Case
from shared.domain.model import evolve


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


def test_case_round_trips_through_json_without_copies(driver: Driver) -> None:
    """What the database does: the case written whole by orjson (datetimes included) and
    read back from freshly parsed JSON, neither side copying contacts and data."""
    driver.open("return_refund", cst(2026, 11, 2, 10))
    driver.send("merchant.approved", cst(2026, 11, 2, 12))
    case = driver.case
    assert case is not None
    written = orjson.dumps(case.to_dict(copy=False))
    assert orjson.loads(written) == json.loads(json.dumps(case.to_dict()))
    restored = Case.from_dict(orjson.loads(written), copy=False)
    assert restored == case


def test_evolve_makes_what_replace_makes(driver: Driver) -> None:
    driver.open("return_refund", cst(2026, 11, 2, 10))
    case = driver.case
    assert case is not None
    changes = {"version": case.version + 1, "step": "x", "data": {**case.data, "k": 1}}
    evolved = evolve(case, **changes)
    assert evolved == dataclasses.replace(case, **changes)
    assert evolved is not case and case.step != "x"  # the original is untouched
    assert evolved.__dict__.keys() == case.__dict__.keys()
    with pytest.raises(TypeError, match="no field"):
        evolve(case, stepp="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        evolved.step = "y"  # type: ignore[misc]
    # evolve skips __init__: it is only right while Case has nothing to run after it
    assert not hasattr(Case, "__post_init__")


def test_domain_core_imports_no_infrastructure() -> None:
    import subprocess
    import sys

    code = ("import sys, shared.domain, shared.domain.ruledoc; "
            "bad = {'sqlalchemy','pika','dramatiq','redis','prometheus_client'} & "
            "{m.split('.')[0] for m in sys.modules}; print(sorted(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
