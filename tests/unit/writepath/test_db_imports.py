"""Storage imports only what storage needs (docs/design.md, 'Packages'): `shared/db`
never imports AMQP, metrics, the notification policy, the wire schemas or a service."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
ALLOWED_THIRD_PARTY = {"sqlalchemy", "orjson", "alembic"}
ALLOWED_OWN = ("shared.db", "shared.domain")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_shared_db_imports_only_sqlalchemy_stdlib_and_the_domain() -> None:
    files = [p for p in (ROOT / "shared" / "db").rglob("*.py")
             if "migrations" not in p.parts]
    assert files
    wrong = {}
    for path in files:
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY:
                continue
            if name == "shared" or name.startswith(ALLOWED_OWN):
                continue
            wrong.setdefault(str(path.relative_to(ROOT)), []).append(name)
    assert wrong == {}
