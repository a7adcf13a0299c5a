"""Build the model a :class:`~hm_export.config.ModelConfig` describes, whatever its architecture.

Everything downstream (checkpoint, trace, checks, verify, bank accuracy) talks to a :class:`MemoryModel`:
the reference :class:`~hm_export.model.MemoryLM` or a Hugging Face host (:class:`hm_export.hf.HostMemoryLM`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from torch import Tensor, nn

from hm_export.config import ANCHOR_ARCHITECTURE, ModelConfig
from hm_export.model import LayerMemory, MemoryBank, MemoryLM

if TYPE_CHECKING:
    from hm_export.kernels.strategies import SlotLayout


class MemoryModel(Protocol):
    """An anchor (or frozen host) plus a bank in slot layout."""

    cfg: ModelConfig
    bank: MemoryBank
    kernel_attention: bool  # whether ``hm_export::attend_cache`` computes this model's attention exactly

    def __call__(self, tokens: Tensor, memory: Sequence[LayerMemory] | None = None) -> Tensor: ...

    def forward_path(self, tokens: Tensor, paths: Tensor) -> Tensor: ...

    def anchor_parameters(self) -> list[nn.Parameter]: ...

    def slot_module(self, memory: Sequence[LayerMemory], layout: SlotLayout | None = None) -> nn.Module: ...

    def decode_module(
        self,
        memory: Sequence[LayerMemory],
        cache: str = "state",
        layout: SlotLayout | None = None,
        attention: str = "masked",
    ) -> nn.Module: ...


def build_model(cfg: ModelConfig) -> MemoryModel:
    """A freshly initialised model of ``cfg`` (zero memory ``D``), in train mode like any ``nn.Module``."""
    if cfg.architecture == ANCHOR_ARCHITECTURE:
        return MemoryLM(cfg)
    from hm_export.hf import HostMemoryLM  # transformers is only needed for Hugging Face hosts

    return HostMemoryLM(cfg)
