"""The memory slot: the graph inputs that receive a fetched path, and the contract describing them.

Per memory layer ``j`` (an anchor layer index) the program takes two inputs:

* ``mem{j}_gate_up`` ``[1, d, 2R]``: ``G^T`` of every level in columns ``[0, R)``, ``U^T`` in ``[R, 2R)``;
* ``mem{j}_down`` ``[1, R, d]``: ``D^T`` of every level in rows ``[0, R)``.

Level ``l`` occupies hidden units ``[off_l, off_l + r_l)`` (``off_l = r_0 + ... + r_{l-1}``).  Filling a
level copies one bank block's ``gate/up/down[j]`` into those ranges; nothing else in the slot moves.

The contract describing the slot is a format: :mod:`hm_export.formats.slot_contract`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from hm_export.config import ModelConfig
from hm_export.formats.slot_contract import LOGITS_OUTPUT, SLOT_SCHEMA_VERSION, TOKENS_INPUT, SlotContract, SlotTensor
from hm_export.model import LayerMemory, MemoryLM

if TYPE_CHECKING:
    from hm_export.kernels.strategies import SlotLayout

__all__ = [  # the slot contract is a format (hm_export.formats.slot_contract); its names stay importable here
    "LOGITS_OUTPUT",
    "SLOT_SCHEMA_VERSION",
    "TOKENS_INPUT",
    "SlotContract",
    "SlotModule",
    "SlotParameters",
    "SlotTensor",
    "empty_slot",
    "slot_tensors",
]


def empty_slot(contract: SlotContract) -> list[Tensor]:
    """Zeroed buffers for every slot input of ``contract``, in input order."""
    return [torch.zeros(t.shape, dtype=getattr(torch, t.dtype)) for t in contract.tensors]


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
        self.embed, self.blocks, self.norm, self.head = model.embed, model.blocks, model.norm, model.head
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        self.register_buffer("causal_mask", model.causal_mask, persistent=False)
        self.hold_memory(memory, layout)

    def forward(self, tokens: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(tokens, self.slot_memory())
