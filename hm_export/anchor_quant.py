"""Anchor quantization (``--anchor-quant``): one registry of presets, mapped per target.

A preset says how the anchor's weights are stored: its linear layers (attention and MLP projections), the
output head and the token embedding, each as :class:`WeightQuant` (bits, and weights per scale along the
input axis) or float32.  The memory slot is never touched: it is made of graph inputs (float, or the bank's
own int8/int4 codes read by the fused kernel), and the export passes still prove that the slot is an input
and the anchor's weights are constants.

=================  ==================  =================  ====================================================
preset             linears             head               embedding
=================  ==================  =================  ====================================================
``none``           float32             float32            float32
``int8-weight``    int8 per channel    int8 per channel   int8 per row
``8da4w-g32``      int4, groups of 32  int4, groups of 32 int4, groups of 32
``8da4w-g128``     int4, groups of 128 int4, groups of 128 int4, groups of 128
``8da4w-g32-e8``   int4, groups of 32  int8 per channel   int8 per row
``8da4w-g32-asym`` asym. int4, g 32    asym. int4, g 32   the head's table (tied), else asym. int4, g 32
``8da4w-g32-asym-e8`` asym. int4, g 32 int8, groups of 32 the head's table (tied), else int8, g 32
``...-e8-screen64`` asym. int4, g 32   screened (below)   int8, groups of 32 (the head's exact table)
=================  ==================  =================  ====================================================

``8da4w-g32-asym-e8-screen64`` reads a tied head mostly from a small table: ``hm_export::screened_head`` computes
every logit from an asymmetric int4 copy of the table (groups of 32), then recomputes the 64 largest per token from
the embedding's int8 table with float activations.  A decode step reads 5 bits per head weight instead of 8.5 and
64 columns of the int8 table; greedy decoding, top-k / top-p sampling and the likelihood of any likely token see
the int8 table's values.  The price is the int4 copy on disk (0.63 bytes per head weight).  An untied head is a
linear in the linears' grid, as in the other ``-asym`` presets.

The ``-asym`` presets store llama.cpp's grids: asymmetric int4 (Q4_1: ``w = scale * q + min``, ``q`` in 0..15, a
float16 scale and min per group of 32 input values, chosen min-max) and symmetric int8 (Q8_0: ``w = scale * q``, a
float16 scale per group of 32).  A host made of Q4_1 blocks (a dequantized Q4_1 GGUF, e.g. SmolLM2's) is recovered
exactly by the min-max choice; ``-asym-e8`` also recovers a Q8_0 token embedding (the same GGUF's).  XNNPACK's qb4w
has one zero point per kernel, not one min per group, so these presets run on hm-export's own kernels
(``hm_export::qlinear`` / ``hm_export::qembedding``, kernels/qlinear.cpp) and one table serves a tied embedding's
lookup and its head (stored once).

A group that does not divide a layer's input width falls back to the largest multiple of 32 below it that
does (SmolLM2's width 576 takes groups of 96 under ``-g128``), else to one scale per output channel; the
manifest lists the groups used.

What each target makes of a preset (recorded per target in the manifest as ``anchor_quant``):

* **executorch** (``-asym`` presets): every linear becomes ``hm_export::qlinear`` (int8 activations with one
  symmetric scale per token and group of 32, times the grid's codes; the min term from each token's group sums),
  a tied embedding becomes
  ``hm_export::qembedding`` over the head's own table.  A table no ``qlinear`` reads (an untied embedding, or
  ``-screen64``'s int8 table: the lookup and the 64 exact logits read it one column at a time) is stored by column
  (:class:`LookupTable`), each token's codes one contiguous run.
* **executorch** (the others): the linears and the head get torchao's ``Int8DynamicActivationIntxWeightConfig``
  (``8da``: int8 activations quantized per token at run time, weights int4/int8, scales chosen by HQQ), the
  configuration ExecuTorch's own ``export_llm`` uses, lowered to XNNPACK's ``qd8`` GEMMs; the embedding becomes
  ExecuTorch's ``quantized_decomposed::embedding_4bit`` / ``embedding_byte`` lookup (float16 scales).  The
  tied embedding is then stored twice, once as the lookup table and once inside XNNPACK's head (the delegate
  keeps its own packed copy of its constants; no shared-weight lookup+GEMM exists in this runtime).  A float32
  anchor (``none``) stores it once: its head is ``hm_export::tied_head``, reading the lookup's table.
* **onnx**: weight-only: ONNX Runtime's ``MatMulNBits`` (int4 or int8, block = the group, symmetric) for the
  linears and the head, ``GatherBlockQuantized`` for the embedding; activations stay float32.
* **coreml**: weight-only through the existing anchor compression (``linear_quantize_weights``: int4 per
  block of the group, or int8 per channel), on every constant weight including the embedding.
* The ``-asym`` presets are ExecuTorch only for now (:attr:`AnchorQuant.targets`); ONNX and Core ML refuse them.

:func:`quantize_for_executorch` applies the ExecuTorch mapping to an export module (a decode or slot module
built from a copy of the model); :func:`exported_model` returns that copy, the eager model "as exported",
which golden checks and ``verify`` compare the program against.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hm_export.architectures import MemoryModel
from hm_export.errors import ConfigError, UsageError
from hm_export.kernels import column_codes, qembedding, qlinear, screened_head, tied_head, tile_codes, untile_codes
from hm_export.model import TiedHead

ANCHOR_QUANT_TARGETS = ("executorch", "onnx", "coreml")  # targets that quantize the anchor; others refuse


@dataclass(frozen=True)
class WeightQuant:
    """Weights stored with ``bits`` (4 or 8) per value and one scale per ``group`` values along the input axis
    (``0``: one scale per output channel, or per embedding row); ``asymmetric`` (int4 only): also one min per
    group, ``w = scale * q + min`` with ``q`` in 0..15 (llama.cpp's Q4_1)."""

    bits: int
    group: int = 0
    asymmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8) or self.group < 0 or (self.group and self.group % 32):
            raise ConfigError(f"bits must be 4 or 8 and group 0 or a multiple of 32, got {self}")
        if self.asymmetric and self.bits != 4:
            raise ConfigError(f"asymmetric weights are int4 only, got {self}")

    def group_for(self, width: int) -> int:
        """The group used for an input width: ``group`` when it divides ``width``, else the largest multiple of
        32 below it that does, else 0 (per channel)."""
        if not self.group:
            return 0
        for group in range(self.group, 0, -32):
            if width % group == 0:
                return group
        return 0

    def describe(self) -> str:
        kind = "asymmetric int4 (scale * q + min)" if self.asymmetric else f"int{self.bits}"
        return f"{kind} " + (f"groups of {self.group}" if self.group else "per channel")


