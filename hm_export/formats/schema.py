"""JSON Schemas (draft 2020-12) generated from the format dataclasses, committed under docs/schemas/.

``python -m hm_export.formats.schema docs/schemas`` rewrites them; ``tests/test_formats.py`` asserts the
committed files equal what the types give, so a change to a format's types shows up as a schema diff.

A dataclass becomes an object whose properties are its fields (a field named ``record``, the parsed JSON a
typed view keeps, is not one), required when the field has no default; other keys are allowed (the
manifest carries informational sections, e.g. ``pipeline`` and ``versions``, that no reader relies on).
The schemas say what the types say; the readers check more (ranges, paths inside the bundle, listed files,
hashes), with errors naming the file and the field (docs/bundle-format.md, docs/bank-format.md).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from hm_export.atomic import write_atomic

DRAFT = "https://json-schema.org/draft/2020-12/schema"
_SCALARS = {int: {"type": "integer"}, str: {"type": "string"}, bool: {"type": "boolean"}, float: {"type": "number"}}


def _schema(kind: Any, definitions: dict[str, Any]) -> dict[str, Any]:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return {}
    if origin is typing.Annotated:  # a record typed by another format's type: dict[str, Any] described by it
        described = args[1]
        return {"$ref": described} if isinstance(described, str) else _schema(described, definitions)
    if kind in _SCALARS:
        return dict(_SCALARS[kind])
    if origin in (typing.Union, types.UnionType):
        options = [_schema(arg, definitions) for arg in args if arg is not type(None)]  # None: the key is absent
        return options[0] if len(options) == 1 else {"anyOf": options}
    if origin in (list, tuple) and (origin is list or args[-1:] == (Ellipsis,)):
        return {"type": "array", "items": _schema(args[0], definitions)}
    if origin is tuple:
        items = [_schema(arg, definitions) for arg in args]
        return {"type": "array", "prefixItems": items, "minItems": len(items), "maxItems": len(items)}
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema(args[1], definitions)}
    if dataclasses.is_dataclass(kind):
        if kind.__name__ not in definitions:
            definitions[kind.__name__] = {}  # placeholder: recursive types
            definitions[kind.__name__] = _object(kind, definitions)
        return {"$ref": f"#/$defs/{kind.__name__}"}
    raise TypeError(f"no JSON Schema for {kind!r}")


def _object(cls: type, definitions: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, include_extras=True)
    properties, required = {}, []
    for field in dataclasses.fields(cls):
        if field.name == "record":
            continue
        properties[field.name] = _schema(hints[field.name], definitions)
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            required.append(field.name)
    body: dict[str, Any] = {"type": "object"}
    if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):
        body["description"] = " ".join(cls.__doc__.split())
    body |= {"properties": properties, "required": required}
    return body


def json_schema(cls: type, title: str, constants: dict[str, Any] | None = None) -> dict[str, Any]:
    """The schema of JSON documents of the dataclass ``cls``; ``constants``: top-level keys with one allowed
    value (``format``, ``format_version``)."""
    definitions: dict[str, Any] = {}
    body = _object(cls, definitions)
    constants = constants or {}
    body["properties"] = {
        **{key: {"const": value} for key, value in constants.items()},
        **{k: v for k, v in body["properties"].items() if k not in constants},
    }
    body["required"] = [*constants, *(k for k in body["required"] if k not in constants)]
    return {"$schema": DRAFT, "title": title, **body, "$defs": dict(sorted(definitions.items()))}


def schemas() -> dict[str, dict[str, Any]]:
    """File name -> schema of every versioned JSON format hm-export writes into a bundle."""
    from hm_export.bank.format import FORMAT_NAME, FORMAT_VERSION, IndexRecord
    from hm_export.formats import manifest
    from hm_export.formats.slot_contract import SLOT_SCHEMA_VERSION, SlotContract

    return {
        "manifest.schema.json": json_schema(
            manifest.Manifest,
            f"hm-export bundle manifest, version {manifest.VERSION} (docs/bundle-format.md)",
            {"format": manifest.FORMAT, "format_version": manifest.VERSION},
        ),
        "bank-index.schema.json": json_schema(
            IndexRecord,
            f"hm-export bank index.json, version {FORMAT_VERSION} (docs/bank-format.md)",
            {"format": FORMAT_NAME, "format_version": FORMAT_VERSION},
        ),
        "slot-contract.schema.json": json_schema(
            SlotContract,
            f"hm-export slot contract (manifest.slot), schema version {SLOT_SCHEMA_VERSION} (docs/bundle-format.md)",
            {"schema_version": SLOT_SCHEMA_VERSION},
        ),
    }


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else Path("docs/schemas")
    out.mkdir(parents=True, exist_ok=True)
    for name, schema in schemas().items():
        write_atomic(out / name, [render(schema).encode()])
        print(out / name)


if __name__ == "__main__":
    main(sys.argv[1:])
