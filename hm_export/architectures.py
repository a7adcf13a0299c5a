"""Build the model a :class:`~hm_export.config.ModelConfig` describes, whatever its architecture.

Everything downstream (checkpoint, trace, checks, verify, bank accuracy) talks to a :class:`MemoryModel`:
the reference :class:`~hm_export.model.MemoryLM` or a Hugging Face host (:class:`hm_export.hf.HostMemoryLM`).
:func:`slot_module` and :func:`decode_module` give the modules a model is exported as, whatever its
architecture: the models themselves do not know the export modules built on them (imports point one way:
model <- slot, decode <- hf <- architectures <- trace).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from torch import Tensor, nn

from hm_export.config import ANCHOR_ARCHITECTURE, ModelConfig
from hm_export.decode import Attention, CacheForm, DecodeModule
from hm_export.model import LayerMemory, MemoryBank, MemoryLM
from hm_export.slot import SlotModule

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


def build_model(cfg: ModelConfig) -> MemoryModel:
    """A freshly initialised model of ``cfg`` (zero memory ``D``), in train mode like any ``nn.Module``."""
    if cfg.architecture == ANCHOR_ARCHITECTURE:
        return MemoryLM(cfg)
    from hm_export.hf import HostMemoryLM  # transformers is only needed for Hugging Face hosts

    return HostMemoryLM(cfg)


def _is_host(model: MemoryModel) -> bool:
    return model.cfg.architecture != ANCHOR_ARCHITECTURE


def slot_module(model: MemoryModel, memory: Sequence[LayerMemory], layout: SlotLayout | None = None) -> nn.Module:
    """The anchor of ``model`` with ``memory`` held as parameters (in ``layout``'s slot strategy): what the
    export passes lift into the slot (:class:`~hm_export.slot.SlotModule`, or a host's
    :class:`~hm_export.hf.HostSlotModule`)."""
    if _is_host(model):
        from hm_export.hf.model import HostSlotModule  # transformers is only needed for Hugging Face hosts

        return HostSlotModule(model, memory, layout)
    return SlotModule(model, memory, layout)


def decode_module(
    model: MemoryModel,
    memory: Sequence[LayerMemory],
    cache: CacheForm = "state",
    layout: SlotLayout | None = None,
    attention: Attention = "masked",
    cache_dtype: str = "float32",
) -> nn.Module:
    """The KV-cache decode module of ``model`` with ``memory`` (``()``: none): :class:`~hm_export.decode.DecodeModule`,
    or a host's :class:`~hm_export.hf.decode.HostDecodeModule`."""
    if _is_host(model):
        from hm_export.hf.decode import HostDecodeModule

        return HostDecodeModule(model, memory, cache, layout, attention, cache_dtype)  # type: ignore[arg-type]
    return DecodeModule(model, memory, cache, layout, attention, cache_dtype)  # type: ignore[arg-type]
