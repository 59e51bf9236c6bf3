"""The README's settings table is the settings: every variable it lists reaches its field,
every field is listed, and the defaults it states are the code's (written once, there).
Every AFTERSALES_* variable the deployment files set is a setting too."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import yaml
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from shared.config import Settings, env_name, load_settings

REPO = Path(__file__).resolve().parents[2]
# One default per variable, separated by " / ": `a literal`, a number, unset or empty.
DEFAULT = re.compile(r"`[^`]*`|unset|empty|\d+(?:\.\d+)?")


def settings_fields() -> dict[str, tuple[FieldInfo, Callable[[Settings], Any]]]:
    """Each variable: its field, and how to read its value from a Settings."""
    found: dict[str, tuple[FieldInfo, Callable[[Settings], Any]]] = {}

    def walk(model: type[BaseSettings], path: tuple[str, ...]) -> None:
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation,
                                                                 BaseSettings):
                walk(field.annotation, (*path, name))
                continue

            def read(settings: Settings, where: tuple[str, ...] = (*path, name)) -> Any:
                value: Any = settings
                for part in where:
                    value = getattr(value, part)
                return value

            found[env_name(model, name)] = (field, read)

    walk(Settings, ())
    return found


FIELDS = settings_fields()


def table_rows() -> Iterator[tuple[list[str], str]]:
    """(variables, default cell) of each row of the README's settings table."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        if line.startswith("| `AFTERSALES_"):
            variables_cell, default_cell = line.strip("| ").split(" | ", 1)
            variables = re.findall(r"`(AFTERSALES_[A-Z0-9_]+)`", variables_cell)
            assert variables_cell == " / ".join(f"`{v}`" for v in variables), line
            yield variables, default_cell.removesuffix(" |")


def documented_defaults() -> dict[str, str]:
    defaults = {}
    for variables, cell in table_rows():
        rest = cell
        for number, variable in enumerate(variables):
            match = DEFAULT.match(rest)
            assert match, f"{variable}: the default should come first in {cell!r}"
            defaults[variable] = match.group()
            if number < len(variables) - 1:
                assert " / " in rest, f"one default per variable in {cell!r}"
                rest = rest.split(" / ", 1)[1]
    return defaults


DOCUMENTED = documented_defaults()


def test_every_setting_is_documented_once_and_every_documented_variable_is_one() -> None:
    listed = [v for variables, _cell in table_rows() for v in variables]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(FIELDS)


@pytest.mark.parametrize("variable", sorted(DOCUMENTED))
def test_the_documented_default_is_the_code_default(variable: str) -> None:
    documented = DOCUMENTED[variable]
    default = FIELDS[variable][0].get_default(call_default_factory=True)
    if documented == "unset":
        assert default is None
    elif documented == "empty":
        assert default in ("", ())
    elif documented.startswith("`"):
        assert str(default) == documented.strip("`")
    else:
        assert default is not None and float(default) == float(documented)


