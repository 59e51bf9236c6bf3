from __future__ import annotations

import pytest
from domain_support import Driver, default_engine

from shared.domain import Engine
from shared.domain.flows import forget_built_tables


@pytest.fixture(autouse=True)
def _flows_built_by_each_test() -> None:
    # Each test builds the flow tables itself: a mutant of flows.py then takes effect in
    # mutmut's forked workers, and every test that reads the flows counts as testing them.
    forget_built_tables()


@pytest.fixture(scope="session")
def engine() -> Engine:
    return default_engine()


@pytest.fixture
def driver(engine: Engine) -> Driver:
    return Driver(engine)
