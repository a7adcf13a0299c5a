"""Custom operators of hm-export programs, their reference implementations, and the loader of their kernels.

``hm_export::memory_swiglu(x, gate_up, gate_up_scales, down, down_scales) -> Tensor`` computes one memory
layer's SwiGLU ``(silu(x @ Wg) * (x @ Wu)) @ Wd`` from quantized slot tensors, reading the codes inside the
matmul.  The weights are graph inputs (the slot), so no backend's constant-weight quantized kernel applies;
this op reads the codes directly instead of having the program or the host hold a float copy.  Like the
anchor's ``8da4w`` linears, activations are quantized per token to int8 (symmetric, scale ``max|x| / 127``)
before each of its two products, and each product sums a scale group exactly in integers.

Layouts (``R`` = memory width, ``d`` = model width, rows are the reduction axis of each matrix):

* int8: ``gate_up`` int8 ``[1, d, 2R]``, ``down`` int8 ``[1, R, d]``;
* int4: ``gate_up`` uint8 ``[1, d, R]``, ``down`` uint8 ``[1, R, d / 2]``: each byte holds two adjacent
  columns, column ``2c`` in the low nibble and ``2c + 1`` in the high nibble, as ``code + 8`` (``0..15``);
  this is the bank's int4 byte order (docs/bank-format.md), so a block's bytes are copied, not repacked;
* scales float16 ``[1, rows / g, cols]``: one scale per ``g`` consecutive rows of a column (int8 per output
  channel: ``g = rows`` for ``gate_up``; ``down``'s rows span the levels, each with its own scale, so there
  ``g`` divides every level's width).

``hm_export::attend_cache(q, k, v, k_cache, v_cache, input_pos, scale, window) -> Tensor`` is one attention
layer of the KV-cache decode program: it writes ``k``/``v`` (``[1, Hkv, S, D]``) into the caches
(``[Hkv, L, D]``, float32, or float16 for half the bytes read per step: ``k``/``v`` rounded to nearest even;
mutated in place) at positions ``input_pos ..``, then attends each query of ``q``
(``[1, Hq, S, D]``) over the filled positions it may see (causal; ``window > 0``: the last ``window`` ones),
query head ``h`` reading KV head ``h // (Hq / Hkv)``; returns ``[1, S, Hq, D]``.  Nothing past the last
written position is read, no mask tensor exists and grouped KV heads are never repeated.

``hm_export::qlinear(x, codes, scales, mins) -> Tensor`` is an anchor linear of the ``8da4w-g32-asym`` presets
(:mod:`hm_export.anchor_quant`): ``x [..., in]`` times weights in llama.cpp's grids, one float16 scale (and min)
per group of ``g`` input rows and column: asymmetric int4 (Q4_1, ``w = scale * q + min``, ``q`` in ``0..15``):
``codes`` uint8 ``[in / g, ceil(out / 32), g * 16]``, ``scales`` and ``mins`` float16 ``[in / g, out]``; or
symmetric int8 (Q8_0, ``w = scale * q``): ``codes`` int8 ``[in / g, ceil(out / 16), g * 16]``, ``mins`` empty
(``[0]``).  Codes are tiled (:func:`tile_codes`, ``qmatmul.h``): each group's chunk of columns is contiguous and the
four rows of a column sit in four consecutive bytes, so the kernels read the matrix as one stream and multiply with
VNNI / dot-product instructions without shuffles.  Activations are quantized to int8 as for ``memory_swiglu`` but
with one scale per token *and group of g inputs* (llama.cpp's Q8_1 / Q8_0 activation blocks); each group adds
``float(sum xq * q) * (scale * xs_g)`` (int4: ``+ min * (xs_g * float(sum xq))``).
``hm_export::qembedding(tokens, codes, scales, mins) -> Tensor`` looks tokens up in the same table (column ``v``
is token ``v``'s embedding, ``scale * q (+ min)`` per element), so a tied embedding and its head share one table.
A table that only lookups read (an untied embedding; a screened head's exact table) is stored **by column** instead
(:func:`column_codes`): ``codes`` int8 ``[out, in]`` or uint8 ``[out, in / 2]`` (two int4 codes per byte, input
``2i`` in the low nibble), ``scales`` and ``mins`` float16 ``[out, in / g]``, so a column is one contiguous run
(a tiled column is a few bytes in each of ``in / 4`` quads); ``qlinear`` refuses it.

``hm_export::screened_head(x, codes, scales, mins, exact_codes, exact_scales, exact_mins, top) -> Tensor`` is an
output head read mostly from a small table: ``qlinear`` over the screen table (``codes``, ``scales``, ``mins``),
then, per token, the ``top`` columns with the largest screen values (ties: the lower column) recomputed from the
exact table (``exact_*``, the same ``[in, out]`` in its own grid, e.g. a tied embedding's int8 table) with float
activations, ``sum_i x[i] * w[i, v]`` summed in float64 and rounded once.  Sampling and the teacher-forced
likelihood of a likely token then see the exact table's logits, while a decode step reads the screen whole and only
``top`` columns of the exact table.

``hm_export::tied_head(h, weight) -> Tensor`` is the output head of a float32 model whose head is tied to its
token embedding: ``h @ weight^T`` read from the embedding's own table ``[V, d]``, so a program stores that table
once (an XNNPACK linear keeps its own packed copy of its weight).

The C++ kernels (``kernels/*.cpp``, out variants ``*.out``, built into ``libhm_export_kernels.so`` here and into
the native runtime) compute what the reference implementations below compute: ``memory_swiglu`` with the same
integer sums and the same float operations per group (the paths of ``qmatmul.h`` agree bit for bit; the SiLU's
``exp`` may differ in the last bit, which can move one int8 code of ``h``), ``attend_cache`` to float32 rounding.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hm_export.errors import ExportError, UsageError

NAMESPACE = "hm_export"
LIBRARY_NAME = "libhm_export_kernels.so"
SOURCE_DIR = Path(__file__).resolve().parent  # the C++ sources ship with the package (kernels/ in the repo)
# the ExecuTorch kernels of the library
OPERATORS = (
    "memory_swiglu.out",
    "attend_cache.out",
    "tied_head.out",
    "qlinear.out",
    "qembedding.out",
    "screened_head.out",
)

_lib = torch.library.Library(NAMESPACE, "DEF")
_lib.define("memory_swiglu(Tensor x, Tensor gate_up, Tensor gate_up_scales, Tensor down, Tensor down_scales) -> Tensor")
_lib.define(
    "memory_swiglu.out(Tensor x, Tensor gate_up, Tensor gate_up_scales, Tensor down, Tensor down_scales, *, "
    "Tensor(a!) out) -> Tensor(a!)"
)
_lib.define(
    "attend_cache(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor input_pos, "
    "float scale, int window) -> Tensor"
)
_lib.define("tied_head(Tensor h, Tensor weight) -> Tensor")
_lib.define("qlinear(Tensor x, Tensor codes, Tensor scales, Tensor mins) -> Tensor")
_lib.define("qlinear.out(Tensor x, Tensor codes, Tensor scales, Tensor mins, *, Tensor(a!) out) -> Tensor(a!)")
_lib.define("qembedding(Tensor tokens, Tensor codes, Tensor scales, Tensor mins) -> Tensor")
_lib.define("qembedding.out(Tensor tokens, Tensor codes, Tensor scales, Tensor mins, *, Tensor(a!) out) -> Tensor(a!)")
_lib.define("tied_head.out(Tensor h, Tensor weight, *, Tensor(a!) out) -> Tensor(a!)")
_SCREENED_HEAD = (
    "Tensor x, Tensor codes, Tensor scales, Tensor mins, Tensor exact_codes, Tensor exact_scales, Tensor exact_mins, "
    "int top"
)
_lib.define(f"screened_head({_SCREENED_HEAD}) -> Tensor")
_lib.define(f"screened_head.out({_SCREENED_HEAD}, *, Tensor(a!) out) -> Tensor(a!)")
_lib.define(
    "attend_cache.out(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor input_pos, "
    "float scale, int window, *, Tensor(c!) out) -> Tensor(c!)"
)


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 ``[..., n]`` (two codes + 8 per byte, low nibble first) -> float32 codes ``[..., 2n]`` in -8..7.

    Arithmetic (floor-divide / remainder), not bit ops: bit ops on uint8 do not lower on every backend.
    """
    wide = packed.to(torch.int32)
    pairs = torch.stack([torch.remainder(wide, 16), torch.div(wide, 16, rounding_mode="floor")], dim=-1)
    return pairs.flatten(-2).to(torch.float32) - 8.0