def test_the_defaults_are_what_a_bare_environment_reads(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    clear_environment(monkeypatch)
    settings = load_settings()
    for variable, (field, read) in FIELDS.items():
        assert read(settings) == field.get_default(call_default_factory=True), variable


def clear_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("AFTERSALES_"):
            monkeypatch.delenv(key)


def test_every_documented_variable_reaches_its_setting(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """All variables set at once, each to its own value (none is the default): each value
    must come out of its own field."""
    values = chosen_values(tmp_path)
    clear_environment(monkeypatch)
    for variable, value in values.items():
        monkeypatch.setenv(variable, value)
    settings = load_settings()
    for variable, value in values.items():
        actual = FIELDS[variable][1](settings)
        if isinstance(actual, SecretStr):
            actual = actual.get_secret_value()
        elif isinstance(actual, tuple):
            actual = ",".join(actual)
        if isinstance(actual, int | float) and not isinstance(actual, bool):
            assert float(actual) == float(value), variable
        else:
            assert str(actual) == value, variable
    assert len(set(values.values())) == len(values)  # no two alike: no crossed wires


def chosen_values(tmp_path: Path) -> dict[str, str]:
    def a_file(name: str) -> str:
        (tmp_path / name).write_text("", encoding="utf-8")
        return str(tmp_path / name)

    def a_folder(name: str) -> str:
        (tmp_path / name).mkdir()
        return str(tmp_path / name)

    special = {
        "AFTERSALES_AMQP_URL": "amqp://u:p@rabbit.test:5673/v",
        "AFTERSALES_DATABASE_URL": "postgresql+psycopg://db.test/x",
        "AFTERSALES_REDIS_URL": "redis://redis.test:6380/2",
        "AFTERSALES_SMTP_FROM": "shop@mail.test",
        "AFTERSALES_OPS_EMAILS": "a@ops.test,b@ops.test",
        "AFTERSALES_OPS_PHONES": "13800000001",
        "AFTERSALES_QUIET_HOURS": "23:00-07:00",
        "AFTERSALES_QUIET_HOURS_TZ": "Europe/Berlin",
        # Checked against each other: the dedup window covers the retention.
        "AFTERSALES_RETENTION_DAYS": "450",
        "AFTERSALES_DEDUP_WINDOW_DAYS": "500",
    }
    for variable, (field, _read) in FIELDS.items():
        if field.annotation in (Path, Path | None):
            make = a_folder if variable.endswith(("_MAPPINGS", "_DIR")) else a_file
            special[variable] = make(variable.lower())
    values: dict[str, str] = {}
    for variable, (field, _read) in sorted(FIELDS.items()):
        values[variable] = special.get(variable) or other_value(
            variable, field, set(values.values()))
    return values


def other_value(variable: str, field: FieldInfo, taken: set[str]) -> str:
    """A valid value that is not the default and not another variable's."""
    annotation = field.annotation
    default = field.get_default(call_default_factory=True)
    options = [a for a in get_args(annotation) if a is not type(None)]
    kind = options[0] if len(options) == 1 else annotation
    if get_origin(kind) is Literal:
        return next(str(o) for o in get_args(kind) if o != default)
    if kind in (int, float):
        low, high = bounds(field)
        step = 1 if kind is int else 0.5
        value = (default if default is not None else max(low, 0)) + step
        while str(value) in taken or not low <= value <= high:
            value += step
            assert value <= high, variable
        return str(value)
    return f"{variable.lower()}-value"  # str and SecretStr


def bounds(field: FieldInfo) -> tuple[float, float]:
    low, high = -math.inf, math.inf
    for rule in field.metadata:
        low = max(low, getattr(rule, "ge", low), getattr(rule, "gt", low - 1) + 1)
        high = min(high, getattr(rule, "le", high), getattr(rule, "lt", high + 1) - 1)
    return low, high


def deployment_environments() -> Iterator[tuple[str, dict[str, str]]]:
    """The AFTERSALES_* variables each deployment file sets (compose services, the
    Kubernetes ConfigMap and the Secret's example)."""
    for path in sorted((REPO / "deploy").rglob("*.y*ml")):
        for number, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            for where, env in environments_in(doc):
                yield f"{path.relative_to(REPO)}[{number}]{where}", env


def environments_in(doc: Any, where: str = "") -> Iterator[tuple[str, dict[str, str]]]:
    if isinstance(doc, dict):
        env = {k: str(v) for k, v in doc.items()
               if isinstance(k, str) and k.startswith("AFTERSALES_")}
        if env:
            yield where, env
        for key, value in doc.items():
            yield from environments_in(value, f"{where}.{key}")
    elif isinstance(doc, list):
        for index, item in enumerate(doc):
            if isinstance(item, dict) and str(item.get("name", "")).startswith("AFTERSALES_"):
                yield f"{where}[{index}]", {item["name"]: str(item.get("value", ""))}
            else:
                yield from environments_in(item, f"{where}[{index}]")


def test_every_variable_the_deployment_sets_is_a_setting() -> None:
    seen = 0
    for where, env in deployment_environments():
        seen += len(env)
        for variable in env:
            assert variable in FIELDS, f"{where}: {variable} is no setting"
    assert seen > 20


def test_the_kubernetes_example_configuration_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    k8s = REPO / "deploy" / "k8s"
    config = yaml.safe_load((k8s / "configmap.yaml").read_text(encoding="utf-8"))["data"]
    secret = yaml.safe_load((k8s / "secret.example.yaml").read_text(encoding="utf-8"))
    clear_environment(monkeypatch)
    for variable, value in {**config, **secret["stringData"]}.items():
        monkeypatch.setenv(variable, str(value))
    settings = load_settings()
    assert settings.smtp.tls == "starttls"  # a password is never sent in the clear
    assert settings.gateway.enabled_platforms() == ["douyin"]
