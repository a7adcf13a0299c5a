"""Reading the versioned JSON files of hm-export formats: bounded, strict, with errors naming file and field.

The formats as code: :mod:`hm_export.formats.manifest` (the bundle manifest), :mod:`hm_export.bank.format`
(bank index and block header), :mod:`hm_export.formats.slot_contract` (the slot contract);
:mod:`hm_export.formats.schema` generates their JSON Schemas (docs/schemas/, docs/architecture.md).

:func:`parse_json` is the one JSON reader for files hm-export did not just write itself.  Beyond RFC 8259
it refuses what a hostile or damaged file uses to crash or mislead a reader: nesting deeper than
:data:`MAX_DEPTH`, integers outside 64 bits (Python would read a 4,300-digit number; C++ would overflow),
non-finite numbers (``1e999``, ``NaN``, ``Infinity``), duplicate keys (Python keeps the last, the C++
reader the first: a manifest must mean one thing to both), and bytes that are not UTF-8.

:class:`Fields` reads typed, range-checked fields from a parsed file; every refusal names the file and the
dotted field (``model.vocab_size``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hm_export.errors import HmExportError, InputError
from hm_export.safeio import read_capped

MAX_DEPTH = 64  # the formats nest a few levels
MAX_JSON_BYTES = 256 << 20  # a bank index of ~1.5 M blocks; manifests and checks are far smaller
INT_RANGE = (-(2**63), 2**63 - 1)


class _Refused(Exception):
    pass


def _int(text: str) -> int:
    if len(text.lstrip("-")) > 19:
        raise _Refused(f"integer of {len(text.lstrip('-'))} digits")
    value = int(text)
    if not INT_RANGE[0] <= value <= INT_RANGE[1]:
        raise _Refused(f"integer {text} does not fit 64 bits")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {text[:40]} is out of range")
    return value


def _constant(text: str) -> Any:
    raise _Refused(f"{text} is not a JSON number")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"duplicate key {key[:80]!r}")
        out[key] = value
    return out


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(data: bytes | str, path: str | Path, error: type[HmExportError], what: str = "JSON") -> Any:
    """Parse JSON text strictly (see the module docstring); errors are ``error`` naming ``path``."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(
            text, parse_int=_int, parse_float=_float, parse_constant=_constant, object_pairs_hook=_object
        )
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({what}): byte {exc.start}", path=path) from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply ({what})", path=path) from None
    except _Refused as exc:
        raise error(f"{path}: refused JSON ({what}): {exc}", path=path) from None
    except ValueError as exc:  # JSONDecodeError
        raise error(f"{path}: not valid JSON ({what}): {exc}", path=path) from None
    if _depth(value) > MAX_DEPTH:
        raise error(f"{path}: JSON nested deeper than {MAX_DEPTH} levels ({what})", path=path)
    return value


def read_json_file(
    path: Path, error: type[HmExportError], what: str, exact: int | None = None, limit: int = MAX_JSON_BYTES
) -> Any:
    """A JSON file read with :func:`~hm_export.safeio.read_capped` (regular file, no symlink, at most
    ``limit`` bytes, exactly ``exact`` when a manifest declares its size) and :func:`parse_json`."""
    return parse_json(read_capped(path, what, limit, error, exact=exact), path, error, what)


def read_format_json(
    path: Path,
    name: str,
    version: int,
    error: type[HmExportError],
    what: str,
    version_key: str = "format_version",
    data: bytes | None = None,
    exact: int | None = None,
) -> dict[str, Any]:
    """Parse ``path`` (or its already read bytes ``data``) as a JSON object whose ``format`` is ``name`` and
    ``version_key`` is ``version``."""
    if data is None:
        try:
            data = read_capped(path, what, MAX_JSON_BYTES, error, exact=exact)
        except HmExportError as exc:
            if not Path(path).exists() and not Path(path).is_symlink():
                raise error(f"{path}: missing (not {what})", path=path) from exc
            raise
    body = parse_json(data, path, error, what)
    if not isinstance(body, dict):
        raise error(f"{path}: expected a JSON object, got {type(body).__name__}", path=path)
    if body.get("format") != name:
        raise error(f"{path}: format is {_short(body.get('format'))}, expected {name!r}", path=path, field="format")
    if body.get(version_key) != version or isinstance(body.get(version_key), bool):
        raise error(
            f"{path}: {version_key} {_short(body.get(version_key))} is not supported (this hm-export reads {version})",
            path=path,
            field=version_key,
        )
    return body


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_json_lines(path: Path, accept: Callable[[Any], bool], requirement: str, what: str) -> list[dict[str, Any]]:
    """The non-blank JSON lines of ``path``; a line that fails ``accept`` is ``{path}:{line}: {requirement}``."""
    data = read_capped(path, what, MAX_JSON_BYTES, InputError)
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text: byte {exc.start}", path=path) from None
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        item = parse_json(line, f"{path}:{number}", InputError, what)
        if not accept(item):
            raise InputError(f"{path}:{number}: {requirement}", path=path)
        items.append(item)
    if not items:
        raise InputError(f"{path}: no {what}", path=path)
    return items


_KINDS: dict[type, str] = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}


class Fields:
    """Typed, range-checked fields of one parsed JSON file; errors are ``error`` naming ``path`` and the
    dotted field."""

    def __init__(self, path: str | Path, error: type[HmExportError]) -> None:
        self.path, self.error = path, error

    def refuse(self, field: str, problem: str) -> HmExportError:
        return self.error(f"{self.path}: {field}: {problem}", path=self.path, field=field)

    def get(
        self,
        container: Any,
        key: str | int,
        field: str,
        kind: type,
        lo: float | None = None,
        hi: float | None = None,
        optional: bool = False,
    ) -> Any:
        """``container[key]`` checked to be ``kind`` (``int`` excludes booleans, ``float`` accepts integers)
        and, for numbers, within ``[lo, hi]``; ``None`` when ``optional`` and absent."""
        if isinstance(container, dict):
            if key not in container:
                if optional:
                    return None
                raise self.refuse(field, "missing")
            value = container[key]
        elif isinstance(container, list) and isinstance(key, int) and 0 <= key < len(container):
            value = container[key]
        else:
            raise self.refuse(field, "missing")
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise self.refuse(field, f"expected {_KINDS.get(kind, kind.__name__)}, got {_short(value)}")
        if kind in (int, float) and ((lo is not None and value < lo) or (hi is not None and value > hi)):
            raise self.refuse(field, f"{value} is outside [{lo}, {hi}]")
        return value

    def ints(self, container: Any, key: str, field: str, lo: int, hi: int, length: int | None = None) -> list[int]:
        """A list of integers each within ``[lo, hi]`` (of ``length`` items when given)."""
        values = self.get(container, key, field, list)
        if length is not None and len(values) != length:
            raise self.refuse(field, f"{len(values)} values, expected {length}")
        return [self.get(values, i, f"{field}[{i}]", int, lo, hi) for i in range(len(values))]