@dataclass(frozen=True)
class AnchorQuant:
    """One preset: how the anchor's linears, head and embedding are stored (``None``: float32), and what
    ``verify`` allows it by default against the float checkpoint: ``tolerance`` = (perplexity increase in %,
    added to the bank scheme's; top-1 agreement floor), set from the SmolLM2-135M measurements of
    docs/anchor-quant.md with margin."""

    name: str
    linears: WeightQuant | None
    head: WeightQuant | None
    embedding: WeightQuant | None
    summary: str
    tolerance: tuple[float, float] = (0.0, 1.0)
    kernel: str = "xnnpack"  # ExecuTorch: "xnnpack" (torchao 8da, qd8 GEMMs) or "hm_export" (qlinear / qembedding)
    targets: tuple[str, ...] = ANCHOR_QUANT_TARGETS  # the targets with a mapping for this preset
    # hm_export kernels: a tied head screened in this grid, its `screen_top` best logits per token from `head`'s table
    screen: WeightQuant | None = None
    screen_top: int = 0

    @property
    def quantized(self) -> bool:
        return any(q is not None for q in (self.linears, self.head, self.embedding))

    @property
    def kv_cache(self) -> str:
        """The KV cache of the ExecuTorch decode program (``hm_export::attend_cache``): float16 for a quantized
        anchor, exported for speed, whose own error dwarfs the rounding of keys and values (a step reads half the
        cache's bytes); float32 for the float anchor, exported to match the checkpoint."""
        return "float16" if self.quantized else "float32"


