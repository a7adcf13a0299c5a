"""Declarative model configuration: the anchor transformer and its hierarchical FFN memory.

The node layout of the memory tree is fixed here, because the checkpoint, the bank files, the router
and the slot contract all index nodes the same way: level ``l`` holds ``prod(branching[:l+1])``
nodes numbered ``0..n_l-1``; node ``i`` at level ``l`` has children ``i*k + c`` (``c < k``) at
level ``l+1`` where ``k = branching[l+1]``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from math import prod
from numbers import Integral
from pathlib import Path
from typing import Any

from hm_export.errors import ConfigError

ANCHOR_ARCHITECTURE = "hm-anchor"
HOST_ARCHITECTURE_PREFIX = "hf-"
# Upper bounds of the sizes a configuration may declare: far above any model hm-export targets (Gemma's
# 262k vocabulary, 64k-token windows), low enough that no product of them overflows 64 bits or a C int,
# so a hostile manifest cannot make a reader allocate or index without bound.
LIMITS = {
    "vocab_size": 1 << 22,
    "d_model": 1 << 16,
    "n_layers": 1 << 10,
    "n_heads": 1 << 10,
    "n_kv_heads": 1 << 10,
    "ffn_hidden": 1 << 18,
    "max_seq_len": 1 << 20,
    "branching": 1 << 16,
    "width": 1 << 16,
    "nodes": 1 << 24,  # blocks in a whole bank
}

__all__ = ["ConfigError", "MemoryConfig", "ModelConfig"]


def _check_int(name: str, value: object, limit: int) -> None:
    if not isinstance(value, Integral) or isinstance(value, bool) or not 1 <= value <= limit:
        raise ConfigError(f"{name} must be an integer in [1, {limit}], got {value!r}", field=name)


@dataclass(frozen=True)
class MemoryConfig:
    """Hierarchical FFN memory: per level a branching factor ``k_l`` and a block width ``r_l``."""

    branching: tuple[int, ...]
    widths: tuple[int, ...]
    layers: tuple[int, ...]  # memory-carrying anchor layers, ascending

    def __post_init__(self) -> None:
        for name in ("branching", "widths", "layers"):
            values = getattr(self, name)
            if isinstance(values, str | bytes | dict) or not all(
                isinstance(v, Integral) and not isinstance(v, bool) for v in values
            ):
                raise ConfigError(f"memory.{name} must be a list of integers, got {values!r}", field=f"memory.{name}")
            object.__setattr__(self, name, tuple(int(v) for v in values))
        if not self.branching or len(self.branching) != len(self.widths):
            raise ConfigError(
                f"memory.branching {self.branching} and memory.widths {self.widths} "
                "must be non-empty and of equal length (one entry per level)"
            )
        for k in self.branching:
            _check_int("memory.branching", k, LIMITS["branching"])
        for r in self.widths:
            _check_int("memory.widths", r, LIMITS["width"])
        nodes = sum(prod(self.branching[: level + 1]) for level in range(len(self.branching)))
        if nodes > LIMITS["nodes"]:
            raise ConfigError(f"memory tree of {nodes} nodes, more than {LIMITS['nodes']}", field="memory.branching")
        if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 0:
            raise ConfigError(f"memory.layers {self.layers} must be non-empty, ascending, unique, non-negative")

    @property
    def num_levels(self) -> int:
        return len(self.branching)

    def nodes_at(self, level: int) -> int:
        return prod(self.branching[: level + 1])

    @property
    def total_width(self) -> int:
        """R: hidden units the fetched path adds to each memory layer's FFN."""
        return sum(self.widths)

    def level_offsets(self) -> list[int]:
        """Start of each level's range within the concatenated width R."""
        offsets, start = [], 0
        for r in self.widths:
            offsets.append(start)
            start += r
        return offsets

    def validate_path(self, path: Sequence[int]) -> tuple[int, ...]:
        """Check that ``path`` is a root-to-leaf chain of node ids; return it as a tuple."""
        path = tuple(int(p) for p in path)
        if len(path) != self.num_levels:
            raise ConfigError(f"path {path} has {len(path)} levels, the memory has {self.num_levels}")
        for level, node in enumerate(path):
            if not 0 <= node < self.nodes_at(level):
                raise ConfigError(f"path {path}: node {node} out of range at level {level}")
            if level and node // self.branching[level] != path[level - 1]:
                raise ConfigError(f"path {path}: node {node} at level {level} is not a child of {path[level - 1]}")
        return path


@dataclass(frozen=True)
class ModelConfig:
    """The anchor transformer plus its memory.

    ``architecture`` ``"hm-anchor"`` is :class:`~hm_export.model.MemoryLM` (pre-norm RMSNorm, RoPE, SwiGLU,
    tied embeddings).  ``"hf-<family>"`` is a Hugging Face ``transformers`` host model with memories attached
    to its MLPs (:mod:`hm_export.hf`): ``host`` holds the host's ``transformers`` config and the other fields
    summarise it (the slot, the bank and the KV cache only need these), ``attention_head_dim`` where the
    host's head size is not ``d_model // n_heads``.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    max_seq_len: int
    memory: MemoryConfig
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    architecture: str = field(default=ANCHOR_ARCHITECTURE)
    host: dict[str, Any] | None = None
    attention_head_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            _check_int(name, getattr(self, name), LIMITS[name])
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise ConfigError(f"{name} must be a positive finite number, got {value!r}", field=name)
        if not isinstance(self.architecture, str):
            raise ConfigError(f"architecture must be a string, got {self.architecture!r}", field="architecture")
        if self.attention_head_dim is not None:
            _check_int("attention_head_dim", self.attention_head_dim, LIMITS["d_model"])
        if self.architecture == ANCHOR_ARCHITECTURE:
            if self.host is not None or self.attention_head_dim is not None:
                raise ConfigError(f"architecture {ANCHOR_ARCHITECTURE!r} takes no host config or attention_head_dim")
            if self.d_model % self.n_heads:
                raise ConfigError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        elif not self.architecture.startswith(HOST_ARCHITECTURE_PREFIX):
            raise ConfigError(
                f"architecture {self.architecture!r} is neither {ANCHOR_ARCHITECTURE!r} "
                f"nor a Hugging Face host ('{HOST_ARCHITECTURE_PREFIX}<family>')"
            )
        elif not isinstance(self.host, dict):
            raise ConfigError(f"architecture {self.architecture!r} needs the host's transformers config in 'host'")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError("head dimension must be even for RoPE")
        if self.memory.layers[-1] >= self.n_layers:
            raise ConfigError(f"memory.layers {self.memory.layers} exceed n_layers {self.n_layers}")

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.d_model // self.n_heads

    def block_params(self, level: int) -> int:
        """Parameters of one bank block: G, U (r x d) and D (d x r) for every memory layer."""
        return 3 * self.memory.widths[level] * self.d_model * len(self.memory.layers)

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        for optional in ("host", "attention_head_dim"):  # only Hugging Face hosts carry them
            if body[optional] is None:
                del body[optional]
        return body

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict) or not isinstance(data.get("memory"), dict):
            raise ConfigError("model config must be an object with a 'memory' object")
        data = dict(data)
        try:
            memory = MemoryConfig(**data.pop("memory"))
            return cls(memory=memory, **data)
        except (TypeError, KeyError) as exc:
            raise ConfigError(f"model config does not match ModelConfig: {exc}") from exc

    def to_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
