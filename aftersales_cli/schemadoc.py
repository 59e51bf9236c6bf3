"""Writes the JSON Schemas of the inbound events (`aftersales schemas`)."""

from __future__ import annotations

import json
from pathlib import Path

from shared.schemas.events import event_json_schemas


def write_schemas(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in event_json_schemas().items():
        path = folder / f"{name}.schema.json"
        path.write_text(json.dumps(schema, ensure_ascii=False, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
