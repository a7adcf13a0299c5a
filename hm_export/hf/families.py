"""Which ``transformers`` decoders can host memories, found from their structure rather than a list of names.

A model is a host when it is a ``transformers`` causal LM whose decoder layers all carry a *gated* MLP:
``down(act(gate(x)) * up(x))`` with separate ``gate_proj`` / ``up_proj`` / ``down_proj`` linears, or a fused
``gate_up_proj`` whose halves are ``[gate, up]`` (Phi-3), and ``act`` one of ``transformers``' ``ACT2FN``
activations named by the config.  Memories then append hidden units to that MLP (:mod:`hm_export.hf.model`).

:func:`inspect_host` decides from the config alone (no weights are read): it builds the model on the
``meta`` device, finds the decoder layers and their MLPs, and runs one MLP with random weights against the
gated formula to confirm what it computes and with which activation.  What a family adds around the MLP
(norm placement, q/k norms, scaled embeddings, soft-capping, sliding-window layers, attention biases, NoPE
layers) runs in the host's own code and is listed as a handled quirk; what hm-export cannot reproduce in a
fixed-window program (non-gated or mixture-of-experts MLPs, RoPE whose frequencies switch with the sequence
length beyond the exported window, multimodal wrappers) is refused with a message naming it.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from hm_export.config import ANCHOR_ARCHITECTURE, HOST_ARCHITECTURE_PREFIX, ConfigError, MemoryConfig, ModelConfig

MlpForm = Literal["gate/up/down", "fused gate_up/down"]
MaskForm = Literal["per-layer-type", "windowed", "causal"]
# RoPE types whose frequencies transformers recomputes from the sequence length during the forward pass.
SWITCHING_ROPE = ("dynamic", "longrope")
# Families exercised end to end by tests/test_hf.py (attach, export to ExecuTorch and ONNX, verify, checks).
TESTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "smollm3")


class HostRefused(ConfigError):
    """A ``transformers`` model that cannot host memories; the message names the reason."""


@dataclass(frozen=True)
class HostStructure:
    """What :func:`inspect_host` found: where the gated MLPs are, what they compute and the family's quirks."""

    model_type: str
    causal_lm: str  # the transformers class that builds the host
    layers: str  # dotted path of the decoder layers' ModuleList, e.g. "model.layers"
    mlp: str  # attribute of a decoder layer holding its MLP
    mlp_form: MlpForm
    activation: str  # the ACT2FN key of the MLP's activation
    activation_field: str  # the config field naming it
    mask: MaskForm  # what the decode program feeds the model as its attention mask
    quirks: tuple[str, ...]  # handled by the host's own code, or by hm-export (said so)

    @property
    def architecture(self) -> str:
        return architecture_name(self.model_type)

    @property
    def formula(self) -> str:
        split = "[gate, up] = gate_up(x); " if self.mlp_form == "fused gate_up/down" else ""
        return f"{split}down({self.activation}(gate x) * up x)"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "architecture": self.architecture, "formula": self.formula}


def architecture_name(model_type: str) -> str:
    """hm-export's architecture of a host: ``hf-<model_type>``, a text sub-model without its ``_text`` suffix."""
    return f"{HOST_ARCHITECTURE_PREFIX}{model_type.removesuffix('_text')}"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # an optional dependency: only Hugging Face hosts need it
        raise ConfigError("Hugging Face host models need transformers: pip install 'hm-export[hf]'") from exc
    return transformers


def causal_lm_class(model_type: str) -> type[nn.Module]:
    """The ``transformers`` causal-LM class of ``model_type``; :class:`HostRefused` when it has none."""
    transformers = _transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name is None or not hasattr(transformers, name):
        raise HostRefused(f"transformers model_type {model_type!r} is not a causal language model")
    return getattr(transformers, name)


def config_from_dict(host: dict[str, Any]) -> Any:
    """The ``transformers`` config of a stored host config (``to_dict()``)."""
    _transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = host.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise HostRefused(f"host config has model_type {model_type!r}, which transformers does not know")
    return CONFIG_MAPPING[model_type].from_dict(dict(host))