def tile_codes(q: Tensor, group: int) -> Tensor:
    """Codes ``q`` ``[in, out]`` (uint8 int4 values 0..15, or int8) in the tiled layout of ``hm_export::qlinear``
    (kernels/qmatmul.h): ``[in / group, chunks, group * 16]`` of the same dtype, with chunks of 32 columns (int4) or
    16 (int8).  In group ``G``'s chunk ``ch``, byte ``64 k + 4 j + r`` holds row ``G * group + 4 k + r``'s code of
    column ``ch * chunk + j`` (int4: in its low nibble, and that of column ``32 ch + 16 + j`` in its high nibble);
    columns past ``out`` hold code 0."""
    rows, cols = q.shape
    if group % 4 or rows % group:
        raise UsageError(f"tiled codes need groups of a multiple of 4 rows dividing {rows}, got a group of {group}")
    int4 = q.dtype == torch.uint8
    width = 32 if int4 else 16
    chunks = -(-cols // width)
    padded = q.new_zeros(rows, chunks * width)
    padded[:, :cols] = q
    parts = padded.view(rows // group, group // 4, 4, chunks, width // 16, 16)  # [G, quad, r, ch, half, j]
    joined = parts[:, :, :, :, 0] + parts[:, :, :, :, 1] * 16 if int4 else parts[:, :, :, :, 0]  # [G, quad, r, ch, j]
    return joined.permute(0, 3, 1, 4, 2).reshape(rows // group, chunks, group * 16).contiguous()


def untile_codes(codes: Tensor, cols: int) -> Tensor:
    """The codes ``[in, cols]`` of a tiled table (:func:`tile_codes`): uint8 int4 values 0..15, or int8."""
    groups, chunks, per_chunk = codes.shape
    group = per_chunk // 16
    if codes.dtype == torch.int8:
        quads = codes.view(groups, chunks, group // 4, 16, 4)  # [G, ch, quad, j, r]
        return quads.permute(0, 2, 4, 1, 3).reshape(groups * group, chunks * 16)[:, :cols].contiguous()
    wide = codes.to(torch.int32).view(groups, chunks, group // 4, 16, 4)
    halves = torch.stack((torch.remainder(wide, 16), torch.div(wide, 16, rounding_mode="floor")), dim=3)
    return halves.permute(0, 2, 5, 1, 3, 4).reshape(groups * group, chunks * 32)[:, :cols].to(torch.uint8)


def tiled_columns(codes: Tensor, ids: Tensor) -> Tensor:
    """Columns ``ids`` (int64 ``[N]``) of a tiled table as ``[in, N]`` codes, ``untile_codes(codes, cols)[:, ids]``
    without untiling the other columns (a lookup reads one column of a vocabulary-wide table)."""
    groups, _, per_chunk = codes.shape
    group, int4 = per_chunk // 16, codes.dtype == torch.uint8
    chunk, j = torch.div(ids, 32 if int4 else 16, rounding_mode="floor"), torch.remainder(ids, 32 if int4 else 16)
    quads, rows = torch.arange(group // 4)[:, None, None], torch.arange(4)[None, :, None]
    picked = codes[:, chunk[None, None, :], quads * 64 + 4 * torch.remainder(j, 16)[None, None, :] + rows]
    column = picked.reshape(groups * group, ids.numel())  # [G, quad, r, N]: row G * group + 4 quad + r
    if not int4:
        return column
    wide = column.to(torch.int32)
    nibble = torch.where(j >= 16, torch.div(wide, 16, rounding_mode="floor"), torch.remainder(wide, 16))
    return nibble.to(torch.uint8)


def column_codes(q: Tensor) -> Tensor:
    """Codes ``q`` ``[out, in]`` (uint8 int4 values 0..15, or int8) in the by-column layout of a lookup table: int8
    as they are; int4 two per byte, input ``2i`` in the low nibble and ``2i + 1`` in the high one, uint8 ``[out, in
    / 2]``."""
    if q.dtype == torch.int8:
        return q.contiguous()
    if q.shape[1] % 2:
        raise UsageError(f"int4 codes by column pack two inputs per byte: {q.shape[1]} inputs is odd")
    return (q[:, 0::2] + q[:, 1::2] * 16).contiguous()


def dequantize(codes: Tensor, scales: Tensor) -> Tensor:
    """Float32 ``[1, rows, cols]`` of a quantized slot matrix (int8 codes, or uint8 packed int4 codes)."""
    values = unpack_int4(codes) if codes.dtype == torch.uint8 else codes.to(torch.float32)
    group = values.shape[1] // scales.shape[1]
    return values * scales.to(torch.float32).repeat_interleave(group, dim=1)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8 quantization of float32 ``[..., n]``: (codes as float32 in -127..127, scales
    ``[..., 1]`` = ``max|x| / 127``, 0 for an all-zero row); codes = round-half-even(x * (127 / max|x|))."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    safe = torch.where(amax == 0, torch.ones_like(amax), amax)
    codes = torch.where(amax == 0, torch.zeros_like(x), torch.round(x * (127.0 / safe)))
    return codes, amax / 127.0


def quantize_groups(x: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """:func:`quantize_rows` per ``group`` consecutive values of each row of ``[T, n]``: (codes ``[T, n]``, scales
    ``[T, n / group]``), the activations of ``hm_export::qlinear`` (one scale per token and weight group)."""
    codes, scales = quantize_rows(x.reshape(x.shape[0], -1, group))
    return codes.reshape(x.shape), scales[..., 0]


def qmatmul_reference(xq: Tensor, xs: Tensor, codes: Tensor, scales: Tensor, mins: Tensor | None = None) -> Tensor:
    """``[T, cols]`` = int8 rows ``xq [T, rows]`` (float32 codes, scales ``xs [T, 1]``, or ``[T, rows / g]``: one
    per token and group) times a quantized matrix
    (``codes [1, rows, cols or cols / 2]``, or tiled ``[1, rows / g, chunks, g * 16]``; float16
    ``scales [1, rows / g, cols]``), as the kernels compute it:
    each group's sum exact, then ``out = out + float(sum) * (scale * xs)`` group after group in float32.  With
    ``mins`` (float16, shaped as ``scales``) the int4 codes are asymmetric (``q`` = the nibble, ``w = scale * q +
    min``) and each group's term gains ``min * (xs * float(sum of the group's xq))`` before it is added."""
    if codes.dim() == 4:  # tiled: the codes (int4: the nibbles, less the symmetric offset)
        values = untile_codes(codes[0], scales.shape[2]).to(torch.float32)
        if codes.dtype == torch.uint8 and mins is None:
            values = values - 8.0
    else:
        values = unpack_int4(codes[0]) if codes.dtype == torch.uint8 else codes[0].to(torch.float32)
        if mins is not None:
            values = values + 8.0  # the nibble itself
    groups = scales.shape[1]
    rows, cols = values.shape
    # Every product and partial sum is an integer below 2^24 when a group has at most 1024 rows (1024 * 127 * 128),
    # so float32 sums are exact in any order; larger groups sum in float64 (exact), then round once (< 2^24 too).
    exact = torch.float32 if rows // groups <= 1024 else torch.float64
    grouped = xq.to(exact).view(-1, groups, rows // groups)
    sums = torch.einsum("tgi,gic->tgc", grouped, values.to(exact).view(groups, -1, cols)).float()
    terms = sums * (scales[0].float()[None] * xs[:, :, None])  # [T, groups, cols]: the same float ops per element
    if mins is not None:
        factor = xs * grouped.sum(-1).float()  # [T, groups]: xs * the group's activation sum (exact)
        terms = terms + mins[0].float()[None] * factor[:, :, None]
    out = torch.zeros(xq.shape[0], cols)
    for group in range(groups):  # added group after group, as the kernels do
        out = out + terms[:, group]
    return out


def check_table(op: str, codes: Tensor, scales: Tensor, mins: Tensor) -> int:
    """The input width of a ``qlinear`` / ``qembedding`` table; raise UsageError naming the operand that breaks its
    layout."""
    int4 = codes.dtype == torch.uint8
    if codes.dtype not in (torch.uint8, torch.int8) or codes.dim() != 3:
        raise UsageError(
            f"{op}: codes must be tiled, uint8 [in / g, ceil(out / 32), g * 16] (int4) or int8 [in / g, ceil(out / "
            f"16), g * 16], got {codes.dtype} {list(codes.shape)} (a bundle exported before the tiled layout: export "
            "it again)"
        )
    if scales.dtype != torch.float16 or scales.dim() != 2:
        raise UsageError(f"{op}: scales {scales.dtype} {list(scales.shape)}, expected float16 [in / g, out]")
    cols, width = scales.shape[1], 32 if int4 else 16
    groups, chunks, per_chunk = codes.shape
    if not groups:
        raise UsageError(f"{op}: codes {list(codes.shape)} hold no row group")
    if groups != scales.shape[0] or chunks != -(-cols // width) or per_chunk % 64 or not per_chunk:
        raise UsageError(
            f"{op}: tiled codes {list(codes.shape)} do not fit scales {list(scales.shape)}: expected "
            f"[{scales.shape[0]}, {-(-cols // width)}, g * 16] with g a multiple of 4"
        )
    if int4 and (mins.dtype != torch.float16 or mins.shape != scales.shape):
        raise UsageError(f"{op}: mins {mins.dtype} {list(mins.shape)} must match scales {list(scales.shape)}")
    if not int4 and (mins.numel() or mins.dtype != torch.float16):
        raise UsageError(f"{op}: int8 codes take no mins (an empty float16 tensor), got {list(mins.shape)}")
    return groups * (per_chunk // 16)


def check_lookup_table(op: str, codes: Tensor, scales: Tensor, mins: Tensor) -> tuple[int, int]:
    """``(in, out)`` of a table a lookup reads: tiled (:func:`check_table`) or by column (``codes`` 2-D, see the
    module docstring); raise UsageError naming the operand that breaks its layout."""
    if codes.dim() != 2:
        return check_table(op, codes, scales, mins), scales.shape[-1]
    int4 = codes.dtype == torch.uint8
    if codes.dtype not in (torch.uint8, torch.int8):
        raise UsageError(f"{op}: codes by column must be int8 [out, in] or uint8 [out, in / 2], got {codes.dtype}")
    width, cols = codes.shape[1] * (2 if int4 else 1), codes.shape[0]
    if scales.dtype != torch.float16 or scales.dim() != 2 or scales.shape[0] != cols or not scales.shape[1]:
        raise UsageError(f"{op}: scales {scales.dtype} {list(scales.shape)}, expected float16 [{cols}, in / g]")
    if not width or width % scales.shape[1]:
        raise UsageError(f"{op}: codes {list(codes.shape)} do not split into the {scales.shape[1]} groups of scales")
    if int4 and (mins.dtype != torch.float16 or mins.shape != scales.shape):
        raise UsageError(f"{op}: mins {mins.dtype} {list(mins.shape)} must match scales {list(scales.shape)}")
    if not int4 and (mins.numel() or mins.dtype != torch.float16):
        raise UsageError(f"{op}: int8 codes take no mins (an empty float16 tensor), got {list(mins.shape)}")
    return width, cols


def qlinear_reference(x: Tensor, codes: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    """What ``hm_export::qlinear`` computes (see the module docstring)."""
    width = check_table("qlinear", codes, scales, mins)
    if x.dtype != torch.float32 or x.shape[-1] != width:
        raise UsageError(f"qlinear: x must be float32 [..., {width}], got {x.dtype} {list(x.shape)}")
    rows = x.reshape(-1, x.shape[-1])
    low = mins[None] if codes.dtype == torch.uint8 else None
    out = qmatmul_reference(*quantize_groups(rows, width // scales.shape[0]), codes[None], scales[None], low)
    return out.view(*x.shape[:-1], out.shape[-1])


def qembedding_reference(tokens: Tensor, codes: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    """What ``hm_export::qembedding`` computes: ``[..., in]`` = the columns ``tokens``, ``scale * q (+ min)``."""
    width, _ = check_lookup_table("qembedding", codes, scales, mins)
    ids = tokens.reshape(-1)
    if codes.dim() == 2:  # by column: token v's codes, scales and mins are row v
        rows = codes[ids]  # int4: unpack_int4's codes less its offset, the asymmetric grid's 0..15
        q = rows.float() if rows.dtype == torch.int8 else unpack_int4(rows) + 8.0
        scale = scales[ids].float()
        low = mins[ids].float() if mins.numel() else None
    else:
        q, scale = tiled_columns(codes, ids).float().t(), scales[:, ids].float().t()
        low = mins[:, ids].float().t() if mins.numel() else None
    group = width // scale.shape[1]
    values = scale.repeat_interleave(group, dim=1) * q  # [N, in]
    if low is not None:
        values = values + low.repeat_interleave(group, dim=1)
    return values.reshape(*tokens.shape, width)


def screened_head_reference(
    x: Tensor,
    codes: Tensor,
    scales: Tensor,
    mins: Tensor,
    exact_codes: Tensor,
    exact_scales: Tensor,
    exact_mins: Tensor,
    top: int,
) -> Tensor:
    """What ``hm_export::screened_head`` computes (see the module docstring)."""
    width, cols = check_lookup_table("screened_head", exact_codes, exact_scales, exact_mins)
    screen_width = check_table("screened_head", codes, scales, mins)
    if (screen_width, scales.shape[1]) != (width, cols):
        raise UsageError(
            f"screened_head: the screen [{screen_width}, {scales.shape[1]}] and the exact table [{width}, {cols}] "
            "must have one shape"
        )
    if not 1 <= top <= scales.shape[1]:
        raise UsageError(f"screened_head: top must be in [1, {scales.shape[1]}], got {top}")
    logits = qlinear_reference(x, codes, scales, mins)
    chosen = torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :top]  # ties: the lower column
    columns = qembedding_reference(chosen, exact_codes, exact_scales, exact_mins)  # [..., top, in]
    exact = (columns.double() * x.double().unsqueeze(-2)).sum(-1).float()
    return logits.scatter(-1, chosen, exact)


def memory_swiglu_reference(
    x: Tensor, gate_up: Tensor, gate_up_scales: Tensor, down: Tensor, down_scales: Tensor
) -> Tensor:
    """What the op computes: int8 ``x`` times ``gate_up``, SiLU gate, int8 ``h`` times ``down``."""
    check_operands(x, gate_up, gate_up_scales, down, down_scales)
    rows = x.reshape(-1, x.shape[-1])
    hidden = qmatmul_reference(*quantize_rows(rows), gate_up, gate_up_scales)
    width = hidden.shape[-1] // 2
    h = F.silu(hidden[:, :width]) * hidden[:, width:]
    return qmatmul_reference(*quantize_rows(h), down, down_scales).view(x.shape)


def check_operands(x: Tensor, gate_up: Tensor, gate_up_scales: Tensor, down: Tensor, down_scales: Tensor) -> None:
    """Raise ValueError naming the operand whose dtype or shape breaks the layout in the module docstring."""
    if x.dtype != torch.float32 or x.dim() != 3:
        raise UsageError(f"memory_swiglu: x must be float32 [B, T, d], got {x.dtype} {list(x.shape)}")
    if gate_up.dtype != down.dtype or gate_up.dtype not in (torch.int8, torch.uint8):
        raise UsageError(
            f"memory_swiglu: codes must both be int8 or both uint8 (int4), got {gate_up.dtype}, {down.dtype}"
        )
    d, width = x.shape[-1], down.shape[1]
    pack = 2 if gate_up.dtype == torch.uint8 else 1
    for name, codes, scales, rows, cols in (
        ("gate_up", gate_up, gate_up_scales, d, 2 * width),
        ("down", down, down_scales, width, d),
    ):
        if tuple(codes.shape) != (1, rows, cols // pack) or cols % pack:
            raise UsageError(f"memory_swiglu: {name} codes {list(codes.shape)}, expected [1, {rows}, {cols // pack}]")
        if scales.dtype != torch.float16 or scales.dim() != 3 or scales.shape[2] != cols or rows % scales.shape[1]:
            raise UsageError(
                f"memory_swiglu: {name} scales {scales.dtype} {list(scales.shape)}, "
                f"expected float16 [1, {rows} / g, {cols}]"
            )


@torch.library.impl(_lib, "memory_swiglu", "CompositeExplicitAutograd")
def _memory_swiglu(x: Tensor, gate_up: Tensor, gate_up_scales: Tensor, down: Tensor, down_scales: Tensor) -> Tensor:
    return memory_swiglu_reference(x, gate_up, gate_up_scales, down, down_scales)


@torch.library.impl(_lib, "memory_swiglu.out", "CompositeExplicitAutograd")
def _memory_swiglu_out(
    x: Tensor, gate_up: Tensor, gate_up_scales: Tensor, down: Tensor, down_scales: Tensor, *, out: Tensor
) -> Tensor:
    out.resize_(x.shape).copy_(memory_swiglu_reference(x, gate_up, gate_up_scales, down, down_scales))
    return out


@torch.library.register_fake(f"{NAMESPACE}::memory_swiglu")
def _memory_swiglu_fake(
    x: Tensor, gate_up: Tensor, gate_up_scales: Tensor, down: Tensor, down_scales: Tensor
) -> Tensor:
    return torch.empty_like(x)


def memory_swiglu(x: Tensor, gate_up: Tensor, gate_up_scales: Tensor, down: Tensor, down_scales: Tensor) -> Tensor:
    """The memory SwiGLU of a quantized slot (see the module docstring); traced as one op."""
    return torch.ops.hm_export.memory_swiglu(x, gate_up, gate_up_scales, down, down_scales)


def attend_cache_reference(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, scale: float, window: int
) -> Tensor:
    """What ``attend_cache`` computes (see the module docstring); writes the caches in place."""
    heads, seq = q.shape[1:3]
    kv_heads, length = k_cache.shape[:2]
    pos = int(input_pos.reshape(-1)[0])
    if not (q.shape[0] == k.shape[0] == 1 and k.shape[1] == kv_heads and heads % kv_heads == 0):
        raise ValueError(f"attend_cache: q {list(q.shape)}, k {list(k.shape)} and cache {list(k_cache.shape)} disagree")
    if not 0 <= pos <= length - seq:
        raise ValueError(f"attend_cache: positions {pos} .. {pos + seq - 1} are outside the cache of {length}")
    k_cache[:, pos : pos + seq] = k[0]  # a float16 cache rounds to nearest even here
    v_cache[:, pos : pos + seq] = v[0]
    filled = pos + seq
    keys = k_cache[:, :filled].to(q.dtype).repeat_interleave(heads // kv_heads, dim=0)  # [Hq, filled, D]
    values = v_cache[:, :filled].to(q.dtype).repeat_interleave(heads // kv_heads, dim=0)
    query_pos = torch.arange(pos, filled).unsqueeze(1)
    key_pos = torch.arange(filled).unsqueeze(0)
    allowed = key_pos <= query_pos
    if window > 0:
        allowed &= query_pos - key_pos < window
    scores = torch.matmul(q[0], keys.transpose(1, 2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), values)  # [Hq, S, D]
    return out.transpose(0, 1).unsqueeze(0).contiguous()


@torch.library.impl(_lib, "attend_cache", "CompositeExplicitAutograd")
def _attend_cache(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, scale: float, window: int
) -> Tensor:
    return attend_cache_reference(q, k, v, k_cache, v_cache, input_pos, scale, window)


@torch.library.impl(_lib, "attend_cache.out", "CompositeExplicitAutograd")
def _attend_cache_out(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    input_pos: Tensor,
    scale: float,
    window: int,
    *,
    out: Tensor,
) -> Tensor:
    result = attend_cache_reference(q, k, v, k_cache, v_cache, input_pos, scale, window)
    out.resize_(result.shape).copy_(result)
    return out


@torch.library.register_fake(f"{NAMESPACE}::attend_cache")
def _attend_cache_fake(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, scale: float, window: int
) -> Tensor:
    return q.new_empty((1, q.shape[2], q.shape[1], q.shape[3]))


@torch.library.impl(_lib, "tied_head", "CompositeExplicitAutograd")
def _tied_head(h: Tensor, weight: Tensor) -> Tensor:
    return F.linear(h, weight)


@torch.library.impl(_lib, "tied_head.out", "CompositeExplicitAutograd")
def _tied_head_out(h: Tensor, weight: Tensor, *, out: Tensor) -> Tensor:
    result = F.linear(h, weight)
    out.resize_(result.shape).copy_(result)
    return out


@torch.library.register_fake(f"{NAMESPACE}::tied_head")
def _tied_head_fake(h: Tensor, weight: Tensor) -> Tensor:
    return h.new_empty((*h.shape[:-1], weight.shape[0]))


def _register_op(name: str, reference: Callable[..., Tensor], fake: Callable[..., Tensor]) -> None:
    """Register ``hm_export::name`` and its out variant, both computed by ``reference(*operands)``, and its fake
    kernel (the ops over ``qlinear`` / ``qembedding`` tables)."""

    def out_variant(*operands: Any, out: Tensor) -> Tensor:
        result = reference(*operands)
        out.resize_(result.shape).copy_(result)
        return out

    torch.library.impl(_lib, name, "CompositeExplicitAutograd")(reference)
    torch.library.impl(_lib, f"{name}.out", "CompositeExplicitAutograd")(out_variant)
    torch.library.register_fake(f"{NAMESPACE}::{name}")(fake)


_register_op("qlinear", qlinear_reference, lambda x, codes, scales, mins: x.new_empty((*x.shape[:-1], scales.shape[1])))
_register_op(
    "qembedding",
    qembedding_reference,
    lambda tokens, codes, scales, mins: scales.new_empty(
        (*tokens.shape, check_lookup_table("qembedding", codes, scales, mins)[0]), dtype=torch.float32
    ),
)


_register_op(
    "screened_head",
    screened_head_reference,
    lambda x, codes, scales, *exact: x.new_empty((*x.shape[:-1], scales.shape[1])),
)


def qlinear(x: Tensor, codes: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    """An asymmetric int4 linear (see the module docstring); traced as one op."""
    return torch.ops.hm_export.qlinear(x, codes, scales, mins)


def qembedding(tokens: Tensor, codes: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    """A lookup in an asymmetric int4 table (see the module docstring); traced as one op."""
    return torch.ops.hm_export.qembedding(tokens, codes, scales, mins)


Table = tuple[Tensor, Tensor, Tensor]  # a qlinear / qembedding table: (codes, scales, mins)


def screened_head(x: Tensor, screen: Table, exact: Table, top: int) -> Tensor:
    """A head screened in one table and exact in another where it matters (see the module docstring); one op."""
    return torch.ops.hm_export.screened_head(x, *screen, *exact, top)


def tied_head(h: Tensor, weight: Tensor) -> Tensor:
    """``h @ weight^T`` from an embedding table (see the module docstring); traced as one op."""
    return torch.ops.hm_export.tied_head(h, weight)


def attend_cache(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, scale: float, window: int = 0
) -> Tensor:
    """One attention layer over a static KV cache (see the module docstring); traced as one op."""
    return torch.ops.hm_export.attend_cache(q, k, v, k_cache, v_cache, input_pos, scale, window)


class KernelBuildError(ExportError):
    """The C++ kernel library could not be configured, built or loaded."""


def default_build_dir() -> Path:
    """Where :func:`build_kernel_library` builds by default (``HM_EXPORT_KERNELS_BUILD`` overrides): one build per
    executorch installation, since the library must link the very ``libexecutorch.so`` the process loads."""
    override = os.environ.get("HM_EXPORT_KERNELS_BUILD")
    if override:
        return Path(override)
    installation = hashlib.sha256(str(executorch_cmake_dir()).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "hm-export" / f"kernels-build-{installation}"


def executorch_cmake_dir() -> Path:
    """The CMake package config shipped in the executorch wheel."""
    import executorch

    cmake_dir = Path(next(iter(executorch.__path__))) / "share" / "cmake"
    if not (cmake_dir / "executorch-config.cmake").is_file():
        raise KernelBuildError(f"{cmake_dir}: the executorch wheel has no CMake config (executorch-config.cmake)")
    return cmake_dir


def build_kernel_library(build_dir: Path | None = None, jobs: int = 2) -> Path:
    """Configure and build ``libhm_export_kernels.so`` from :data:`SOURCE_DIR` (incremental); return its path.

    Linux (the library is loaded with ``RTLD_GLOBAL`` next to the wheel's shared runtime); needs cmake >= 3.19
    and a C++17 compiler."""
    build_dir = Path(build_dir) if build_dir else default_build_dir()
    cmake = shutil.which("cmake")
    if cmake is None:
        raise KernelBuildError("cmake not found on PATH: it is needed to build the hm-export kernels")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    steps = [
        [
            cmake,
            "-S",
            str(SOURCE_DIR),
            "-B",
            str(build_dir),
            *generator,
            f"-DCMAKE_PREFIX_PATH={executorch_cmake_dir()}",
        ],
        [cmake, "--build", str(build_dir), "-j", str(jobs)],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode:
            raise KernelBuildError(
                f"{' '.join(step)} failed ({done.returncode}):\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
            )
    library = build_dir / LIBRARY_NAME
    if not library.is_file():
        raise KernelBuildError(f"the build finished without producing {library}")
    return library


_loaded: list[tuple[Path, ctypes.CDLL]] = []


def load_kernel_library(library: Path | None = None) -> Path | None:
    """Register the C++ kernels with the ExecuTorch runtime of this process, once; return the library loaded
    (None when the kernels were already registered by a library this module did not load).

    Loads the Python bindings first so that the library binds to their ``libexecutorch.so`` (one operator
    registry; registering an operator twice aborts the process, hence the once).  ``RTLD_GLOBAL`` so the
    runtime resolves the kernels' symbols.  ``library`` defaults to ``HM_EXPORT_KERNELS_LIB`` or a build in
    :func:`default_build_dir` (built on first use).
    """
    if _loaded:
        return _loaded[0][0]
    if registered_in_runtime():
        return None
    if library is None:
        override = os.environ.get("HM_EXPORT_KERNELS_LIB")
        library = Path(override) if override else build_kernel_library()
    library = Path(library).resolve()
    if not library.is_file():
        raise KernelBuildError(f"{library}: kernel library not found")
    try:
        _loaded.append((library, ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)))
    except OSError as exc:
        raise KernelBuildError(f"{library}: cannot load: {exc}") from exc
    missing = [op for op in OPERATORS if not registered_in_runtime(f"{NAMESPACE}::{op}")]
    if missing:
        raise KernelBuildError(f"{library}: loaded, but the ExecuTorch runtime has no kernel for {missing}")
    return library


def registered_in_runtime(operator: str = f"{NAMESPACE}::memory_swiglu.out") -> bool:
    """Whether the ExecuTorch runtime of this process has a kernel for ``operator``."""
    from executorch.extension.pybindings import portable_lib  # also loads libexecutorch.so, the registry

    return operator in portable_lib._get_operator_names()


__all__ = [
    "KernelBuildError",
    "build_kernel_library",
    "dequantize",
    "load_kernel_library",
    "memory_swiglu",
    "memory_swiglu_reference",
    "qembedding",
    "qembedding_reference",
    "qlinear",
    "qlinear_reference",
    "quantize_groups",
    "registered_in_runtime",
    "screened_head",
    "screened_head_reference",
    "unpack_int4",
]
