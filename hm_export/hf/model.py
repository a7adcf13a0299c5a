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

import torch
from torch import Tensor, nn

from hm_export.config import ModelConfig
from hm_export.errors import ConfigError
from hm_export.hf.families import SWITCHING_ROPE, causal_lm_class, config_from_dict, host_structure
from hm_export.model import LayerMemory, MemoryBank, check_forward_inputs, expand_paths, memory_ffn
from hm_export.slot import SlotParameters

if TYPE_CHECKING:
    from hm_export.kernels.strategies import SlotLayout

# Plain attention: exact against eager, exports with torch.export, and lowers on every target.
ATTENTION_IMPLEMENTATION = "eager"
FROZEN_ROPE = "static (hm-export)"  # the rope_type a held-fixed dynamic / longrope RoPE module gets


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


def freeze_rope(host: nn.Module) -> None:
    """Hold a RoPE that transformers recomputes from the sequence length (``dynamic``, ``longrope``) fixed.

    Inside the exported window (checked by :func:`~hm_export.hf.families.inspect_host`) those RoPEs keep the
    frequencies they were built with; recomputing them in the forward pass would make the exported program
    depend on the largest position of a padded window, and ``torch.export`` trips over the attributes the
    update sets.  Renaming the type is how the update is skipped: the frequencies stay as initialised.
    """
    for module in host.modules():
        rope_type = getattr(module, "rope_type", None)
        if rope_type is None or not any(n.endswith("inv_freq") for n, _ in module.named_buffers(recurse=False)):
            continue
        if isinstance(rope_type, str) and any(s in rope_type for s in SWITCHING_ROPE):
            module.rope_type = FROZEN_ROPE
        elif isinstance(rope_type, dict):
            module.rope_type = {
                kind: FROZEN_ROPE if any(s in str(t) for s in SWITCHING_ROPE) else t for kind, t in rope_type.items()
            }


def prepare_host(host: nn.Module) -> nn.Module:
    """The host as hm-export runs it: eager attention, RoPE held fixed, eval mode, weights frozen."""
    host.config._attn_implementation = ATTENTION_IMPLEMENTATION
    for module in host.modules():  # some sub-configs keep their own copy of the attention choice
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = ATTENTION_IMPLEMENTATION
    freeze_rope(host)
    host.eval()
    host.requires_grad_(False)
    return host


def build_host(cfg: ModelConfig) -> nn.Module:
    """The ``transformers`` host of ``cfg`` (random weights), prepared as :func:`prepare_host` says."""
    structure = host_structure(cfg)
    host_config = config_from_dict(dict(cfg.host or {}))
    host_config._attn_implementation = ATTENTION_IMPLEMENTATION
    check_host_config(host_config, cfg)
    return prepare_host(causal_lm_class(structure.model_type)(host_config))


def check_host_config(host_config: Any, cfg: ModelConfig) -> None:
    """``host_config`` has the sizes ``cfg`` summarises."""
    for field, expected in (
        ("hidden_size", cfg.d_model),
        ("num_hidden_layers", cfg.n_layers),
        ("vocab_size", cfg.vocab_size),
        ("intermediate_size", cfg.ffn_hidden),
    ):
        if getattr(host_config, field) != expected:
            got = getattr(host_config, field)
            message = f"host config {field} {got} does not match the model's {expected}"
            raise ConfigError(message, field=f"model.host.{field}")


def run_host(host: nn.Module, active: ActiveMemory, cfg: ModelConfig, tokens: Tensor, memory: Any) -> Tensor:
    check_forward_inputs(cfg, tokens, memory)
    with active.use(cfg.memory.layers, memory):
        return host(input_ids=tokens, use_cache=False).logits


class HostMemoryLM(nn.Module):
    """A frozen ``transformers`` host plus hierarchical FFN memory (the interface of ``MemoryLM``)."""

    def __init__(self, cfg: ModelConfig, host: nn.Module | None = None) -> None:
        """``host``: an already loaded ``transformers`` model of ``cfg``'s host config to adopt (not copied);
        by default one is built with random weights."""
        super().__init__()
        from transformers.activations import ACT2FN

        self.cfg = cfg
        self.host = build_host(cfg) if host is None else prepare_host(host)
        self.bank = MemoryBank(cfg)
        self.active = ActiveMemory()
        structure = host_structure(cfg)
        layers = self.host.get_submodule(structure.layers)
        for layer in cfg.memory.layers:
            mlp = getattr(layers[layer], structure.mlp)
            mlp.register_forward_hook(self.active.hook(layer, ACT2FN[structure.activation]))

    def forward(self, tokens: Tensor, memory: Sequence[LayerMemory] | None = None) -> Tensor:
        """Logits ``[B, T, vocab]`` given an already assembled memory (one entry per memory layer)."""
        return run_host(self.host, self.active, self.cfg, tokens, memory)

    def forward_path(self, tokens: Tensor, paths: Tensor) -> Tensor:
        """Logits with the memory of ``paths`` (``[B, levels]`` or ``[levels]`` node ids)."""
        return self(tokens, self.bank.assemble(expand_paths(tokens, paths)))

    def anchor_parameters(self) -> list[nn.Parameter]:
        return list(self.host.parameters())

    @property
    def kernel_attention(self) -> bool:
        """Whether ``hm_export::attend_cache`` computes this host's attention: it has no logit soft-capping."""
        return getattr(self.host.config, "attn_logit_softcapping", None) is None

    @classmethod
    def attach(cls, host: nn.Module, cfg: ModelConfig, adopt: bool = False) -> HostMemoryLM:
        """Memories ``cfg`` attached to an existing ``transformers`` model, frozen.

        By default its weights are copied into a host built from ``cfg`` (``host`` is left as it was);
        ``adopt=True`` takes ``host`` itself (no second copy of the weights: what the intake does with a model
        it has just loaded; the host is switched to eager attention and a fixed RoPE).
        """
        if adopt:
            if type(host) is not causal_lm_class(host_structure(cfg).model_type):
                raise ConfigError(f"host {type(host).__name__} is not the class of the model config's host")
            check_host_config(host.config, cfg)
            if any(p.dtype != torch.float32 for p in host.parameters()):
                host = host.float()  # hm-export computes hosts in float32 (a GGUF host already is)
            return cls(cfg, host)
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
