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
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hm_export.architectures import MemoryModel
from hm_export.config import ModelConfig
from hm_export.errors import UsageError
from hm_export.model import LayerMemory, MemoryLM, assemble_path
from hm_export.passes.pipeline import PassPipeline
from hm_export.slot import LOGITS_OUTPUT, TOKENS_INPUT, SlotContract, SlotModule
from hm_export.trace import SlotProgram, TensorIO, example_path, export_slot_module, slot_io

if TYPE_CHECKING:
    from hm_export.kernels.strategies import SlotLayout

POSITION_INPUT = "input_pos"
CacheForm = Literal["state", "io"]


@dataclass(frozen=True)
class CacheSpec:
    """The KV cache of a decode program: per anchor layer one key and one value tensor of ``shape``."""

    n_layers: int
    n_kv_heads: int
    max_seq_len: int
    head_dim: int
    dtype: str = "float32"

    @classmethod
    def for_model(cls, cfg: ModelConfig) -> CacheSpec:
        return cls(cfg.n_layers, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)

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

    def init_cache(self, cfg: ModelConfig, cache: CacheForm) -> None:
        if cache not in ("state", "io"):
            raise UsageError(f"cache must be 'state' or 'io', not {cache!r}")
        self.cache_form = cache
        self.cache_spec = CacheSpec.for_model(cfg)
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
    """

    def __init__(
        self,
        model: MemoryLM,
        memory: Sequence[LayerMemory],
        cache: CacheForm = "state",
        layout: SlotLayout | None = None,
    ) -> None:
        super().__init__(model, memory, layout)
        self.init_cache(model.cfg, cache)

    def forward(self, tokens: Tensor, input_pos: Tensor, *past: Tensor) -> Tensor | tuple[Tensor, ...]:  # type: ignore[override]
        seq = tokens.shape[1]
        positions = input_pos + torch.arange(seq, dtype=input_pos.dtype)
        cos = self.rope_cos.index_select(0, positions)
        sin = self.rope_sin.index_select(0, positions)
        first = self.blocks[0].attn
        mask = self.causal_mask.index_select(0, positions.repeat(first.group))  # [group*n, max_seq_len]
        layers = self.cfg.memory.layers if len(self.slot) else ()
        memory = {j: self.layer_memory(j) for j in layers}
        caches = self.cache_tensors(past)
        present = []
        x = self.embed(tokens)
        for index, block in enumerate(self.blocks):
            q, k, v = block.attn.project(block.attn_norm(x), cos, sin)
            keys = self.write_cache(caches[2 * index], positions, k)
            values = self.write_cache(caches[2 * index + 1], positions, v)
            present += [keys, values]
            x = block.feed_forward(x + block.attn.attend(q, keys, values, mask, 1, seq), memory.get(index))
        logits = F.linear(self.norm(x), self.embed.weight)
        return (logits, *present) if self.cache_form == "io" else logits


DECODE_STEM = "decode"
TOKENS_AXIS = "n"  # the dynamic number of tokens per call


def trace_decode_program(
    model: MemoryModel,
    contract: SlotContract,
    pipeline: PassPipeline,
    cache: CacheForm,
    memory: bool = True,
    layout: SlotLayout | None = None,
) -> SlotProgram:
    """Export the :class:`DecodeModule` of ``model`` (cache form ``cache``) and run the slot ``pipeline`` on it.

    The program's inputs are ``tokens [1, n]`` (``1 <= n <= max_seq_len``), ``input_pos [1]``, the past
    cache (``io`` form) and the slot; the slot passes hold exactly as for the full-window program.
    ``memory=False`` exports the same program without the memory FFN and without slot inputs (the baseline
    of ``scripts/bench_decode.py``).
    """
    cfg = model.cfg
    layers = assemble_path(model, example_path(cfg.memory)) if memory else ()
    module = model.decode_module(layers, cache, layout).eval()
    contract = contract if memory else replace(contract, tensors=())
    spec = module.cache_spec
    n = torch.export.Dim(TOKENS_AXIS, min=1, max=cfg.max_seq_len)
    past = spec.empty() if cache == "io" else []
    args = (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long), *past)
    cache_io = [TensorIO(name, spec.shape, spec.dtype) for name in spec.names("past")] if cache == "io" else []
    present = [TensorIO(name, spec.shape, spec.dtype) for name in spec.names("present")] if cache == "io" else []
    states = [TensorIO(name, spec.shape, spec.dtype) for name in spec.names("state")] if cache == "state" else []
    rest = (None,) * (len(past) + len(contract.tensors))
    return export_slot_module(
        module,
        args,
        contract,
        pipeline,
        stem=DECODE_STEM,
        inputs=(
            TensorIO(TOKENS_INPUT, (1, TOKENS_AXIS), "int64"),
            TensorIO(POSITION_INPUT, (1,), "int64"),
            *cache_io,
            *slot_io(contract),
        ),
        outputs=(TensorIO(LOGITS_OUTPUT, (1, TOKENS_AXIS, cfg.vocab_size), "float32"), *present),
        states=tuple(states),
        dynamic_shapes=({1: n}, None, *rest),
        export_dynamic_shapes=({1: n}, None, (None,) * len(past)) if past else ({1: n}, None),
        axes={TOKENS_AXIS: (1, cfg.max_seq_len)},
    )
