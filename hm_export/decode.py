"""Incremental decoding with a static-size KV cache: the program a device runs to generate text.

:class:`DecodeModule` wraps a :class:`~hm_export.model.MemoryLM`'s anchor exactly like
:class:`~hm_export.slot.SlotModule` does (same modules, the memory of one path held as ``slot.*``
parameters that the slot passes lift into graph inputs) and adds a KV cache of ``max_seq_len``
positions per layer.  One call takes ``tokens [1, n]`` (``1 <= n``, a dynamic axis) and
``input_pos [1]`` (the position of ``tokens[0, 0]``) and returns ``logits [1, n, vocab]``; it writes
the keys/values of positions ``input_pos .. input_pos+n-1`` into the cache and attends over all
``max_seq_len`` cache positions with the causal mask row of each query position, so positions past
the current one (stale or never written) never contribute.  The same program serves the prefill
(``n`` = prompt length, ``input_pos`` = 0) and every decode step (``n`` = 1).

Nothing is built per call: the RoPE rows and mask rows are ``index_select`` gathers from tables
computed at export, and the cache update is one ``index_put`` per tensor.  The cache comes in two forms:

* ``cache="state"``: per layer, buffers ``k_cache{i}`` / ``v_cache{i}`` ``[n_kv, max_seq_len, head_dim]``
  updated in place (ExecuTorch mutable buffers, Core ML states);
* ``cache="io"``: the same tensors as explicit inputs ``past_key{i}`` / ``past_value{i}`` and outputs
  ``present_key{i}`` / ``present_value{i}`` (ONNX), the caller feeding each step's present as the next past.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from hm_export.config import ModelConfig
from hm_export.errors import UsageError
from hm_export.kernels import attend_cache
from hm_export.model import LayerMemory, MemoryLM
from hm_export.slot import SlotModule

if TYPE_CHECKING:
    from hm_export.kernels.strategies import SlotLayout

POSITION_INPUT = "input_pos"
CacheForm = Literal["state", "io"]
Attention = Literal["masked", "kernel"]
# How a decode program attends over its cache: ``masked``, every cache position with the causal-mask row of
# each query (plain ops, every target); ``kernel``, ``hm_export::attend_cache`` (it writes the cache and reads
# only the filled positions each query may see; the ExecuTorch target, whose runtimes load the op's kernel).
ATTENTION: tuple[str, ...] = ("masked", "kernel")
# The cache's element types: float16 only with ``kernel`` attention, whose op rounds what it writes and converts
# each row back exactly as it reads (the masked form's plain ops take float32).
CACHE_DTYPES: tuple[str, ...] = ("float32", "float16")


@dataclass(frozen=True)
class CacheSpec:
    """The KV cache of a decode program: per anchor layer one key and one value tensor of ``shape``."""

    n_layers: int
    n_kv_heads: int
    max_seq_len: int
    head_dim: int
    dtype: str = "float32"

    @classmethod
    def for_model(cls, cfg: ModelConfig, dtype: str = "float32") -> CacheSpec:
        return cls(cfg.n_layers, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim, dtype)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n_kv_heads, self.max_seq_len, self.head_dim)

    def names(self, form: str) -> list[str]:
        """Cache tensor names in program order (key, value per layer): ``state`` buffers, ``past``
        inputs or ``present`` outputs."""
        patterns = {
            "state": ("k_cache{}", "v_cache{}"),
            "past": ("past_key{}", "past_value{}"),
            "present": ("present_key{}", "present_value{}"),
        }[form]
        return [pattern.format(layer) for layer in range(self.n_layers) for pattern in patterns]

    def empty(self) -> list[Tensor]:
        """Zeroed cache tensors, in :meth:`names` order."""
        return [torch.zeros(self.shape, dtype=getattr(torch, self.dtype)) for _ in range(2 * self.n_layers)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.n_layers,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "layout": "[n_kv_heads, max_seq_len, head_dim] per layer and tensor; keys stored after RoPE",
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheSpec:
        n_kv_heads, max_seq_len, head_dim = data["shape"]
        return cls(data["layers"], n_kv_heads, max_seq_len, head_dim, data["dtype"])


class StaticKVCache(nn.Module):
    """A static KV cache of ``max_seq_len`` positions per layer, in either form (see the module docstring).

    Shared by :class:`DecodeModule` and the Hugging Face hosts' decode module (:mod:`hm_export.hf.decode`).
    """

    cache_form: CacheForm
    cache_spec: CacheSpec
    attention: Attention
    # Logits of the last position only (``[1, 1, vocab]``): the prefill method, which needs no other row and so
    # skips the output head for the rest of the prompt (for a 49k vocabulary, as much work as the linears).
    last_logits: bool = False

    def init_cache(
        self, cfg: ModelConfig, cache: CacheForm, attention: Attention = "masked", cache_dtype: str = "float32"
    ) -> None:
        if cache not in ("state", "io"):
            raise UsageError(f"cache must be 'state' or 'io', not {cache!r}")
        if attention not in ATTENTION or (attention == "kernel" and cache != "state"):
            raise UsageError(
                f"attention must be one of {ATTENTION} ('kernel' needs the state cache), not {attention!r}"
            )
        if cache_dtype not in CACHE_DTYPES or (cache_dtype != "float32" and attention != "kernel"):
            raise UsageError(f"cache_dtype must be one of {CACHE_DTYPES} (float16 needs attention='kernel')")
        self.cache_form = cache
        self.attention = attention
        self.cache_spec = CacheSpec.for_model(cfg, cache_dtype)
        if cache == "state":
            for name, tensor in zip(self.cache_spec.names("state"), self.cache_spec.empty()):
                self.register_buffer(name, tensor, persistent=False)

    def reset_cache(self) -> None:
        """Zero the state cache (eager use; a program's cache is reset by prefilling from position 0)."""
        for name in self.cache_spec.names("state"):
            getattr(self, name).zero_()

    def cache_tensors(self, past: Sequence[Tensor]) -> list[Tensor]:
        """The cache tensors of this call: the ``past`` inputs (``io``) or the state buffers."""
        caches = list(past) if self.cache_form == "io" else [getattr(self, n) for n in self.cache_spec.names("state")]
        if len(caches) != 2 * self.cache_spec.n_layers:
            raise UsageError(f"expected {2 * self.cache_spec.n_layers} past cache tensors, got {len(caches)}")
        return caches

    def write_cache(self, cache: Tensor, positions: Tensor, values: Tensor) -> Tensor:
        """``cache`` with ``values`` ``[n_kv, n, head_dim]`` written at ``positions`` (in place for ``state``)."""
        write = torch.ops.aten.index_put_ if self.cache_form == "state" else torch.ops.aten.index_put
        # Explicit (head, position) index pairs rather than ``[None, positions]``: Core ML reads a ``None``
        # index as a single-position slice; explicit pairs become one scatter on every backend.
        seq = positions.shape[0]
        heads = torch.arange(self.cache_spec.n_kv_heads).unsqueeze(1).expand(-1, seq)
        return write(cache, [heads, positions.unsqueeze(0).expand(self.cache_spec.n_kv_heads, -1)], values)


class DecodeModule(SlotModule, StaticKVCache):
    """The anchor, one path's memory as ``slot.*`` parameters (or none), and a static KV cache.

    ``memory=()`` gives the same program without a memory FFN (the baseline of the memory-cost benchmark).
    The module computes what :class:`MemoryLM` computes: for a prompt fed in any split into calls, the
    logits equal the full-window forward's logits at those positions (up to float summation order).
    ``attention`` (see :data:`ATTENTION`) chooses how each layer attends over the cache.
    """

    def __init__(
        self,
        model: MemoryLM,
        memory: Sequence[LayerMemory],
        cache: CacheForm = "state",
        layout: SlotLayout | None = None,
        attention: Attention = "masked",
        cache_dtype: str = "float32",
    ) -> None:
        super().__init__(model, memory, layout)
        self.init_cache(model.cfg, cache, attention, cache_dtype)

    def forward(self, tokens: Tensor, input_pos: Tensor, *past: Tensor) -> Tensor | tuple[Tensor, ...]:  # type: ignore[override]
        seq = tokens.shape[1]
        positions = input_pos + torch.arange(seq, dtype=input_pos.dtype)
        cos = self.rope_cos.index_select(0, positions)
        sin = self.rope_sin.index_select(0, positions)
        first = self.blocks[0].attn
        layers = self.cfg.memory.layers if len(self.slot) else ()
        memory = {j: self.layer_memory(j) for j in layers}
        caches = self.cache_tensors(past)
        present = []
        x = self.embed(tokens)
        if self.attention == "kernel":
            for index, block in enumerate(self.blocks):
                attn = block.attn
                q, k, v = attn.heads(block.attn_norm(x), cos, sin)
                out = attend_cache(q, k, v, caches[2 * index], caches[2 * index + 1], input_pos, attn.head_dim**-0.5)
                x = block.feed_forward(
                    x + attn.wo(out.reshape(1, seq, attn.n_heads * attn.head_dim)), memory.get(index)
                )
        else:
            mask = self.causal_mask.index_select(0, positions.repeat(first.group))  # [group*n, max_seq_len]
            for index, block in enumerate(self.blocks):
                q, k, v = block.attn.project(block.attn_norm(x), cos, sin)
                keys = self.write_cache(caches[2 * index], positions, k)
                values = self.write_cache(caches[2 * index + 1], positions, v)
                present += [keys, values]
                x = block.feed_forward(x + block.attn.attend(q, keys, values, mask, 1, seq), memory.get(index))
        logits = self.output_logits(self.norm(x[:, -1:] if self.last_logits else x))
        return (logits, *present) if self.cache_form == "io" else logits