def decoder_layers(host: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The decoder layers of ``host``: the ``ModuleList`` of ``num_layers`` blocks (``model.layers`` for most)."""
    for name, module in host.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return name, module
    raise HostRefused(f"{type(host).__name__}: no list of {num_layers} decoder layers found")


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) else None


def _mlp_form(mlp: nn.Module, where: str) -> MlpForm:
    """Refuse an MLP that is not a gated one, naming what it is instead."""
    if any(hasattr(mlp, attr) for attr in ("experts", "router", "shared_expert")):
        raise HostRefused(f"{where} is a mixture of experts ({type(mlp).__name__}): memories need one gated MLP")
    if _linear(mlp, "down_proj") is not None:
        if _linear(mlp, "gate_proj") is not None and _linear(mlp, "up_proj") is not None:
            return "gate/up/down"
        if _linear(mlp, "gate_up_proj") is not None:
            return "fused gate_up/down"
    children = ", ".join(name for name, _ in mlp.named_children()) or "none"
    raise HostRefused(
        f"{where} ({type(mlp).__name__}, children: {children}) is not a gated MLP: memories append hidden units "
        "to down(act(gate x) * up x) (gate_proj/up_proj/down_proj or a fused gate_up_proj)"
    )


def _gate_up(mlp: nn.Module, form: MlpForm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if form == "fused gate_up/down":
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        return gate, up
    return mlp.gate_proj(x), mlp.up_proj(x)


def _activation(config: Any, mlp: nn.Module, form: MlpForm, where: str) -> tuple[str, str]:
    """The (config field, ACT2FN key) with which ``mlp`` computes exactly ``down(act(gate x) * up x)``.

    ``mlp`` is a ``meta``-device module; a CPU copy with random weights is run against the formula (on the
    CPU whatever default device the caller set: ``load_checkpoint`` builds its reference model on ``meta``).
    """
    from transformers.activations import ACT2FN

    candidates = [
        (field, value)
        for field, value in sorted(vars(config).items())
        if "act" in field and isinstance(value, str) and value in ACT2FN
    ]
    probe = copy.deepcopy(mlp).to_empty(device="cpu").float()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad(), torch.device("cpu"):
        for param in probe.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * param.shape[-1] ** -0.5)
        x = torch.randn(2, 3, config.hidden_size, generator=generator)
        want = probe(x)
        for field, name in candidates:
            gate, up = _gate_up(probe, form, x)
            got = F.linear(ACT2FN[name](gate) * up, probe.down_proj.weight, probe.down_proj.bias)
            if torch.allclose(got, want, rtol=1e-5, atol=1e-5):
                return field, name
    named = ", ".join(f"{field}={name!r}" for field, name in candidates) or "no ACT2FN activation in the config"
    raise HostRefused(f"{where} ({type(mlp).__name__}) does not compute down(act(gate x) * up x) with {named}")


def _rope_types(config: Any) -> dict[str, dict[str, Any]]:
    """RoPE parameters per attention kind (one entry, ``"all"``, for a model with one RoPE)."""
    params = getattr(config, "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        return dict(params)
    return {"all": params}


def _check_rope(config: Any, max_seq_len: int | None) -> list[str]:
    """Quirks of the host's RoPE; refuses a RoPE that switches frequencies within the exported window."""
    quirks = []
    for kind, params in _rope_types(config).items():
        rope_type = str(params.get("rope_type", "default"))
        if rope_type == "default":
            continue
        where = "" if kind == "all" else f" ({kind} layers)"
        if not any(s in rope_type for s in SWITCHING_ROPE):
            quirks.append(f"rope {rope_type}{where}")
            continue
        limit = config.max_position_embeddings  # dynamic RoPE grows only beyond it
        if rope_type == "longrope":
            limit = params.get("original_max_position_embeddings") or limit
        if rope_type == "longrope" and max_seq_len is not None and max_seq_len > limit:
            raise HostRefused(
                f"rope_type 'longrope'{where} switches to its long factors beyond original_max_position_embeddings "
                f"{limit}: an exported window of {max_seq_len} positions cannot follow it; use --seq-len <= {limit}"
            )
        quirks.append(f"rope {rope_type}{where} (static below {limit} positions, held fixed)")
    return quirks


def _quirks(config: Any, host: nn.Module, layer: nn.Module, mask: MaskForm) -> list[str]:
    """What the family adds around its MLP; all of it runs in the host's own code."""
    attention = next((m for n, m in layer.named_children() if "attn" in n or "attention" in n), None)
    found = []
    if attention is not None:
        if any(isinstance(m, nn.Linear) and m.bias is not None for m in attention.modules()):
            found.append("attention bias")
        if any(hasattr(attention, n) for n in ("q_norm", "k_norm")):
            found.append("q/k norms")
        if hasattr(attention, "qkv_proj"):
            found.append("fused qkv")
    children = {name for name, _ in layer.named_children()}
    if {"pre_feedforward_layernorm", "post_feedforward_layernorm"} & children:
        found.append("sandwich norms")
    if any("embed_scale" in n or "normalizer" in n for n, _ in host.named_buffers()) or any(
        hasattr(m, "embed_scale") for m in host.modules()
    ):
        found.append("scaled embeddings")
    for field, label in (
        ("attn_logit_softcapping", "attention soft-capping"),
        ("final_logit_softcapping", "logit soft-capping"),
    ):
        if getattr(config, field, None) is not None:
            found.append(label)
    if mask == "per-layer-type" and "sliding_attention" in set(config.layer_types):
        found.append("sliding-window layers")
    elif mask == "windowed":
        found.append(f"sliding window {config.sliding_window} (all layers)")
    no_rope = getattr(config, "no_rope_layers", None)
    if no_rope and not all(no_rope):
        found.append("NoPE layers")
    return found


def inspect_host(config: Any, max_seq_len: int | None = None) -> HostStructure:
    """Decide from ``config`` alone (a ``transformers`` config) whether its model can host memories.

    Returns the :class:`HostStructure`; raises :class:`HostRefused` naming the reason otherwise.  ``max_seq_len``
    (the window to export) also refuses a RoPE that would switch frequencies inside the window.
    """
    if getattr(config, "text_config", None) is not None or getattr(config, "vision_config", None) is not None:
        raise HostRefused(
            f"model_type {config.model_type!r} is a multimodal wrapper: attach memories to its text model "
            "(its text_config and language-model weights)"
        )
    model_class = causal_lm_class(config.model_type)
    with torch.device("meta"):
        host = model_class(copy.deepcopy(config))
    layers_name, layers = decoder_layers(host, config.num_hidden_layers)
    mlp_attr = "mlp"
    forms = []
    for index, layer in enumerate(layers):
        mlp = getattr(layer, mlp_attr, None)
        if not isinstance(mlp, nn.Module):
            raise HostRefused(f"{layers_name}.{index} ({type(layer).__name__}) has no 'mlp' module")
        forms.append(_mlp_form(mlp, f"{layers_name}.{index}.mlp"))
    if len(set(forms)) != 1 or len({type(getattr(layer, mlp_attr)) for layer in layers}) != 1:
        raise HostRefused(f"{layers_name}: the decoder layers' MLPs differ in form ({sorted(set(forms))})")
    first = getattr(layers[0], mlp_attr)
    field, activation = _activation(config, first, forms[0], f"{layers_name}.0.mlp")
    if getattr(config, "layer_types", None):
        mask: MaskForm = "per-layer-type"
    elif getattr(config, "sliding_window", None) is not None:
        mask = "windowed"
    else:
        mask = "causal"
    quirks = _check_rope(config, max_seq_len) + _quirks(config, host, layers[0], mask)
    return HostStructure(
        model_type=config.model_type,
        causal_lm=model_class.__name__,
        layers=layers_name,
        mlp=mlp_attr,
        mlp_form=forms[0],
        activation=activation,
        activation_field=field,
        mask=mask,
        quirks=tuple(quirks),
    )


@functools.lru_cache(maxsize=32)
def _structure_of(host_json: str) -> HostStructure:
    return inspect_host(config_from_dict(json.loads(host_json)))


def host_structure(cfg: ModelConfig) -> HostStructure:
    """The :class:`HostStructure` of a host model config (its ``host`` field), checked against its architecture."""
    host = dict(cfg.host or {})
    expected = architecture_name(str(host.get("model_type")))
    if cfg.architecture != expected:
        raise HostRefused(
            f"host config has model_type {host.get('model_type')!r} (architecture {expected!r}), "
            f"the model config says {cfg.architecture!r}"
        )
    return _structure_of(json.dumps(host, sort_keys=True, default=str))


def memory_activation(cfg: ModelConfig) -> str:
    """The ``ACT2FN`` key of the activation ``cfg``'s memory FFN uses: the host MLP's, SiLU for the anchor."""
    if cfg.architecture == ANCHOR_ARCHITECTURE:
        return "silu"
    return host_structure(cfg).activation


def _rope_theta(host_config: Any) -> float:
    """The global-attention RoPE base (Gemma 3 keeps one per attention type)."""
    params = _rope_types(host_config)
    params = params.get("full_attention", params.get("all", {}))
    return float(params.get("rope_theta", 10000.0))


def stored_host_config(host_config: Any) -> dict[str, Any]:
    """The host config as a checkpoint stores it: without the loader's quantization record and names."""
    stored = host_config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_commit_hash", "transformers_version"):
        stored.pop(key, None)
    stored["dtype"] = "float32"  # hm-export computes every host in float32 (the checkpoint says how it is stored)
    return stored


def host_model_config(host_config: Any, memory: MemoryConfig, max_seq_len: int) -> ModelConfig:
    """The :class:`ModelConfig` of a ``transformers`` host config with ``memory`` attached.

    ``max_seq_len`` is the exported window (and KV cache) length: at most the host's
    ``max_position_embeddings``.  Refuses (:class:`HostRefused`) a model that cannot host memories.
    """
    if max_seq_len > host_config.max_position_embeddings:
        raise ConfigError(
            f"max_seq_len {max_seq_len} exceeds the host's max_position_embeddings "
            f"{host_config.max_position_embeddings}"
        )
    structure = inspect_host(host_config, max_seq_len)
    d_model, n_heads = host_config.hidden_size, host_config.num_attention_heads
    head_dim = getattr(host_config, "head_dim", None) or d_model // n_heads
    return ModelConfig(
        vocab_size=host_config.vocab_size,
        d_model=d_model,
        n_layers=host_config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(host_config, "num_key_value_heads", None) or n_heads,
        ffn_hidden=host_config.intermediate_size,
        max_seq_len=max_seq_len,
        memory=memory,
        rope_theta=_rope_theta(host_config),
        norm_eps=float(getattr(host_config, "rms_norm_eps", 1e-6)),
        architecture=structure.architecture,
        host=stored_host_config(host_config),
        attention_head_dim=head_dim if head_dim != d_model // n_heads else None,
    )
