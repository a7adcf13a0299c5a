"""The memory slot: the graph inputs that receive a fetched path, and the contract describing them.

Per memory layer ``j`` (an anchor layer index) the program takes two inputs:

* ``mem{j}_gate_up`` ``[1, d, 2R]``: ``G^T`` of every level in columns ``[0, R)``, ``U^T`` in ``[R, 2R)``;
* ``mem{j}_down`` ``[1, R, d]``: ``D^T`` of every level in rows ``[0, R)``.

Level ``l`` occupies hidden units ``[off_l, off_l + r_l)`` (``off_l = r_0 + ... + r_{l-1}``).  Filling a
level copies one bank block's ``gate/up/down[j]`` into those ranges; nothing else in the slot moves.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hm_export.config import ModelConfig
from hm_export.errors import BundleError
from hm_export.model import LayerMemory, MemoryLM

if TYPE_CHECKING:
    from hm_export.kernels.strategies import SlotLayout

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

    def empty_slot(self) -> list[Tensor]:
        return [torch.zeros(t.shape, dtype=getattr(torch, t.dtype)) for t in self.tensors]


def slot_tensors(memory: Sequence[LayerMemory]) -> list[Tensor]:
    """Flatten an assembled memory (batch 1) into slot-input order: gate_up, down per memory layer."""
    return [t for pair in memory for t in pair]


class SlotParameters(nn.Module):
    """Holds the memory of one path as *parameters* ``slot.mem{j}_gate_up`` / ``slot.mem{j}_down`` (plus the
    ``_scales`` of a quantized slot strategy, :mod:`hm_export.kernels.strategies`).

    Exporting a module built on this gives a program where the memory is constant; the slot passes lift
    exactly the parameters named by :meth:`memory_parameter_names` into graph inputs.
    """

    cfg: ModelConfig
    layout: SlotLayout | None

    def hold_memory(self, memory: Sequence[LayerMemory], layout: SlotLayout | None = None) -> None:
        """``layout``: the slot strategy; None: a float32 slot read by ``bmm``."""
        self.layout = layout
        if layout is None:
            tensors = {}
            for layer, (gate_up, down) in zip(self.cfg.memory.layers, memory):
                tensors[f"mem{layer}_gate_up"], tensors[f"mem{layer}_down"] = gate_up.detach(), down.detach()
        else:
            tensors = layout.slot_tensors(memory, self.cfg.memory.layers)
        self.slot = nn.ParameterDict()
        for name, tensor in tensors.items():
            self.slot[name] = nn.Parameter(tensor.clone(), requires_grad=False)

    @property
    def slot_reader(self) -> str:
        """How the program reads the slot (``bmm``, ``convert`` or ``memory_swiglu``; see check_slot_access)."""
        return "bmm" if self.layout is None else self.layout.strategy.reader

    def layer_memory(self, layer: int) -> LayerMemory | Callable[[Tensor], Tensor]:
        """What :func:`~hm_export.model.memory_ffn` computes memory layer ``layer``'s FFN from."""
        if self.layout is None:
            return self.slot[f"mem{layer}_gate_up"], self.slot[f"mem{layer}_down"]
        return self.layout.layer_memory(self.slot, layer)

    def slot_memory(self) -> list[LayerMemory | Callable[[Tensor], Tensor]]:
        return [self.layer_memory(j) for j in self.cfg.memory.layers]

    def memory_parameter_names(self) -> list[str]:
        """Fully qualified names of the memory parameters, in slot-input order."""
        return [f"slot.{name}" for name in self.slot]

    def anchor_parameter_names(self) -> list[str]:
        return [name for name, _ in self.named_parameters() if not name.startswith("slot.")]


class SlotModule(MemoryLM, SlotParameters):
    """The anchor of a MemoryLM plus the memory of one path as parameters (:class:`SlotParameters`).

    The bank itself is not a submodule, so no bank weight can reach the program.
    """

    def __init__(self, model: MemoryLM, memory: Sequence[LayerMemory], layout: SlotLayout | None = None) -> None:
        nn.Module.__init__(self)  # share the anchor's modules; deliberately no bank
        self.cfg = model.cfg
        self.embed, self.blocks, self.norm = model.embed, model.blocks, model.norm
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        self.register_buffer("causal_mask", model.causal_mask, persistent=False)
        self.hold_memory(memory, layout)

    def forward(self, tokens: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(tokens, self.slot_memory())