PRESETS: dict[str, AnchorQuant] = {
    preset.name: preset
    for preset in (
        AnchorQuant("none", None, None, None, "float32 anchor"),
        AnchorQuant(
            "int8-weight",
            WeightQuant(8),
            WeightQuant(8),
            WeightQuant(8),
            "int8 weights per channel everywhere",
            (6.0, 0.85),
        ),
        AnchorQuant(
            "8da4w-g32",
            WeightQuant(4, 32),
            WeightQuant(4, 32),
            WeightQuant(4, 32),
            "int4 weights in groups of 32 (export_llm's 8da4w with embedding 4,32)",
            (100.0, 0.50),
        ),
        AnchorQuant(
            "8da4w-g128",
            WeightQuant(4, 128),
            WeightQuant(4, 128),
            WeightQuant(4, 128),
            "int4 in groups of 128",
            (150.0, 0.45),
        ),
        AnchorQuant(
            "8da4w-g32-e8",
            WeightQuant(4, 32),
            WeightQuant(8),
            WeightQuant(8),
            "int4 linears in groups of 32, int8 head and embedding",
            (100.0, 0.50),
        ),
        AnchorQuant(
            "8da4w-g32-asym",
            WeightQuant(4, 32, asymmetric=True),
            WeightQuant(4, 32, asymmetric=True),
            WeightQuant(4, 32, asymmetric=True),
            "asymmetric int4 in groups of 32 everywhere (llama.cpp's Q4_1 grid), hm_export kernels, one tied table",
            (12.0, 0.85),
            kernel="hm_export",
            targets=("executorch",),
        ),
        AnchorQuant(
            "8da4w-g32-asym-e8",
            WeightQuant(4, 32, asymmetric=True),
            WeightQuant(8, 32),
            WeightQuant(8, 32),
            "asymmetric int4 linears (Q4_1), int8 head and embedding in groups of 32 (Q8_0), hm_export kernels",
            (2.0, 0.90),
            kernel="hm_export",
            targets=("executorch",),
        ),
        AnchorQuant(
            "8da4w-g32-asym-e8-screen64",
            WeightQuant(4, 32, asymmetric=True),
            WeightQuant(8, 32),
            WeightQuant(8, 32),
            "as -asym-e8, the tied head screened in asymmetric int4 and its 64 best logits per token from the int8 "
            "table, hm_export kernels",
            (3.0, 0.90),
            kernel="hm_export",
            targets=("executorch",),
            screen=WeightQuant(4, 32, asymmetric=True),
            screen_top=64,
        ),
    )
}
DEFAULT_PRESET = "none"


