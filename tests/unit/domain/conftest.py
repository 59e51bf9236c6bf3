from __future__ import annotations

import pytest
from domain_support import Driver, default_engine

from shared.domain import Engine


@pytest.fixture(scope="session")
def engine() -> Engine:
    return default_engine()


@pytest.fixture
def driver(engine: Engine) -> Driver:
    return Driver(engine)
