"""The slot contract (``manifest.slot``, docs/bundle-format.md): the graph inputs a program's memory is read from,
their shapes, dtypes and the hidden-unit ranges of each level, and the schema hash loaders check at open.

Pure data (no torch): the runtime, the exporter and the C++ runtime (``slot.cpp``) read it alike; its JSON Schema
is docs/schemas/slot-contract.schema.json (:mod:`hm_export.formats.schema`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from hm_export.config import ModelConfig
from hm_export.errors import BundleError

SLOT_SCHEMA_VERSION = 1
TOKENS_INPUT = "tokens"
LOGITS_OUTPUT = "logits"


@dataclass(frozen=True)
class SlotTensor:
    """One slot input. ``level_ranges[l]`` lists the ``(start, stop)`` spans of level ``l`` on ``hidden_axis``;
    ``sources[i]`` names the block matrix (``gate``/``up``/``down``) copied into span ``i`` of every level."""

    name: str
    layer: int
    memory_index: int
    role: str
    shape: tuple[int, ...]
    dtype: str
    hidden_axis: int
    sources: tuple[str, ...]
    level_ranges: tuple[tuple[tuple[int, int], ...], ...]


@dataclass(frozen=True)
class SlotContract:
    """Everything a runtime needs to fill the slot: names, shapes, dtypes, level ranges, schema hash."""

    seq_len: int
    d_model: int
    branching: tuple[int, ...]
    widths: tuple[int, ...]
    memory_layers: tuple[int, ...]
    tensors: tuple[SlotTensor, ...]
    dtype: str = "float32"

    @classmethod
    def for_model(cls, cfg: ModelConfig, seq_len: int, dtype: str = "float32") -> SlotContract:
        mem, d, width = cfg.memory, cfg.d_model, cfg.memory.total_width
        spans = [(off, off + r) for off, r in zip(mem.level_offsets(), mem.widths)]
        tensors = []
        for index, layer in enumerate(mem.layers):
            tensors.append(
                SlotTensor(
                    name=f"mem{layer}_gate_up",
                    layer=layer,
                    memory_index=index,
                    role="gate_up",
                    shape=(1, d, 2 * width),
                    dtype=dtype,
                    hidden_axis=2,
                    sources=("gate", "up"),
                    level_ranges=tuple((span, (span[0] + width, span[1] + width)) for span in spans),
                )
            )
            tensors.append(
                SlotTensor(
                    name=f"mem{layer}_down",
                    layer=layer,
                    memory_index=index,
                    role="down",
                    shape=(1, width, d),
                    dtype=dtype,
                    hidden_axis=1,
                    sources=("down",),
                    level_ranges=tuple((span,) for span in spans),
                )
            )
        return cls(seq_len, d, mem.branching, mem.widths, mem.layers, tuple(tensors), dtype)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["schema_version"] = SLOT_SCHEMA_VERSION
        body["tokens"] = {"name": TOKENS_INPUT, "shape": [1, self.seq_len], "dtype": "int64"}
        body["outputs"] = [{"name": LOGITS_OUTPUT, "shape": [1, self.seq_len, None], "dtype": "float32"}]
        body["schema_hash"] = self.schema_hash
        return body

    @property
    def schema_hash(self) -> str:
        """sha256 over the layout-defining fields (canonical JSON), checked by loaders at open."""
        canonical = json.dumps({"version": SLOT_SCHEMA_VERSION, **asdict(self)}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlotContract:
        tensors = tuple(
            SlotTensor(
                **{
                    **t,
                    "shape": tuple(t["shape"]),
                    "sources": tuple(t["sources"]),
                    "level_ranges": tuple(tuple(tuple(s) for s in lv) for lv in t["level_ranges"]),
                }
            )
            for t in data["tensors"]
        )
        contract = cls(
            data["seq_len"],
            data["d_model"],
            tuple(data["branching"]),
            tuple(data["widths"]),
            tuple(data["memory_layers"]),
            tensors,
            data["dtype"],
        )
        if data.get("schema_hash") != contract.schema_hash:
            raise BundleError(
                f"slot contract schema_hash {data.get('schema_hash')!r} does not match its fields "
                f"({contract.schema_hash}): the manifest was edited or written by an incompatible tool"
            )
        return contract
