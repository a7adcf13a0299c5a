"""Slot strategies: in which form a fetched memory block sits in the slot, and how the program reads it.

===============  ======================  ===============================================================
strategy         slot per memory layer   program
===============  ======================  ===============================================================
``host-fp32``    float32 gate_up, down   ``bmm`` on the slot (the default; XNNPACK delegates it)
``host-fp16``    float16 gate_up, down   casts the slot to float32, then ``bmm``
``graph-int8``   int8 codes + scales     dequantizes in the graph on every call, then ``bmm``
``graph-int4``   packed int4 + scales    unpacks (floor-divide / remainder) and dequantizes per call
``fused-int8``   int8 codes + scales     ``hm_export::memory_swiglu``: dequantizes inside the matmul
``fused-int4``   packed int4 + scales    same, int4 (ExecuTorch only: the C++ kernel in kernels/)
===============  ======================  ===============================================================

The quantized forms hold the bank's own codes: a block's int8/int4 bytes are copied into the slot and its
float16 scales repeated onto the slot's scale grid, never re-quantized.  The layout of each tensor is in
:mod:`hm_export.kernels` (the op's docstring); :class:`SlotLayout` fixes its group sizes for a model and a bank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor, nn

from hm_export.bank import BankError, BankReader, get_scheme
from hm_export.config import ANCHOR_ARCHITECTURE, ModelConfig
from hm_export.errors import UsageError
from hm_export.kernels import dequantize, memory_swiglu
from hm_export.model import LayerMemory
from hm_export.slot import SlotContract, SlotTensor


@dataclass(frozen=True)
class SlotStrategy:
    """``storage``: what the slot holds (``float32``, ``float16``, ``int8``, ``int4``); ``reader``: how the
    program reads it (``bmm``, ``convert``: a dtype conversion starting an in-graph dequantization, or
    ``memory_swiglu``: the fused op); ``targets``: the targets that can emit it."""

    name: str
    storage: str
    reader: str
    targets: tuple[str, ...]

    @property
    def quantized(self) -> bool:
        return self.storage in ("int8", "int4")


_FLOAT_TARGETS = ("executorch", "onnx", "coreml", "executorch-coreml")
STRATEGIES: dict[str, SlotStrategy] = {
    s.name: s
    for s in (
        SlotStrategy("host-fp32", "float32", "bmm", _FLOAT_TARGETS),
        SlotStrategy("host-fp16", "float16", "convert", ("executorch", "onnx")),
        SlotStrategy("graph-int8", "int8", "convert", ("executorch", "onnx")),
        SlotStrategy("graph-int4", "int4", "convert", ("executorch", "onnx")),
        SlotStrategy("fused-int8", "int8", "memory_swiglu", ("executorch",)),
        SlotStrategy("fused-int4", "int4", "memory_swiglu", ("executorch",)),
    )
}
DEFAULT_STRATEGY = "host-fp32"  # a bundle without a recorded strategy has this slot
AUTO = "auto"
# What ``auto`` picks per target, best first (measured in docs/kernels.md): ExecuTorch reads an int4/int8 bank's
# codes with the fused kernel (decode 0.92-0.97x of the float32-slot program, slot 1/7); ONNX Runtime keeps
# the float32 slot (every quantized form decodes slower there).  The first candidate that every target of the
# recipe can emit and the bank can fill wins.
PREFERENCE: dict[str, tuple[str, ...]] = {"executorch": ("fused-int4", "fused-int8", DEFAULT_STRATEGY)}


def get_strategy(name: str) -> SlotStrategy:
    if name not in STRATEGIES:
        raise UsageError(f"unknown slot strategy {name!r}, expected one of {sorted(STRATEGIES)}")
    return STRATEGIES[name]


def check_strategy(name: str, targets: Sequence[str]) -> None:
    """ValueError when ``name`` is neither ``auto`` nor a strategy every one of ``targets`` can emit."""
    if name == AUTO:
        return
    strategy = get_strategy(name)
    unsupported = [t for t in targets if t not in strategy.targets]
    if unsupported:
        raise UsageError(f"slot strategy {name!r} is not available for targets {unsupported} (only {strategy.targets})")


def resolve_layout(name: str, targets: Sequence[str], cfg: ModelConfig, level_schemes: Sequence[str]) -> SlotLayout:
    """The layout of strategy ``name`` for a recipe's targets and bank; ``auto`` picks by :data:`PREFERENCE`."""
    check_strategy(name, targets)
    if name != AUTO:
        return SlotLayout.for_bank(name, cfg, level_schemes)
    candidates = PREFERENCE.get(targets[0], (DEFAULT_STRATEGY,))
    for candidate in candidates:
        if all(t in STRATEGIES[candidate].targets for t in targets):
            try:
                return SlotLayout.for_bank(candidate, cfg, level_schemes)
            except ValueError:  # the bank cannot fill it (other scheme, odd widths): next candidate
                continue
    return SlotLayout(STRATEGIES[DEFAULT_STRATEGY])


