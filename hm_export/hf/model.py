"""Hugging Face ``transformers`` hosts with hierarchical FFN memories attached to their MLPs.

:class:`HostMemoryLM` wraps a host causal LM (weights frozen) and a :class:`~hm_export.model.MemoryBank` in
the same slot layout as the reference model.  A forward hook on each memory layer's MLP adds the memory FFN
of the fetched path to the MLP's output, with the host MLP's own activation::

    mlp(x) + D_m(act(G_m x) * U_m x)

which is the host FFN with the path's blocks appended as extra hidden units (for a gated host MLP; the
memory is gated whatever the host's MLP form, e.g. Phi-3's fused ``gate_up``).  Hooks rather than
replaced modules keep the host's parameter names (``host.<transformers name>``) and its MLP code untouched.
With a zero ``D`` (a fresh bank) the hook adds exact zeros: the logits are the host's, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from hm_export.config import ModelConfig
from hm_export.errors import ConfigError
from hm_export.hf.families import family_of
from hm_export.model import LayerMemory, MemoryBank, check_forward_inputs, expand_paths, memory_ffn
from hm_export.slot import SlotParameters

if TYPE_CHECKING:
    from hm_export.kernels.strategies import SlotLayout

# Plain attention: exact against eager, exports with torch.export, and lowers on every target.
ATTENTION_IMPLEMENTATION = "eager"


class ActiveMemory:
    """The memory the hooks add during one forward call: anchor layer index -> assembled memory."""

    def __init__(self) -> None:
        self.layers: dict[int, LayerMemory] = {}

    @contextmanager
    def use(self, layers: Sequence[int], memory: Sequence[LayerMemory] | None) -> Iterator[None]:
        self.layers = dict(zip(layers, memory)) if memory is not None else {}
        try:
            yield
        finally:
            self.layers = {}

    def hook(self, layer: int, activation: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
        return _MemoryHook(self, layer, activation)


class _MemoryHook:
    """The forward hook of memory layer ``layer``'s MLP: adds the active memory's FFN.  An object rather than a
    closure, so a deep copy of the model (e.g. an anchor quantized for export) gets hooks reading its own
    :class:`ActiveMemory`."""

    def __init__(self, active: ActiveMemory, layer: int, activation: Callable[[Tensor], Tensor]) -> None:
        self.active, self.layer, self.activation = active, layer, activation

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        memory = self.active.layers.get(self.layer)
        return output if memory is None else output + memory_ffn(args[0], memory, self.activation)


def build_host(cfg: ModelConfig) -> nn.Module:
    """The ``transformers`` host of ``cfg`` (random weights), eval mode, frozen."""
    family = family_of(cfg.architecture)
    host_config = family.config_from_dict(dict(cfg.host or {}))
    host_config._attn_implementation = ATTENTION_IMPLEMENTATION
    for field, expected in (("hidden_size", cfg.d_model), ("num_hidden_layers", cfg.n_layers)):
        if getattr(host_config, field) != expected:
            got = getattr(host_config, field)
            raise ConfigError(f"host config {field} {got} does not match the model's {expected}")
    host = family.model_class()(host_config).eval()
    host.requires_grad_(False)
    return host


def run_host(host: nn.Module, active: ActiveMemory, cfg: ModelConfig, tokens: Tensor, memory: Any) -> Tensor:
    check_forward_inputs(cfg, tokens, memory)
    with active.use(cfg.memory.layers, memory):
        return host(input_ids=tokens, use_cache=False).logits


class HostMemoryLM(nn.Module):
    """A frozen ``transformers`` host plus hierarchical FFN memory (the interface of ``MemoryLM``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.host = build_host(cfg)
        self.bank = MemoryBank(cfg)
        self.active = ActiveMemory()
        family = family_of(cfg.architecture)
        activation = family.activation(self.host.config)
        layers = family.decoder_layers(self.host)
        for layer in cfg.memory.layers:
            layers[layer].mlp.register_forward_hook(self.active.hook(layer, activation))

    def forward(self, tokens: Tensor, memory: Sequence[LayerMemory] | None = None) -> Tensor:
        """Logits ``[B, T, vocab]`` given an already assembled memory (one entry per memory layer)."""
        return run_host(self.host, self.active, self.cfg, tokens, memory)

    def forward_path(self, tokens: Tensor, paths: Tensor) -> Tensor:
        """Logits with the memory of ``paths`` (``[B, levels]`` or ``[levels]`` node ids)."""
        return self(tokens, self.bank.assemble(expand_paths(tokens, paths)))

    def anchor_parameters(self) -> list[nn.Parameter]:
        return list(self.host.parameters())

    def slot_module(self, memory: Sequence[LayerMemory], layout: SlotLayout | None = None) -> nn.Module:
        return HostSlotModule(self, memory, layout)

    def decode_module(
        self,
        memory: Sequence[LayerMemory],
        cache: str = "state",
        layout: SlotLayout | None = None,
        attention: str = "masked",
    ) -> nn.Module:
        """The KV-cache decode module (:mod:`hm_export.hf.decode`) with ``memory`` (``()``: none)."""
        from hm_export.hf.decode import HostDecodeModule

        return HostDecodeModule(self, memory, cache, layout, attention)  # type: ignore[arg-type]

    @classmethod
    def attach(cls, host: nn.Module, cfg: ModelConfig) -> HostMemoryLM:
        """Memories ``cfg`` attached to an existing ``transformers`` model (its weights are copied, frozen)."""
        model = cls(cfg)
        try:
            model.host.load_state_dict(host.state_dict())
        except RuntimeError as exc:
            raise ConfigError(f"host weights do not match the memory model's host config: {exc}") from exc
        return model


class HostSlotModule(SlotParameters):
    """The host of a :class:`HostMemoryLM` plus one path's memory as parameters; no bank."""

    def __init__(self, model: HostMemoryLM, memory: Sequence[LayerMemory], layout: SlotLayout | None = None) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.host = model.host
        self.active = model.active  # the host's hooks read the memory from here
        self.hold_memory(memory, layout)

    def forward(self, tokens: Tensor) -> Tensor:
        return run_host(self.host, self.active, self.cfg, tokens, self.slot_memory())
