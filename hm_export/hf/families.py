"""Host families: how hm-export finds the MLPs of a Hugging Face ``transformers`` decoder and summarises it.

Each family names its ``transformers`` causal-LM class, the config field holding the MLP activation and where
the decoder layers live.  Memories attach to every family the same way (a hook on each memory layer's MLP,
see :mod:`hm_export.hf.model`), so adding a family is one :class:`HostFamily` entry in :data:`FAMILIES` as long
as its MLP is ``mlp(x) -> y`` on the residual stream's normalised input (docs/hf-hosts.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from hm_export.config import ANCHOR_ARCHITECTURE, HOST_ARCHITECTURE_PREFIX, ConfigError, MemoryConfig, ModelConfig


@dataclass(frozen=True)
class HostFamily:
    """One ``transformers`` architecture family memories can be attached to."""

    name: str  # hm-export's name; the checkpoint's architecture is ``hf-<name>``
    model_type: str  # the transformers config's ``model_type``
    causal_lm: str  # the transformers class that builds the host
    activation_field: str  # config field naming the MLP activation (a key of transformers' ACT2FN)
    mlp: str  # what the host MLP computes, for the docs and ``hm-export hf families``
    mask_by_layer_type: bool = False  # the model takes {"full_attention": mask, "sliding_attention": mask}

    @property
    def architecture(self) -> str:
        return f"{HOST_ARCHITECTURE_PREFIX}{self.name}"

    def model_class(self) -> type[nn.Module]:
        transformers = _transformers()
        return getattr(transformers, self.causal_lm)

    def config_from_dict(self, host: dict[str, Any]) -> Any:
        """The transformers config of ``host`` (a ``to_dict()``), refusing another family's config."""
        if host.get("model_type") != self.model_type:
            raise ConfigError(
                f"host config has model_type {host.get('model_type')!r}; architecture {self.architecture!r} "
                f"needs {self.model_type!r}"
            )
        return self.model_class().config_class.from_dict(host)

    def decoder_layers(self, host: nn.Module) -> nn.ModuleList:
        return host.model.layers

    def activation(self, host_config: Any) -> Callable[..., Any]:
        from transformers.activations import ACT2FN

        return ACT2FN[getattr(host_config, self.activation_field)]


FAMILIES: dict[str, HostFamily] = {
    family.name: family
    for family in (
        HostFamily("llama", "llama", "LlamaForCausalLM", "hidden_act", "SwiGLU: down(act(gate(x)) * up(x))"),
        HostFamily("qwen2", "qwen2", "Qwen2ForCausalLM", "hidden_act", "SwiGLU: down(act(gate(x)) * up(x))", True),
        HostFamily(
            "gemma3",
            "gemma3_text",
            "Gemma3ForCausalLM",
            "hidden_activation",
            "GeGLU (tanh gelu): down(act(gate(x)) * up(x))",
            True,
        ),
        HostFamily(
            "phi3",
            "phi3",
            "Phi3ForCausalLM",
            "hidden_act",
            "fused gate_up: down(act(gate) * up), [gate, up] = gate_up(x)",
        ),
    )
}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # an optional dependency: only Hugging Face hosts need it
        raise ConfigError("Hugging Face host models need transformers: pip install 'hm-export[hf]'") from exc
    return transformers


def family_of(architecture: str) -> HostFamily:
    """The family of an ``hf-<name>`` architecture; a clear error for anything else."""
    name = architecture.removeprefix(HOST_ARCHITECTURE_PREFIX)
    if not architecture.startswith(HOST_ARCHITECTURE_PREFIX) or name not in FAMILIES:
        known = ", ".join(f.architecture for f in FAMILIES.values())
        raise ConfigError(f"architecture {architecture!r} is not a supported Hugging Face host ({known})")
    return FAMILIES[name]


def memory_activation(cfg: ModelConfig) -> str:
    """The name (``ACT2FN`` key) of the activation ``cfg``'s memory FFN uses: the host MLP's, SiLU for the anchor."""
    if cfg.architecture == ANCHOR_ARCHITECTURE:
        return "silu"
    family = family_of(cfg.architecture)
    return str((cfg.host or {}).get(family.activation_field))


def family_for_model_type(model_type: str) -> HostFamily:
    for family in FAMILIES.values():
        if family.model_type == model_type:
            return family
    known = ", ".join(sorted(f.model_type for f in FAMILIES.values()))
    raise ConfigError(f"transformers model_type {model_type!r} has no hm-export host family (supported: {known})")


def _rope_theta(host_config: Any) -> float:
    """The global-attention RoPE base (Gemma 3 keeps one per attention type)."""
    params = getattr(host_config, "rope_parameters", None) or {}
    params = params.get("full_attention", params)
    return float(params.get("rope_theta", 10000.0))


def host_model_config(host_config: Any, memory: MemoryConfig, max_seq_len: int) -> ModelConfig:
    """The :class:`ModelConfig` of a ``transformers`` host config with ``memory`` attached.

    ``max_seq_len`` is the exported window (and KV cache) length: at most the host's
    ``max_position_embeddings``.
    """
    family = family_for_model_type(host_config.model_type)
    if max_seq_len > host_config.max_position_embeddings:
        raise ConfigError(
            f"max_seq_len {max_seq_len} exceeds the host's max_position_embeddings "
            f"{host_config.max_position_embeddings}"
        )
    d_model, n_heads = host_config.hidden_size, host_config.num_attention_heads
    head_dim = getattr(host_config, "head_dim", None) or d_model // n_heads
    return ModelConfig(
        vocab_size=host_config.vocab_size,
        d_model=d_model,
        n_layers=host_config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=host_config.num_key_value_heads,
        ffn_hidden=host_config.intermediate_size,
        max_seq_len=max_seq_len,
        memory=memory,
        rope_theta=_rope_theta(host_config),
        norm_eps=float(host_config.rms_norm_eps),
        architecture=family.architecture,
        host=host_config.to_dict(),
        attention_head_dim=head_dim if head_dim != d_model // n_heads else None,
    )
