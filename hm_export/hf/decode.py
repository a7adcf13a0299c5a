"""KV-cache decode program for Hugging Face hosts: the host's own layers over hm-export's static cache.

:class:`HostDecodeModule` is to :class:`~hm_export.hf.model.HostMemoryLM` what
:class:`~hm_export.decode.DecodeModule` is to the reference model: same call signature
(``tokens [1, n]``, ``input_pos [1]``, the ``io`` cache's past tensors), same cache layout
(``[n_kv, max_seq_len, head_dim]`` per layer and tensor, keys after RoPE), same two cache forms, so
every target's decode emitter, runner, golden checks and ``bench`` take it unchanged.

The host runs its own attention code.  It receives the cache as an object with the one method its
attention layers call, ``update(keys, values, layer_idx)``, which writes this call's positions into the
static tensors and returns them whole; and it receives explicit ``position_ids`` and a 4-D additive mask
gathered from tables computed at export (causal, and for sliding-window layers also windowed), so no mask
is built per call and stale cache positions never contribute.

With ``attention="kernel"`` (the ExecuTorch decode program) the host's attention layers call an attention
function registered with ``transformers``' ``AttentionInterface`` (:data:`KERNEL_ATTENTION`), as
optimum-executorch does: the cache object then hands each layer's new keys/values through unchanged and the
function runs ``hm_export::attend_cache``, which writes them into the static cache and attends only over the
filled positions (causal, windowed for sliding-window layers), with no mask tensor and no ``repeat_kv`` copies
of grouped heads. Every family takes this path the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from hm_export.decode import Attention, CacheForm, StaticKVCache
from hm_export.hf.families import host_structure
from hm_export.hf.model import HostMemoryLM, HostSlotModule
from hm_export.kernels import attend_cache
from hm_export.model import LayerMemory

if TYPE_CHECKING:
    from hm_export.kernels.strategies import SlotLayout


def mask_table(length: int, window: int | None = None) -> Tensor:
    """Additive mask ``[length, length]``: row ``q`` lets keys ``k <= q`` (and ``q - k < window``) through.

    The most negative float rather than -inf, as the hosts' own eager masks: ``exp`` still gives exactly 0.
    """
    query, key = torch.arange(length).unsqueeze(1), torch.arange(length).unsqueeze(0)
    allowed = key <= query
    if window is not None:
        allowed &= query - key < window
    return torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)


class _CacheWriter:
    """What a host's attention layers see as their cache: ``update`` writes, and returns the whole cache."""

    def __init__(self, owner: StaticKVCache, caches: list[Tensor], positions: Tensor) -> None:
        self.owner, self.caches, self.positions = owner, caches, positions
        self.present: list[Tensor] = [torch.empty(0)] * len(caches)

    def update(self, keys: Tensor, values: Tensor, layer_idx: int, *_: Any, **__: Any) -> tuple[Tensor, Tensor]:
        for offset, tensor in enumerate((keys, values)):
            slot = 2 * layer_idx + offset
            self.present[slot] = self.owner.write_cache(self.caches[slot], self.positions, tensor[0])
        return self.present[2 * layer_idx].unsqueeze(0), self.present[2 * layer_idx + 1].unsqueeze(0)


KERNEL_ATTENTION = "hm_export_attend_cache"  # the attention implementation name registered with transformers


class _KernelCache:
    """The cache the host's layers see on the kernel path: ``update`` returns this call's keys/values as they are;
    :func:`_attend_with_kernel` writes them into the static caches (``caches``) and attends."""

    active: ClassVar[list[_KernelCache]] = []  # the cache of the forward call in progress

    def __init__(self, caches: list[Tensor], input_pos: Tensor) -> None:
        self.caches, self.input_pos = caches, input_pos

    def update(self, keys: Tensor, values: Tensor, layer_idx: int, **_: Any) -> tuple[Tensor, Tensor]:
        return keys, values

    @contextmanager
    def use(self) -> Iterator[None]:
        _KernelCache.active.append(self)
        try:
            yield
        finally:
            _KernelCache.active.pop()


