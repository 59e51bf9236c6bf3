"""Shared helpers of the deploy tests (config files, dashboards, manifests).

A uniquely named module, not conftest.py, so that `import deploy_helpers` cannot pick up
another folder's conftest. Fixtures are re-exported by conftest.py."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """Path of an external tool; a missing tool skips locally but FAILS in CI."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} not found (scripts/install_prometheus.sh installs promtool)"
        if in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def require_yaml() -> ModuleType:
    try:
        import yaml
    except ImportError:
        if in_ci():
            pytest.fail("PyYAML is needed by tests/deploy (add pyyaml to the test extras)")
        pytest.skip("PyYAML not installed")
    return yaml


def load_by_path(name: str, path: Path) -> ModuleType:
    """Import a standalone module of deploy/ (not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool")


@pytest.fixture(scope="session")
def yaml_mod() -> ModuleType:
    return require_yaml()


@pytest.fixture(scope="session")
def queries() -> ModuleType:
    return load_by_path("aftersales_grafana_queries", DEPLOY / "grafana" / "queries.py")