def get_preset(name: str) -> AnchorQuant:
    if name not in PRESETS:
        raise UsageError(f"unknown anchor quantization {name!r}, expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def check_preset(name: str, targets: tuple[str, ...] | list[str]) -> None:
    """ValueError for an unknown preset, or a quantized one with a target that cannot quantize the anchor."""
    preset = get_preset(name)
    unsupported = [t for t in targets if preset.quantized and t not in preset.targets]
    if unsupported:
        raise UsageError(
            f"anchor quantization {name!r} is not available for targets {unsupported} (only {preset.targets})"
        )


# --- ExecuTorch: torchao 8da linears, quantized_decomposed embedding ------------------------------------------


def _linear_config(quant: WeightQuant, width: int) -> Any:
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    group = quant.group_for(width)
    return Int8DynamicActivationIntxWeightConfig(
        weight_dtype=getattr(torch, f"int{quant.bits}"),
        weight_granularity=PerGroup(group) if group else PerAxis(0),
        intx_choose_qparams_algorithm="hqq_scale_only",  # export_llm's default (quantize_with_hqq)
    )


class QuantizedEmbedding(nn.Module):
    """A token embedding stored as int4 (two codes + 8 per byte, even column in the HIGH nibble, ExecuTorch's
    ``embedding_4bit`` layout) or int8 codes with float16 scales ``[vocab, d / group]``; the lookup dequantizes
    only the rows it gathers (``quantized_decomposed::embedding_4bit.dtype`` / ``embedding_byte.dtype``)."""

    def __init__(self, weight: Tensor, quant: WeightQuant) -> None:
        super().__init__()
        import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  (defines the ops)

        vocab, dim = weight.shape
        group = quant.group_for(dim) or dim
        self.bits = quant.bits
        codes, scales = symmetric_codes(weight.detach().float(), quant.bits, group)
        if quant.bits == 4:
            nibbles = (codes + 8).to(torch.uint8).view(vocab, dim // 2, 2)
            codes = nibbles[..., 0] * 16 + nibbles[..., 1]
        self.register_buffer("weight", codes.contiguous())
        self.register_buffer("scales", scales.half().contiguous())

    def forward(self, tokens: Tensor) -> Tensor:
        ops = torch.ops.quantized_decomposed
        if self.bits == 4:
            return ops.embedding_4bit.dtype(self.weight, self.scales, None, -8, 7, tokens, dtype=torch.float32)
        return ops.embedding_byte.dtype(self.weight, self.scales, None, -128, 127, tokens, dtype=torch.float32)


def symmetric_codes(weight: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor]:
    """Round-to-nearest symmetric codes of float ``[rows, cols]`` per ``group`` columns: (int8 codes in
    ``-2^(b-1) .. 2^(b-1) - 1``, scales ``[rows, cols / group]`` = ``max|w| / (2^(b-1) - 1)``, fp16-rounded
    before the codes are computed so that codes * stored scale is what the program dequantizes)."""
    rows, cols = weight.shape
    grouped = weight.view(rows, cols // group, group)
    qmax = 2 ** (bits - 1) - 1
    scales = (grouped.abs().amax(dim=-1) / qmax).half().float()
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    codes = torch.clamp(torch.round(grouped / safe[..., None]), -qmax - 1, qmax).to(torch.int8)
    return codes.view(rows, cols), scales


class KernelTiedHead(TiedHead):
    """A float32 head tied to the token embedding, computed by ``hm_export::tied_head`` from the embedding's own
    parameter (one placeholder, one table in the program)."""

    def forward(self, h: Tensor) -> Tensor:
        return tied_head(h, self.weight)


def _embeddings(module: nn.Module) -> list[tuple[nn.Module, str, nn.Embedding]]:
    return [(parent, name, child) for parent, name, child in _parents(module) if isinstance(child, nn.Embedding)]


def _head_names(module: nn.Module) -> set[str]:
    """Names of the heads whose weight is the embedding's (a host's tied ``nn.Linear``, or a :class:`TiedHead`)."""
    embedding_weights = {id(e.weight) for _, _, e in _embeddings(module)}
    return {
        n
        for n, m in module.named_modules()
        if isinstance(m, (nn.Linear, TiedHead)) and id(m.weight) in embedding_weights
    }


def _untie(module: nn.Module, names: set[str], make: Any) -> None:
    """Replace each tied head named in ``names`` by ``make(embedding)``."""
    embeddings = {id(e.weight): e for _, _, e in _embeddings(module)}
    for parent, name, child in _parents(module):
        full = next((n for n, m in module.named_modules() if m is child), None)
        if full in names:
            setattr(parent, name, make(embeddings[id(child.weight)]))


def asymmetric_codes(weight: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Min-max asymmetric int4 codes of float ``[out, in]`` per ``group`` input values (llama.cpp's Q4_1 choice):
    ``scale = (max - min) / 15`` and ``min`` rounded to float16 first, ``q = clamp(round((w - min) / scale), 0,
    15)``; returns (q uint8 ``[out, in]``, scales and mins float32 ``[out, in / group]``, float16 values).  A group
    that is a Q4_1 block (``d * q + m``, its ``q`` spanning 0..15 as llama.cpp's quantizer makes it) comes back
    exactly."""
    rows, cols = weight.shape
    grouped = weight.view(rows, cols // group, group)
    low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    scales = ((high - low) / 15).half().float()
    mins = low.half().float()
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    codes = torch.clamp(torch.round((grouped - mins[..., None]) / safe[..., None]), 0, 15).to(torch.uint8)
    return codes.view(rows, cols), scales, mins


def grid_codes(weight: Tensor, quant: WeightQuant, name: str) -> tuple[Tensor, Tensor, Tensor, int]:
    """Float ``[out, in]`` in one of llama.cpp's grids, per group of inputs: (codes ``[out, in]``: uint8 0..15
    (asymmetric int4, :func:`asymmetric_codes`) or int8 (symmetric int8); scales and mins float32 ``[out, in / g]``
    (mins empty for int8); the group ``g``)."""
    group = quant.group_for(weight.shape[1]) or weight.shape[1]
    weight = weight.detach().float()
    if quant.bits == 4:
        if not quant.asymmetric:
            raise ConfigError(f"{name}: int4 tables are asymmetric (Q4_1), got {quant.describe()}")
        return (*asymmetric_codes(weight, group), group)
    q, scales = symmetric_codes(weight, 8, group)
    return q, scales, torch.empty(0), group


class GridLinear(nn.Module):
    """A linear layer in llama.cpp's grids, computed by ``hm_export::qlinear`` (kernels/__init__.py): the weight
    ``[out, in]`` stored with the input as rows, as asymmetric int4 (``codes`` uint8 tiled ``[in / g, ceil(out /
    32), g * 16]``; ``scales`` / ``mins`` float16 ``[in / g, out]``) or symmetric int8 (``codes`` int8 tiled ``[in
    / g, ceil(out / 16), g * 16]``, ``mins`` empty), tiled by :func:`hm_export.kernels.tile_codes`."""

    def __init__(self, weight: Tensor, quant: WeightQuant, bias: Tensor | None = None, name: str = "weight") -> None:
        super().__init__()
        q, scales, mins, group = grid_codes(weight, quant, name)
        if group % 4:
            raise ConfigError(
                f"{name}: tables come in groups of a multiple of 4 input rows (the tiled layout), got "
                f"{list(weight.shape)} in groups of {group}"
            )
        self.register_buffer("codes", tile_codes(q.t(), group).contiguous())
        self.register_buffer("scales", scales.t().half().contiguous())
        self.register_buffer("mins", mins.t().half().contiguous() if mins.numel() else mins.half())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantized(self) -> Tensor:
        """The weights the kernel multiplies by, float32 ``[out, in]`` (``scale * q (+ min)``)."""
        group = self.codes.shape[2] // 16
        q = untile_codes(self.codes, self.scales.shape[1]).float()
        scales = self.scales.float().repeat_interleave(group, dim=0)
        if self.codes.dtype == torch.int8:
            return (scales * q).t()
        return (scales * q + self.mins.float().repeat_interleave(group, dim=0)).t()

    def forward(self, x: Tensor) -> Tensor:
        out = qlinear(x, self.codes, self.scales, self.mins)
        return out if self.bias is None else out + self.bias


class LookupTable(nn.Module):
    """An embedding ``[V, d]`` in llama.cpp's grids that only lookups read (``hm_export::qembedding``; a screened
    head's exact logits), stored by column (:func:`hm_export.kernels.column_codes`): token ``v``'s codes are one
    contiguous run (576 bytes for SmolLM2 in int8) where a tiled table spreads them over ``d / 4`` quads of 64 bytes;
    ``scales`` / ``mins`` float16 ``[V, d / g]``."""

    def __init__(self, weight: Tensor, quant: WeightQuant, name: str = "weight") -> None:
        super().__init__()
        q, scales, mins, _ = grid_codes(weight, quant, name)
        self.register_buffer("codes", column_codes(q))
        self.register_buffer("scales", scales.half().contiguous())
        self.register_buffer("mins", mins.half().contiguous())


class GridEmbedding(nn.Module):
    """A token embedding looked up (``hm_export::qembedding``) in a table: a :class:`GridLinear`'s when a tied head
    reads it as a linear (the embedding ``[V, d]`` is that linear's weight, ``d`` inputs and ``V`` outputs, so the
    head is the same module and the program holds one table), else a :class:`LookupTable`."""

    def __init__(self, table: GridLinear | LookupTable) -> None:
        super().__init__()
        self.table = table

    def forward(self, tokens: Tensor) -> Tensor:
        return qembedding(tokens, self.table.codes, self.table.scales, self.table.mins)


class GridTiedHead(nn.Module):
    """The output head tied to a :class:`GridEmbedding`: its table, not registered again (as :class:`TiedHead`)."""

    def __init__(self, embedding: GridEmbedding) -> None:
        super().__init__()
        self.embedding = [embedding]  # a list: not a registered submodule

    def forward(self, h: Tensor) -> Tensor:
        return self.embedding[0].table(h)


class ScreenedTiedHead(nn.Module):
    """The output head tied to a :class:`GridEmbedding`, computed by ``hm_export::screened_head``: every logit from
    ``screen`` (a smaller copy of the table), the ``top`` largest per token again from the embedding's table."""

    def __init__(self, embedding: GridEmbedding, screen: GridLinear, top: int) -> None:
        super().__init__()
        self.embedding = [embedding]  # a list: not a registered submodule
        self.screen = screen
        self.top = top

    def forward(self, h: Tensor) -> Tensor:
        exact, screen = self.embedding[0].table, self.screen
        return screened_head(
            h, (screen.codes, screen.scales, screen.mins), (exact.codes, exact.scales, exact.mins), self.top
        )


def _quantize_to_grids(module: nn.Module, preset: AnchorQuant) -> dict[str, Any]:
    """``quantize_for_executorch`` for the ``-asym`` presets: every anchor linear a :class:`GridLinear`, a tied
    embedding and head one table (:class:`GridEmbedding`, :class:`GridTiedHead`)."""
    assert preset.linears is not None and preset.head is not None and preset.embedding is not None
    heads = _head_names(module)
    embeddings = _embeddings(module)
    tied = bool(heads)
    if tied and preset.head != preset.embedding:
        raise ConfigError(f"{preset.name}: a tied head and embedding share one table, so they need one format")
    done: dict[str, Any] = {"preset": preset.name}
    groups: dict[str, dict[int, int]] = {"linears": {}, "head": {}}
    for parent, name, child in _parents(module):
        full = next((n for n, m in module.named_modules() if m is child), "")
        if isinstance(child, nn.Linear) and not full.startswith("slot") and full not in heads:  # an untied head too
            setattr(parent, name, GridLinear(child.weight, preset.linears, child.bias, name=full))
            groups["linears"][child.in_features] = preset.linears.group_for(child.in_features) or child.in_features
    screened = tied and preset.screen is not None
    head_linear = tied and not screened  # the head reads the table as a qlinear: tiled; else lookups only
    for parent, name, embedding in embeddings:
        width = embedding.embedding_dim
        table = (GridLinear if head_linear else LookupTable)(embedding.weight, preset.embedding, name=name)
        grid = GridEmbedding(table)
        setattr(parent, name, grid)
        group = preset.embedding.group_for(width) or width
        done["embedding"] = {
            "weights": _grid_weights(preset.embedding),
            "group": group,
            "layout": "tiled (the head's qlinear table)" if head_linear else "by column (lookups only)",
            "kernel": "hm_export::qembedding" + (" (reads the head's table)" if tied else ""),
            "shared_with_head": tied,
        }
        if screened:
            top = min(preset.screen_top, embedding.num_embeddings)
            screen = GridLinear(embedding.weight, preset.screen, name=f"{name} (head screen)")
            _untie_to(module, heads, ScreenedTiedHead(grid, screen, top))
            done["head"] = {
                "scheme": "screened",
                "screen": _grid_weights(preset.screen),
                "exact": f"the embedding's table ({_grid_weights(preset.embedding)}), float activations",
                "exact_top": top,
                "groups_by_input_width": {str(width): preset.screen.group_for(width) or width},
                "kernel": "hm_export::screened_head",
            }
            done["tied_embedding"] = (
                "stored once, read by the lookup and the head's exact logits; the head's screen is a copy in "
                + _grid_weights(preset.screen)
            )
        elif tied:
            _untie_to(module, heads, GridTiedHead(grid))
            groups["head"][width] = group
            done["tied_embedding"] = "stored once: the head (hm_export::qlinear) and the lookup read one table"
    for role, quant in (("linears", preset.linears), ("head", preset.head)):
        if groups[role]:
            done[role] = {
                "scheme": "8da4w-asym" if quant.asymmetric else f"8da{quant.bits}w",
                "weights": _grid_weights(quant),
                "activations": "int8, dynamic per token and group of the weights' group (symmetric)",
                "groups_by_input_width": {str(w): g for w, g in sorted(groups[role].items())},
                "kernel": "hm_export::qlinear",
            }
    return done


def _grid_weights(quant: WeightQuant) -> str:
    return quant.describe() + ", float16 scales" + (" and mins" if quant.asymmetric else "")


def _untie_to(module: nn.Module, names: set[str], head: nn.Module) -> None:
    for parent, name, child in _parents(module):
        full = next((n for n, m in module.named_modules() if m is child), None)
        if full in names:
            setattr(parent, name, head)


@torch.no_grad()
def quantize_for_executorch(module: nn.Module, preset: AnchorQuant) -> dict[str, Any]:
    """Quantize ``module``'s anchor in place as the ExecuTorch target does (see the module docstring); returns
    the manifest's description (what was quantized, with the groups used).  Memory slot tensors are
    parameters of ``module.slot`` and never linear modules, so they stay as they are."""
    if preset.kernel == "hm_export":
        return _quantize_to_grids(module, preset)
    from torchao.quantization import quantize_

    heads = _head_names(module)
    done: dict[str, Any] = {"preset": preset.name}
    if preset.head is not None:  # the quantized head gets its own copy of the table: a plain linear to quantize
        _untie(module, heads, lambda e: _linear_copy(e.weight))
    if preset.linears is not None or preset.head is not None:
        linears = [
            (name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear) and not name.startswith("slot")
        ]
        groups: dict[str, dict[int, int]] = {"linears": {}, "head": {}}
        for name, linear in linears:
            role = "head" if name in heads else "linears"
            quant = preset.head if role == "head" else preset.linears
            if quant is None:
                continue
            width = linear.in_features
            quantize_(linear, _linear_config(quant, width), filter_fn=lambda m, _fqn, target=linear: m is target)
            groups[role][width] = quant.group_for(width)
            if quant.group_for(width):  # XNNPACK stores blockwise scales as bfloat16: compute with those values
                scale = linear.weight.scale
                scale.copy_(scale.to(torch.bfloat16).to(scale.dtype))
        for role in ("linears", "head"):
            quant = preset.linears if role == "linears" else preset.head
            if quant is not None:
                done[role] = {
                    "scheme": f"8da{quant.bits}w",
                    "weights": quant.describe() + (", bfloat16 scales" if quant.group else ", float32 scales"),
                    "activations": "int8, dynamic per token (asymmetric)",
                    "groups_by_input_width": {str(w): g for w, g in sorted(groups[role].items())},
                    "kernel": "XNNPACK qd8 GEMM",
                }
    if preset.embedding is not None:
        for parent, name, embedding in _embeddings(module):
            setattr(parent, name, QuantizedEmbedding(embedding.weight, preset.embedding))
            width = embedding.embedding_dim
            done["embedding"] = {
                "weights": preset.embedding.describe(),
                "group": preset.embedding.group_for(width) or width,
                "scales": "float16",
                "kernel": f"quantized_decomposed::embedding_{'4bit' if preset.embedding.bits == 4 else 'byte'}",
            }
    if heads and preset.head is None and preset.embedding is None:  # float: the head reads the lookup's table
        _untie(module, heads, KernelTiedHead)
        done["tied_embedding"] = "stored once: the head (hm_export::tied_head) reads the embedding's float32 table"
    elif heads:
        done["tied_embedding"] = (
            "stored twice: the quantized lookup table, and the head's weights inside XNNPACK (the delegate keeps its "
            "own packed copy; no kernel here computes the head from the lookup's table as fast)"
        )
    return done


def _linear_copy(weight: Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    return linear


def _parents(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    return [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()]


def exported_model(model: MemoryModel, preset: AnchorQuant) -> tuple[MemoryModel, dict[str, Any]]:
    """A copy of ``model`` with its anchor quantized as the ExecuTorch target quantizes it (and a tied float head
    computed from the embedding table; ``model`` itself when nothing changes), and the description of what was
    quantized: the eager model "as exported", which the ExecuTorch program is traced from and golden checks and
    ``verify`` compare against."""
    if not preset.quantized and not _head_names(model):  # type: ignore[arg-type]
        return model, {"preset": preset.name}
    clone = copy.deepcopy(model)
    return clone, quantize_for_executorch(clone, preset)  # type: ignore[arg-type]
