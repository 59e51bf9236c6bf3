"""The import rules of docs/design.md, checked on the code as it is.

- the domain core (`shared.domain`) imports no infrastructure;
- storage (`shared.db`) imports neither AMQP nor metrics;
- a service does not import another service (`services.ops` is the ops library the console
  and the CLI share, not a service);
- `shared` imports neither `services` nor the CLI, and services do not import the CLI;
- no SQL outside `shared.db`: no SQL construct imported from SQLAlchemy (`text`, `select`,
  ...) and no string handed to `execute`.

The import graph comes from grimp (the graph library under import-linter): it sees every
import statement, those inside functions too. Violations that exist today and are being
removed on other branches are listed in KNOWN_VIOLATIONS; the test fails on any violation not
listed AND on a listed one that is gone, so the list can only shrink.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "services", "aftersales_cli")

DOMAIN_FORBIDDEN = ("sqlalchemy", "dramatiq", "pika", "redis", "httpx", "prometheus_client",
                    "shared.db", "shared.amqp", "shared.metrics", "services", "aftersales_cli")
STORAGE_FORBIDDEN = ("pika", "dramatiq", "shared.amqp", "shared.metrics", "prometheus_client")
# The ops reading code (services/ops/) is shared by the console and the CLI (docs/design.md).
SERVICE_LIBRARIES = {"services.ops": {"services.console"}}
# SQLAlchemy names that build SQL: a module importing one writes SQL.
SQL_CONSTRUCTS = frozenset({
    "text", "select", "insert", "update", "delete", "union", "union_all", "exists",
    "literal_column", "table", "column", "values", "bindparam", "func",
})

# Violations allowed for now. Empty: the write path (issue 13's owner modules) and the
# read side (shared/db/queries/) left none. Never add to this set: fix the code instead.
KNOWN_VIOLATIONS: frozenset[str] = frozenset()


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _first(module: str, packages: Iterable[str]) -> str | None:
    return next((p for p in packages if _within(module, p)), None)


def import_violations(graph: grimp.ImportGraph) -> set[str]:
    found = set()
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            if _within(importer, "shared.domain"):
                rule = _first(imported, DOMAIN_FORBIDDEN)
            elif _within(importer, "shared.db"):
                rule = _first(imported, STORAGE_FORBIDDEN)
            elif _within(importer, "shared"):
                rule = _first(imported, ("services", "aftersales_cli"))
            elif _within(importer, "services"):
                rule = _first(imported, ("aftersales_cli",)) or _other_service(importer, imported)
            else:
                rule = None
            if rule is not None:
                found.add(f"{importer} imports {rule}")
    return found


def _other_service(importer: str, imported: str) -> str | None:
    """The service `imported` belongs to when it is not `importer`'s own."""
    if not _within(imported, "services") or imported == "services":
        return None
    own, other = ".".join(importer.split(".")[:2]), ".".join(imported.split(".")[:2])
    if own == other or own in SERVICE_LIBRARIES.get(other, set()):
        return None
    return other


def writes_sql(source: str) -> bool:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlalchemy":
            if any(alias.name in SQL_CONSTRUCTS for alias in node.names):
                return True
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("execute", "exec_driver_sql") and node.args
                and isinstance(node.args[0], ast.Constant | ast.JoinedStr)):
            return True
    return False


def _modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def sql_violations(modules: Iterable[tuple[str, Path]]) -> set[str]:
    return {f"{name} has SQL" for name, path in modules
            if not _within(name, "shared.db") and writes_sql(path.read_text(encoding="utf-8"))}


@pytest.fixture(scope="module")
def violations() -> set[str]:
    graph = grimp.build_graph(*PACKAGES, include_external_packages=True, cache_dir=None)
    return import_violations(graph) | sql_violations(_modules())


def test_no_violation_beyond_the_known_ones(violations: set[str]) -> None:
    new = sorted(violations - KNOWN_VIOLATIONS)
    assert not new, "import rules of docs/design.md broken:\n" + "\n".join(new)


def test_every_known_violation_still_exists(violations: set[str]) -> None:
    gone = sorted(KNOWN_VIOLATIONS - violations)
    assert not gone, ("fixed: delete these from KNOWN_VIOLATIONS in "
                      "tests/unit/test_import_rules.py:\n" + "\n".join(gone))


def test_the_rules_catch_what_they_forbid() -> None:
    graph = grimp.ImportGraph()
    for importer, imported in (
            ("shared.domain.engine", "sqlalchemy"),           # domain -> infrastructure
            ("shared.domain.engine", "shared.metrics.catalog"),
            ("shared.db.persist", "pika"),                     # storage -> AMQP
            ("shared.db.persist", "shared.db.models"),         # allowed
            ("services.timer.loop", "services.resolver.resolve"),  # service -> service
            ("services.timer.loop", "services.timer.main"),    # allowed: its own
            ("services.console.app", "services.ops.cases"),    # allowed: the ops library
            ("services.intake.main", "services.ops.cases"),    # only the console uses it
            ("services.console.app", "aftersales_cli.cli"),    # service -> CLI
            ("aftersales_cli.cli", "services.timer.main")):    # allowed: CLI -> services
        graph.add_import(importer=importer, imported=imported)
    assert import_violations(graph) == {
        "shared.domain.engine imports sqlalchemy",
        "shared.domain.engine imports shared.metrics",
        "shared.db.persist imports pika",
        "services.timer.loop imports services.resolver",
        "services.intake.main imports services.ops",
        "services.console.app imports aftersales_cli",
    }
    assert writes_sql("from sqlalchemy import select\n")
    assert writes_sql("def f(conn):\n    conn.execute(f'DELETE FROM {t}')\n")
    assert not writes_sql("from sqlalchemy.orm import Session\nfrom sqlalchemy import Engine\n")
