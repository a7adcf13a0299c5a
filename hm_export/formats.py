"""Reading the versioned JSON files of hm-export formats with errors that name the file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def read_format_json(
    path: Path, name: str, version: int, error: type[Exception], what: str, version_key: str = "format_version"
) -> dict[str, Any]:
    """Parse ``path`` as a JSON object whose ``format`` is ``name`` and ``version_key`` is ``version``."""
    if not path.is_file():
        raise error(f"{path}: missing (not {what})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != name:
        raise error(f"{path}: format is {data.get('format')!r}, expected {name!r}")
    if data.get(version_key) != version:
        raise error(
            f"{path}: {version_key} {data.get(version_key)!r} is not supported (this hm-export reads {version})"
        )
    return data


def read_json_lines(path: Path, accept: Callable[[Any], bool], requirement: str, what: str) -> list[dict[str, Any]]:
    """The non-blank JSON lines of ``path``; a line that fails ``accept`` is ``{path}:{line}: {requirement}``."""
    items = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON ({exc})") from exc
        if not accept(item):
            raise ValueError(f"{path}:{number}: {requirement}")
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no {what}")
    return items