def _attend_with_kernel(
    module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kwargs: Any
) -> tuple[Tensor, None]:
    """A ``transformers`` attention function: ``hm_export::attend_cache`` on the layer's static cache."""
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping has no kernel path: export with attention='masked'")
    cache = _KernelCache.active[-1]
    layer = module.layer_idx
    scale = kwargs.get("scaling")
    scale = float(scale) if scale is not None else query.shape[-1] ** -0.5
    window = int(kwargs.get("sliding_window") or 0)
    out = attend_cache(
        query, key, value, cache.caches[2 * layer], cache.caches[2 * layer + 1], cache.input_pos, scale, window
    )
    return out, None


@contextmanager
def _attention_implementation(config: Any, name: str) -> Iterator[None]:
    """The host runs with attention implementation ``name`` (registered first) inside the block."""
    from transformers import AttentionInterface

    AttentionInterface.register(KERNEL_ATTENTION, _attend_with_kernel)
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


class HostDecodeModule(HostSlotModule, StaticKVCache):
    """A host, one path's memory as ``slot.*`` parameters (or none), and a static KV cache; ``attention`` as in
    :class:`~hm_export.decode.DecodeModule`."""

    def __init__(
        self,
        model: HostMemoryLM,
        memory: Sequence[LayerMemory],
        cache: CacheForm = "state",
        layout: SlotLayout | None = None,
        attention: Attention = "masked",
        cache_dtype: str = "float32",
    ) -> None:
        super().__init__(model, memory, layout)
        self.init_cache(model.cfg, cache, attention, cache_dtype)
        mask = host_structure(model.cfg).mask
        self.per_layer_type = mask == "per-layer-type"
        window = getattr(self.host.config, "sliding_window", None)
        length = self.cfg.max_seq_len
        if attention == "kernel":  # the kernel masks by position itself
            tables = {}
        elif self.per_layer_type:
            tables = {"full_attention": mask_table(length), "sliding_attention": mask_table(length, window)}
        else:  # one mask for every layer, windowed when the whole model is (Mistral, Phi-3)
            tables = {"all_layers": mask_table(length, window if mask == "windowed" else None)}
        for kind, table in tables.items():
            self.register_buffer(f"mask_{kind}", table, persistent=False)
        self.mask_kinds = tuple(tables)

    def forward(self, tokens: Tensor, input_pos: Tensor, *past: Tensor) -> Tensor | tuple[Tensor, ...]:  # type: ignore[override]
        positions = input_pos + torch.arange(tokens.shape[1], dtype=input_pos.dtype)
        memory = self.slot_memory() if len(self.slot) else None
        keep = 1 if self.last_logits else 0  # transformers' logits_to_keep: 0 keeps every position
        if self.attention == "kernel":
            cache = _KernelCache(self.cache_tensors(past), input_pos)
            with cache.use(), _attention_implementation(self.host.config, KERNEL_ATTENTION):
                with self.active.use(self.cfg.memory.layers, memory):
                    return self.host(
                        input_ids=tokens, position_ids=positions.unsqueeze(0), cache=cache, logits_to_keep=keep
                    ).logits
        masks = {kind: getattr(self, f"mask_{kind}").index_select(0, positions)[None, None] for kind in self.mask_kinds}
        mask: Tensor | dict[str, Tensor] = masks if self.per_layer_type else masks["all_layers"]
        writer = _CacheWriter(self, self.cache_tensors(past), positions)
        with self.active.use(self.cfg.memory.layers, memory):
            logits = self.host(
                input_ids=tokens,
                position_ids=positions.unsqueeze(0),
                attention_mask=mask,
                cache=writer,
                logits_to_keep=keep,
            ).logits
        return (logits, *writer.present) if self.cache_form == "io" else logits