@dataclass(frozen=True)
class SlotLayout:
    """A strategy made concrete for one model and bank: rows per scale of ``gate_up`` and of ``down`` (0 for
    float storage).  The groups divide every level's block groups and widths, so each slot scale row belongs to
    exactly one block scale row."""

    strategy: SlotStrategy
    gate_up_group: int = 0
    down_group: int = 0

    @classmethod
    def for_bank(cls, name: str, cfg: ModelConfig, level_schemes: Sequence[str]) -> SlotLayout:
        """The layout of strategy ``name`` for ``cfg``'s memory and a bank whose levels use ``level_schemes``;
        ValueError when the bank cannot fill it (a quantized slot copies the bank's codes, never requantizes)."""
        strategy = get_strategy(name)
        if strategy.reader == "memory_swiglu" and (activation := _memory_activation(cfg)) != "silu":
            raise UsageError(
                f"slot strategy {name!r} runs the SiLU memory kernel; this model's memory uses {activation!r}"
            )
        if not strategy.quantized:
            return cls(strategy)
        schemes = [get_scheme(s) for s in level_schemes]
        bits = 8 if strategy.storage == "int8" else 4
        wrong = [s.name for s in schemes if getattr(s, "bits", None) != bits]
        if wrong:
            raise UsageError(
                f"slot strategy {name!r} needs every bank level in {strategy.storage}; "
                f"the bank has {list(level_schemes)}"
            )
        d, widths = cfg.d_model, cfg.memory.widths
        if bits == 4 and (d % 2 or any(r % 2 for r in widths)):
            raise UsageError(f"an int4 slot packs column pairs: d_model {d} and widths {widths} must be even")
        # A level's block groups: ``min(g, rows)`` rows (int8: all rows); the slot grid must refine all of them.
        gate_up = math.gcd(d, *(s.group(d) for s in schemes))
        down = math.gcd(*widths, *(s.group(r) for s, r in zip(schemes, widths)))
        return cls(strategy, gate_up, down)

    def contract(self, cfg: ModelConfig, seq_len: int) -> SlotContract:
        """The slot contract: per memory layer ``gate_up``, (``gate_up_scales``), ``down``, (``down_scales``)."""
        base = SlotContract.for_model(cfg, seq_len, self.strategy.storage)
        if not self.strategy.quantized:
            return base
        pack = 2 if self.strategy.storage == "int4" else 1
        codes_dtype = "uint8" if pack == 2 else "int8"
        tensors: list[SlotTensor] = []
        for tensor in base.tensors:
            rows, cols = tensor.shape[1:]
            if tensor.role == "gate_up":  # columns hold the levels: int4 halves them, scales keep them
                group = self.gate_up_group
                codes_ranges = _scaled(tensor.level_ranges, pack)
                scale_ranges = tensor.level_ranges
                codes_shape, scale_shape = (1, rows, cols // pack), (1, rows // group, cols)
            else:  # down: rows hold the levels; int4 packs the d columns, scales have rows / group rows
                group = self.down_group
                codes_ranges = tensor.level_ranges
                scale_ranges = _scaled(tensor.level_ranges, group)
                codes_shape, scale_shape = (1, rows, cols // pack), (1, rows // group, cols)
            tensors.append(_replace(tensor, tensor.name, tensor.role, codes_shape, codes_dtype, codes_ranges))
            scales = f"{tensor.role}_scales"
            tensors.append(_replace(tensor, f"{tensor.name}_scales", scales, scale_shape, "float16", scale_ranges))
        return SlotContract(
            base.seq_len, base.d_model, base.branching, base.widths, base.memory_layers, tuple(tensors), self.name
        )

    @property
    def name(self) -> str:
        """The contract's ``dtype``: the storage, with the scale grid of a quantized slot (``int4-gu32-d16``)."""
        if not self.strategy.quantized:
            return self.strategy.storage
        return f"{self.strategy.storage}-gu{self.gate_up_group}-d{self.down_group}"

    def slot_tensors(self, memory: Sequence[LayerMemory], layers: Sequence[int]) -> dict[str, Tensor]:
        """Slot tensors (name -> tensor, contract order) holding ``memory`` (float, batch 1) in this layout:
        quantized symmetric on the slot's scale grid (example values for tracing, and eager checks)."""
        out: dict[str, Tensor] = {}
        for layer, (gate_up, down) in zip(layers, memory):
            for role, weight, group in (("gate_up", gate_up, self.gate_up_group), ("down", down, self.down_group)):
                name = f"mem{layer}_{role}"
                if self.strategy.quantized:
                    out[name], out[f"{name}_scales"] = quantize(weight.detach(), group, self.strategy.storage)
                else:
                    out[name] = weight.detach().to(getattr(torch, self.strategy.storage)).contiguous()
        return out

    def layer_memory(self, slot: nn.ParameterDict, layer: int) -> LayerMemory | Callable[[Tensor], Tensor]:
        """What the program computes the memory FFN of memory layer ``layer`` from (see :func:`memory_ffn`)."""
        gate_up, down = slot[f"mem{layer}_gate_up"], slot[f"mem{layer}_down"]
        if not self.strategy.quantized:
            return (gate_up, down) if self.strategy.storage == "float32" else (gate_up.float(), down.float())
        gate_up_scales, down_scales = slot[f"mem{layer}_gate_up_scales"], slot[f"mem{layer}_down_scales"]
        if self.strategy.reader == "memory_swiglu":
            return partial(
                memory_swiglu, gate_up=gate_up, gate_up_scales=gate_up_scales, down=down, down_scales=down_scales
            )
        return dequantize(gate_up, gate_up_scales), dequantize(down, down_scales)

    def program_memory(self, slot: Sequence[Tensor]) -> list[LayerMemory | Callable[[Tensor], Tensor]]:
        """What the program computes each memory layer's FFN from, for slot tensors in contract order: the fused
        op over the codes for ``memory_swiglu`` strategies (int8 activations, as the kernel computes), else
        :meth:`float_memory` (the eager model as exported; what golden checks and ``verify`` compare with)."""
        if self.strategy.reader != "memory_swiglu":
            return list(self.float_memory(slot))
        per_layer = [slot[i : i + 4] for i in range(0, len(slot), 4)]
        return [
            partial(memory_swiglu, gate_up=gu, gate_up_scales=gus, down=dn, down_scales=dns)
            for gu, gus, dn, dns in per_layer
        ]

    def float_memory(self, slot: Sequence[Tensor]) -> list[LayerMemory]:
        """Float32 ``(gate_up, down)`` per memory layer of slot tensors in contract order (eager reference)."""
        if not self.strategy.quantized:
            return [(gate_up.float(), down.float()) for gate_up, down in zip(slot[0::2], slot[1::2])]
        per_layer = [slot[i : i + 4] for i in range(0, len(slot), 4)]
        return [(dequantize(gu, gus), dequantize(dn, dns)) for gu, gus, dn, dns in per_layer]


LevelRanges = tuple[tuple[tuple[int, int], ...], ...]  # SlotTensor.level_ranges


def _scaled(ranges: LevelRanges, divisor: int) -> LevelRanges:
    return tuple(tuple((lo // divisor, hi // divisor) for lo, hi in level) for level in ranges)


def _replace(
    tensor: SlotTensor, name: str, role: str, shape: tuple[int, ...], dtype: str, ranges: LevelRanges
) -> SlotTensor:
    return SlotTensor(
        name, tensor.layer, tensor.memory_index, role, shape, dtype, tensor.hidden_axis, tensor.sources, ranges
    )


def quantize(weight: Tensor, group: int, storage: str) -> tuple[Tensor, Tensor]:
    """Symmetric quantization of float ``[1, rows, cols]`` with one float16 scale per ``group`` rows of a column:
    (int8 codes, or uint8 packed int4 codes + 8, low nibble first; scales ``[1, rows / group, cols]``)."""
    _, rows, cols = weight.shape
    grouped = weight.float().reshape(1, rows // group, group, cols)
    qmax = 127 if storage == "int8" else 7
    scales = (grouped.abs().amax(dim=2) / qmax).half()
    safe = torch.where(scales == 0, torch.ones_like(scales), scales).float()
    codes = torch.clamp(torch.round(grouped / safe[:, :, None]), -qmax, qmax).reshape(1, rows, cols)
    if storage == "int8":
        return codes.to(torch.int8), scales
    nibbles = (codes + 8).to(torch.uint8)
    return nibbles[..., 0::2] + nibbles[..., 1::2] * 16, scales


def layout_record(layout: SlotLayout) -> dict[str, object]:
    """The manifest fields (in the ``slot`` section) that describe the strategy."""
    return {"strategy": layout.strategy.name, "gate_up_group": layout.gate_up_group, "down_group": layout.down_group}


def layout_from_record(slot: dict) -> SlotLayout:
    """The layout recorded by :func:`layout_record` (a bundle without one has the default float32 slot)."""
    name = slot.get("strategy", DEFAULT_STRATEGY)
    return SlotLayout(get_strategy(name), int(slot.get("gate_up_group", 0)), int(slot.get("down_group", 0)))


class QuantizedLevelWriter:
    """Copies a quantized block into a quantized slot: the codes' bytes into the level's code ranges, each
    float16 scale onto the slot scale rows it covers (a block group of ``g`` rows spans ``g / slot group`` of them)."""

    def __init__(self, contract: SlotContract, layout: SlotLayout, reader: BankReader, slot: Sequence[Tensor]) -> None:
        self.reader, self.layout = reader, layout
        self.views = [_level_views(contract, slot, level) for level in range(len(contract.widths))]

    def __call__(self, level: int, payload: memoryview) -> None:
        index = self.reader.index
        scheme = self.reader.schemes[level]
        width, d = index.memory.widths[level], index.d_model
        if len(payload) != scheme.payload_length(len(index.memory.layers), d, width):
            raise BankError(f"level {level}: payload of {len(payload)} bytes does not fit the slot's block shape")
        for section in scheme.sections(len(index.memory.layers), d, width):
            codes, scales = scheme.split(
                payload[section.offset : section.offset + section.length], section.rows, section.cols
            )
            code_view, scale_view = self.views[level][(section.layer, section.matrix)]
            code_view[...] = codes.reshape(code_view.shape)
            block_group = scheme.group(section.rows)
            slot_group = section.rows // scale_view.shape[0]
            scale_view[...] = scales[np.arange(scale_view.shape[0]) * slot_group // block_group]


def _level_views(
    contract: SlotContract, slot: Sequence[Tensor], level: int
) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """(layer index, matrix) -> (codes view, scales view) of ``slot`` that a level-``level`` block fills."""
    found: dict[tuple[int, str, bool], np.ndarray] = {}
    for tensor, buffer in zip(contract.tensors, slot):
        array = buffer.numpy()[0]
        for (lo, hi), source in zip(tensor.level_ranges[level], tensor.sources):
            index = [slice(None)] * array.ndim
            index[tensor.hidden_axis - 1] = slice(lo, hi)
            found[(tensor.memory_index, source, tensor.role.endswith("_scales"))] = array[tuple(index)]
    return {
        (layer, matrix): (view, found[(layer, matrix, True)])
        for (layer, matrix, is_scale), view in found.items()
        if not is_scale
    }


def _memory_activation(cfg: ModelConfig) -> str:
    """The activation of ``cfg``'s memory FFN: SiLU for the anchor; a host's (Hugging Face hosts are imported
    only for a host config, so reading a bundle of the anchor never loads them)."""
    if cfg.architecture == ANCHOR_ARCHITECTURE:
        return "silu"
    from hm_export.hf.families import memory_activation

    return memory_activation(cfg)
