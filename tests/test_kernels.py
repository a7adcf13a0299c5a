"""The hm_export operators (fused memory SwiGLU, KV-cache attention), their C++ kernels and SIMD paths, the slot
strategies and bundles using them.

Tolerances: ``qmatmul`` (each int8-activation x int4/int8-weight product) is bit-exact on every path (scalar,
AVX2, NEON under qemu) against :func:`hm_export.kernels.qmatmul_reference`.  The whole memory SwiGLU quantizes
``h = silu(gate) * up`` to int8 between its two products; ``exp`` of another library may move one code of ``h``
by one step, so whole-op comparisons allow ``1e-5 * max|out|`` plus one such step (:func:`h_step_bound`).
Bundles are compared with the eager model on the memory the program computes with (``atol = 1e-4``).
"""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_checkpoint, tiny_config

from hm_export.bank import BankReader, write_bank
from hm_export.checkpoint import load_checkpoint
from hm_export.config import MemoryConfig
from hm_export.export import ExportRecipe, export_bundle
from hm_export.kernels import (
    SOURCE_DIR,
    attend_cache,
    build_kernel_library,
    load_kernel_library,
    memory_swiglu,
    qembedding,
    qlinear,
    qmatmul_reference,
    quantize_groups,
    quantize_rows,
    registered_in_runtime,
    screened_head,
    screened_head_reference,
    tile_codes,
)
from hm_export.kernels.strategies import SlotLayout, quantize
from hm_export.runtime_stubs.block_cache import SlotFiller
from hm_export.runtime_stubs.loader import BundleLoader
from hm_export.targets import EmitOptions


def random_operands(bits: int, d: int, width: int, gate_up_group: int, down_group: int, tokens: int, seed: int = 0):
    """x and random quantized slot tensors in the op's layout."""
    rng = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, d, generator=rng)
    pack = 2 if bits == 4 else 1

    def codes(rows: int, cols: int) -> torch.Tensor:
        if bits == 4:
            return torch.randint(0, 256, (1, rows, cols // pack), generator=rng, dtype=torch.uint8)
        return torch.randint(-127, 128, (1, rows, cols), generator=rng, dtype=torch.int8)

    def scales(rows: int, cols: int) -> torch.Tensor:
        return (torch.rand(1, rows, cols, generator=rng) * 0.02 + 0.001).half()

    return (
        x,
        codes(d, 2 * width),
        scales(d // gate_up_group, 2 * width),
        codes(width, d),
        scales(width // down_group, d),
    )


def numpy_dequantize(codes: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """Independent of the op's code: bit ops on numpy, per-row scale lookup."""
    raw = codes[0].numpy()
    if raw.dtype == np.uint8:
        values = np.stack([raw & 15, raw >> 4], axis=-1).reshape(raw.shape[0], -1).astype(np.float32) - 8
    else:
        values = raw.astype(np.float32)
    group = values.shape[0] // scales.shape[1]
    return values * scales[0].float().numpy()[np.arange(values.shape[0]) // group]


def numpy_int8_rows(x: np.ndarray) -> np.ndarray:
    """Per-row symmetric int8 fake quantization, independently of the op's code."""
    amax = np.abs(x).max(axis=-1, keepdims=True)
    scale = np.where(amax == 0, 1, amax / 127).astype(np.float32)
    return np.round(x / scale).clip(-127, 127) * scale


def dequantize_then_matmul(x, gate_up, gate_up_scales, down, down_scales) -> torch.Tensor:
    """The op's semantics from independent pieces: int8 rows, dequantized weights, float matmuls."""
    weights = numpy_dequantize(gate_up, gate_up_scales)
    width = weights.shape[1] // 2
    hidden = torch.from_numpy(numpy_int8_rows(x[0].numpy()) @ weights)
    h = (torch.nn.functional.silu(hidden[:, :width]) * hidden[:, width:]).numpy()
    return torch.from_numpy(numpy_int8_rows(h) @ numpy_dequantize(down, down_scales)).unsqueeze(0)


def h_step_bound(x, gate_up, gate_up_scales, down, down_scales) -> float:
    """``1e-5 * max|out|`` plus what one int8 step of ``h`` in one position can move the output."""
    weights = torch.from_numpy(numpy_dequantize(gate_up, gate_up_scales))
    width = weights.shape[1] // 2
    hidden = x[0] @ weights
    h = torch.nn.functional.silu(hidden[:, :width]) * hidden[:, width:]
    step = float(h.abs().max()) / 127
    out = dequantize_then_matmul(x, gate_up, gate_up_scales, down, down_scales)
    return 1e-5 * float(out.abs().max()) + 1.01 * step * float(np.abs(numpy_dequantize(down, down_scales)).max())


CASES = [  # bits, d, width, gate_up group, down group, tokens
    (4, 32, 12, 32, 4, 1),
    (4, 64, 24, 16, 8, 7),
    (4, 96, 72, 32, 8, 3),  # 64-column blocks and a narrow last block on the SIMD paths
    (8, 32, 12, 32, 4, 1),
    (8, 48, 20, 48, 10, 5),
]


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_independent_int8_activation_matmuls(case):
    operands = random_operands(*case)
    got = memory_swiglu(*operands)
    want = dequantize_then_matmul(*operands)
    torch.testing.assert_close(got, want, rtol=0, atol=h_step_bound(*operands))


def test_reference_rejects_bad_operands():
    x, gate_up, gate_up_scales, down, down_scales = random_operands(4, 32, 12, 32, 4, 1)
    with pytest.raises(ValueError, match="gate_up codes"):
        memory_swiglu(x, gate_up[:, :, :5], gate_up_scales, down, down_scales)
    with pytest.raises(ValueError, match="down scales"):
        memory_swiglu(x, gate_up, gate_up_scales, down, down_scales.float())
    with pytest.raises(ValueError, match="must both be int8 or both uint8"):
        memory_swiglu(x, gate_up, gate_up_scales, down.view(torch.int8), down_scales)


@pytest.mark.parametrize("storage", ["int8", "int4"])
def test_quantize_is_within_half_a_step(storage):
    weight = torch.randn(1, 64, 24)
    codes, scales = quantize(weight, 16, storage)
    restored = torch.from_numpy(numpy_dequantize(codes, scales))
    step = scales.float().repeat_interleave(16, dim=1)[0]
    assert bool(((restored - weight[0]).abs() <= step / 2 + 1e-6).all())


def test_int8_rows_round_half_to_even_and_keep_zero_rows():
    x = torch.tensor([[127.0, 0.5, 1.5, -2.5, -127.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    codes, scales = quantize_rows(x)
    assert codes[0].tolist() == [127, 0, 2, -2, -127] and scales[0].item() == 1.0
    assert codes[1].abs().sum() == 0 and scales[1].item() == 0


def attention_operands(heads: int, kv_heads: int, seq: int, length: int, dim: int, seed: int = 0):
    rng = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, seq, dim, generator=rng)
    k = torch.randn(1, kv_heads, seq, dim, generator=rng)
    v = torch.randn(1, kv_heads, seq, dim, generator=rng)
    caches = [torch.randn(kv_heads, length, dim, generator=rng) for _ in range(2)]  # stale values past the fill
    return q, k, v, caches


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [0, 3])
def test_attend_cache_reference_matches_masked_attention(window, cache_dtype):
    q, k, v, caches = attention_operands(4, 2, 3, 16, 8)
    k_cache, v_cache = (cache.to(cache_dtype) for cache in caches)
    pos = 5
    got = attend_cache(q, k, v, k_cache, v_cache, torch.tensor([pos]), 0.3, window)
    # written as the cache's dtype holds them: a float16 cache rounds to nearest even, as .half() does
    assert torch.equal(k_cache[:, pos : pos + 3], k[0].to(cache_dtype))
    assert torch.equal(v_cache[:, pos : pos + 3], v[0].to(cache_dtype))
    keys = k_cache.float().repeat_interleave(2, 0)  # whole cache, stale rows too
    values = v_cache.float().repeat_interleave(2, 0)
    scores = q[0] @ keys.transpose(1, 2) * 0.3
    query_pos, key_pos = torch.arange(pos, pos + 3)[:, None], torch.arange(16)[None, :]
    blocked = (key_pos > query_pos) | ((query_pos - key_pos >= window) if window else torch.zeros(1, dtype=torch.bool))
    want = torch.softmax(scores.masked_fill(blocked, float("-inf")), -1) @ values
    torch.testing.assert_close(got, want.transpose(0, 1).unsqueeze(0), rtol=0, atol=1e-6)
    if cache_dtype == torch.float16:  # the rounding is the only change: close to a float32 cache's result
        exact = attend_cache(q, k, v, *caches, torch.tensor([pos]), 0.3, window)
        torch.testing.assert_close(got, exact, rtol=0, atol=5e-3)


# --- the C++ kernel in the ExecuTorch runtime ----------------------------------------------------------


@pytest.fixture(scope="session")
def kernel_library(tmp_path_factory) -> Path:
    library = build_kernel_library(tmp_path_factory.mktemp("kernels-build"))
    # the library the process registered (an earlier test may have loaded the default build): opening another
    # copy with ctypes would register its ExecuTorch kernels twice, which aborts
    return load_kernel_library(library) or library


class OneMemoryLayer(torch.nn.Module):
    def forward(self, x, gate_up, gate_up_scales, down, down_scales):
        return memory_swiglu(x, gate_up, gate_up_scales, down, down_scales) + x


def lower_to_pte(module, operands, path: Path, dynamic=None) -> Path:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = torch.export.export(module, operands, dynamic_shapes=dynamic, strict=False)
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    path.write_bytes(edge.to_executorch().buffer)
    return path


@pytest.mark.slow
def test_kernel_library_registers_the_out_variants(kernel_library):
    assert registered_in_runtime("hm_export::memory_swiglu.out")
    assert registered_in_runtime("hm_export::attend_cache.out")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_cpp_kernel_matches_the_reference(kernel_library, tmp_path, case):
    from executorch.runtime import Runtime

    operands = random_operands(*case)
    pte = lower_to_pte(OneMemoryLayer(), operands, tmp_path / "op.pte")
    assert b"hm_export::memory_swiglu" in pte.read_bytes()  # the program calls the op (name and overload stored apart)
    method = Runtime.get().load_program(str(pte)).load_method("forward")
    got = method.execute(list(operands))[0]
    want = OneMemoryLayer()(*operands)
    torch.testing.assert_close(got, want, rtol=0, atol=h_step_bound(*operands))


@pytest.mark.slow
def test_cpp_kernel_follows_a_dynamic_token_count(kernel_library, tmp_path):
    from executorch.runtime import Runtime

    operands = random_operands(4, 32, 12, 32, 4, 3)
    dynamic = ({1: torch.export.Dim("n", min=1, max=16)}, None, None, None, None)
    pte = lower_to_pte(OneMemoryLayer(), operands, tmp_path / "dyn.pte", dynamic)
    method = Runtime.get().load_program(str(pte)).load_method("forward")
    for tokens in (1, 9):
        resized = (torch.randn(1, tokens, 32), *operands[1:])
        want = OneMemoryLayer()(*resized)
        got = method.execute(list(resized))[0]
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=h_step_bound(*resized))


class GridLayer(torch.nn.Module):
    """A lookup and a product over one asymmetric int4 / int8 table, as the ``-asym`` anchors call them."""

    def forward(self, tokens, x, codes, scales, mins):
        return qembedding(tokens, codes, scales, mins), qlinear(x, codes, scales, mins)


@pytest.mark.slow
@pytest.mark.parametrize(("bits", "threads"), [(4, 1), (8, 1), (4, 2), (8, 2)])
def test_cpp_grid_ops_match_the_reference_bit_for_bit(kernel_library, tmp_path, bits, threads):
    from executorch.runtime import Runtime

    from hm_export.anchor_quant import GridLinear, WeightQuant
    from hm_export.bench import set_threads

    # 200 outputs: one 128-column AVX-512 block and a 72-column AVX2 tail (int4); input 96 = three groups of 32.
    # 2 threads: 520 outputs, enough work for qlinear to split its columns (5 blocks of 128, the last of 8 columns)
    outputs = 200 if threads == 1 else 520
    quant = WeightQuant(4, 32, asymmetric=True) if bits == 4 else WeightQuant(8, 32)
    table = GridLinear(torch.randn(outputs, 96), quant)
    operands = (torch.tensor([[0, 199, 7, 120]]), torch.randn(1, 3, 96) * 2, table.codes, table.scales, table.mins)
    pte = lower_to_pte(GridLayer(), operands, tmp_path / "grid.pte")
    set_threads(threads)  # ExecuTorch's threadpool: XNNPACK's threads and qlinear's
    try:
        got = Runtime.get().load_program(str(pte)).load_method("forward").execute(list(operands))
    finally:
        set_threads(1)
    want = GridLayer()(*operands)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


class Lookup(torch.nn.Module):
    def forward(self, tokens, codes, scales, mins):
        return qembedding(tokens, codes, scales, mins)


def lookup_tables(bits: int, outputs: int = 200, seed: int = 0):
    """One embedding [outputs, 96] as a tiled table (a head's) and as a table by column (lookups only)."""
    from hm_export.anchor_quant import GridLinear, LookupTable, WeightQuant

    weight = torch.randn(outputs, 96, generator=torch.Generator().manual_seed(seed))
    quant = WeightQuant(4, 32, asymmetric=True) if bits == 4 else WeightQuant(8, 32)
    return GridLinear(weight, quant), LookupTable(weight, quant)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_table_by_column_looks_up_what_the_tiled_table_holds(bits):
    tiled, by_column = lookup_tables(bits)
    assert by_column.codes.shape == ((200, 48) if bits == 4 else (200, 96)) and by_column.scales.shape == (200, 3)
    tokens = torch.tensor([[0, 199, 7], [120, 7, 31]])
    want = qembedding(tokens, tiled.codes, tiled.scales, tiled.mins)
    assert torch.equal(qembedding(tokens, by_column.codes, by_column.scales, by_column.mins), want)
    assert torch.equal(want, tiled.dequantized()[tokens])
    with pytest.raises(ValueError, match="qlinear: codes must be tiled"):
        qlinear(torch.randn(1, 96), by_column.codes, by_column.scales, by_column.mins)
    with pytest.raises(ValueError, match=r"scales .* expected float16 \[200, in / g\]"):
        qembedding(tokens, by_column.codes, by_column.scales[:100], by_column.mins)
    with pytest.raises(ValueError, match="do not split into the 5 groups"):
        qembedding(tokens, by_column.codes, torch.zeros(200, 5, dtype=torch.float16), torch.empty(0))


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_cpp_lookup_by_column_matches_the_reference_bit_for_bit(kernel_library, tmp_path, bits):
    from executorch.runtime import Runtime

    _, table = lookup_tables(bits)
    operands = (torch.tensor([[0, 199, 7, 120]]), table.codes, table.scales, table.mins)
    pte = lower_to_pte(Lookup(), operands, tmp_path / "lookup.pte")
    got = Runtime.get().load_program(str(pte)).load_method("forward").execute(list(operands))[0]
    assert torch.equal(got, Lookup()(*operands))


class ScreenedHead(torch.nn.Module):
    def __init__(self, top: int) -> None:
        super().__init__()
        self.top = top

    def forward(self, x, codes, scales, mins, exact_codes, exact_scales, exact_mins):
        return screened_head(x, (codes, scales, mins), (exact_codes, exact_scales, exact_mins), self.top)


def screened_operands(outputs: int, seed: int = 0, by_column: bool = False):
    """A head [outputs, 96] as its asymmetric int4 screen and its int8 table (tiled, or by column as the
    ``-screen64`` preset stores it); 4 tokens, the third all zeros (every screen logit 0: the tie rule picks the
    lowest columns)."""
    from hm_export.anchor_quant import GridLinear, LookupTable, WeightQuant

    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(outputs, 96, generator=generator)
    screen = GridLinear(weight, WeightQuant(4, 32, asymmetric=True))
    exact = (LookupTable if by_column else GridLinear)(weight, WeightQuant(8, 32))
    x = torch.randn(1, 4, 96, generator=generator) * 2
    x[0, 2] = 0
    operands = (x, screen.codes, screen.scales, screen.mins, exact.codes, exact.scales, exact.mins)
    return operands, None if by_column else exact.dequantized()


def test_screened_head_reference_recomputes_the_top_columns_from_the_exact_table():
    operands, exact_weight = screened_operands(100)
    top = 9
    got = screened_head_reference(*operands, top)
    screen = qlinear(*operands[:4])
    chosen = torch.sort(screen, dim=-1, descending=True, stable=True).indices[..., :top]
    exact = operands[0] @ exact_weight.t()
    torch.testing.assert_close(got.gather(-1, chosen), exact.gather(-1, chosen), rtol=1e-6, atol=1e-5)
    kept = torch.ones_like(got, dtype=torch.bool).scatter(-1, chosen, False)
    assert torch.equal(got[kept], screen[kept])  # the other columns: the screen's values
    assert torch.equal(chosen[0, 2], torch.arange(top))  # all ties: the lowest columns
    assert (got[0, 2] == 0).all()
    with pytest.raises(ValueError, match="top must be in \\[1, 100\\], got 101"):
        screened_head_reference(*operands, 101)
    with pytest.raises(ValueError, match="must have one shape"):
        screened_head_reference(*operands[:4], *screened_operands(64)[0][4:], top)
    assert torch.equal(screened_head_reference(*screened_operands(100, by_column=True)[0], top), got)


@pytest.mark.slow
@pytest.mark.parametrize(("threads", "by_column"), [(1, False), (2, False), (1, True)])
def test_cpp_screened_head_matches_the_reference_bit_for_bit(kernel_library, tmp_path, threads, by_column):
    from executorch.runtime import Runtime

    from hm_export.bench import set_threads

    operands, _ = screened_operands(520, by_column=by_column)  # 520 columns: qlinear splits them over 2 threads
    module = ScreenedHead(top=17)
    pte = lower_to_pte(module, operands, tmp_path / "screened.pte")
    set_threads(threads)
    try:
        got = Runtime.get().load_program(str(pte)).load_method("forward").execute(list(operands))[0]
    finally:
        set_threads(1)
    want = module(*operands)
    assert torch.equal(got, want)
    assert int((want != qlinear(*operands[:4])).sum()) >= 3 * 17 - 3  # the top columns of 3 tokens were recomputed


# One quantized product per path through the library's C entry point (0 scalar, 1 AVX2, 3 AVX-512, 4 AVX-512 VNNI), or
# the NEON path of the same source cross-compiled for AArch64 and run under qemu (tests/native/qmatmul_harness.cpp).
QMATMUL_CASES = [  # storage, rows, cols, group, tokens
    ("int4", 576, 288, 32, 1),  # SmolLM2's gate_up: 64-column blocks (AVX2) or two 128-column ones + AVX2 tail
    ("int4", 144, 576, 16, 3),
    ("int4", 30, 50, 15, 4),  # odd group (a row without a partner), narrow block
    ("int8", 48, 40, 48, 5),
    ("int8", 20, 24, 5, 3),
    ("int8", 64, 72, 32, 1),  # AVX-512: two 32-column blocks + an 8-column AVX2 tail, one token (decode)
    ("int8", 64, 100, 32, 3),  # three blocks + a narrow tail, several tokens (the tile)
    ("asym4", 576, 200, 32, 1),  # asymmetric int4 (Q4_1 grid): one 128-column block + a 72-column AVX2 tail
    ("asym4", 96, 384, 32, 5),
    ("asym4", 45, 22, 15, 3),  # odd group, narrow block
    # tiled asymmetric int4 (hm_export::qlinear's tables): VNNI takes 4 chunks of 32 columns at a time, AVX2 2
    ("tiled4", 576, 576, 32, 1),  # SmolLM2's q_proj: 4 + 4 + 4 + 4 + 2 chunks, one token (decode)
    ("tiled4", 576, 200, 32, 1),  # a last chunk of 8 columns
    ("tiled4", 96, 1536, 32, 5),  # several tokens (prefill)
    ("tiled4", 36, 50, 12, 3),  # a group of 12 rows (3 quads), odd width
    ("tiled4", 64, 200, 32, 6),  # 4 + 2 tokens over a block of 4 chunks and 3 single ones, the last of 8 columns
    ("tiled4", 128, 64, 64, 2),  # a group of 16 quads: AVX2 widens its int16 sums twice
    ("tiled4-max", 72, 96, 36, 2),  # every code 15, every activation 127: the int16 sums at their largest (9 quads)
    # one token (VNNI decode: every row group per block of chunks, blocks of 4, 2, 1, then a narrow last chunk)
    ("tiled4", 64, 240, 32, 1),  # 4 + 2 + 1 full chunks + a last one of 16 columns (its high half empty)
    ("tiled4", 36, 50, 12, 1),  # three row groups, a last chunk of 18 columns
    ("tiled4", 32, 100, 32, 1),  # one row group
    ("tiled4-max", 72, 96, 36, 1),  # the largest integer sums, one token
    ("tiled4-sym", 64, 240, 32, 1),  # symmetric tiled int4 (code - 8, no mins), one scale per token
    ("tiled4-sym", 64, 200, 32, 5),
    # tiled int8 (Q8_0 tables): VNNI takes 8 chunks of 16 columns at a time, AVX2 4
    ("tiled8", 576, 1152, 32, 1),  # 72 chunks: 9 blocks of 8 (VNNI), 18 of 4 (AVX2), one token
    ("tiled8", 64, 200, 32, 1),  # 12 chunks + a last chunk of 8 columns
    ("tiled8", 96, 272, 32, 4),  # several tokens, a 17th chunk
    ("tiled8", 24, 30, 8, 3),  # a group of 8 rows (2 quads), a narrow last chunk
    ("tiled8", 24, 30, 8, 1),  # three row groups, one full chunk + a last one of 14 columns, one token
    ("tiled8", 32, 240, 32, 1),  # one row group, 8 + 4 + 2 + 1 chunks, one token
]


INT4_STORAGE = ("int4", "asym4", "tiled4", "tiled4-max", "tiled4-sym")


def qmatmul_problem(storage: str, rows: int, cols: int, group: int, tokens: int):
    """Codes, float16 scales and mins (None unless asymmetric), int8 activations and their scales (asymmetric: one
    per token and group, as hm_export::qlinear quantizes them; else one per token)."""
    mins, x = None, torch.randn(tokens, rows) * 3
    if storage in ("asym4", "tiled4", "tiled4-max"):  # random nibbles, float16 scales / mins of both signs (Q4_1)
        if storage == "tiled4-max":
            codes = tile_codes(torch.full((rows, cols), 15, dtype=torch.uint8), group)[None]
            x = torch.ones(tokens, rows)
        elif storage == "tiled4":
            codes = tile_codes(torch.randint(0, 16, (rows, cols), dtype=torch.uint8), group)[None]
        else:
            codes = torch.randint(0, 256, (1, rows, cols // 2), dtype=torch.uint8)
        scales = (torch.rand(1, rows // group, cols) * 0.05).half()
        mins = (torch.randn(1, rows // group, cols) * 0.2).half()
        xq, xs = quantize_groups(x, group)
    elif storage == "tiled4-sym":  # symmetric int4 (code - 8), tiled, one activation scale per token
        codes = tile_codes(torch.randint(0, 16, (rows, cols), dtype=torch.uint8), group)[None]
        scales = (torch.rand(1, rows // group, cols) * 0.05).half()
        xq, xs = quantize_rows(x)
    elif storage == "tiled8":  # Q8_0 codes (the -asym-e8 head), activations per token and group
        codes = tile_codes(torch.randint(-127, 128, (rows, cols), dtype=torch.int8), group)[None]
        scales = (torch.rand(1, rows // group, cols) * 0.05).half()
        xq, xs = quantize_groups(x, group)
    else:
        codes, scales = quantize(torch.randn(1, rows, cols), group, storage)
        xq, xs = quantize_rows(x)
    return codes, scales, mins, xq, xs


def padded_int8(xq: torch.Tensor) -> np.ndarray:
    rows = xq.shape[1]
    out = np.zeros((xq.shape[0], rows + rows % 2), np.int8)
    out[:, :rows] = xq.numpy().astype(np.int8)
    return out


def library_qmatmul(library: ctypes.CDLL, case, problem, isa: int, split: bool = False) -> np.ndarray | None:
    """out of one product through the C entry point on path ``isa`` (None: not run here); ``split``: columns split
    over the kernels' pool."""
    storage, rows, cols, group, tokens = case
    codes, scales, mins, xq, xs = problem
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    flag = ctypes.c_int
    library.hm_kernels_qmatmul.argtypes = [pointer, pointer, pointer, size, size, size, flag, flag, pointer, size,
                                           pointer, flag, size, pointer, flag, flag]  # fmt: skip
    code_bytes = np.ascontiguousarray(codes[0].numpy())
    scale_bits = np.ascontiguousarray(scales[0].numpy().view(np.uint16))
    min_bits = None if mins is None else np.ascontiguousarray(mins[0].numpy().view(np.uint16))
    xq_rows, xs_rows = padded_int8(xq), np.ascontiguousarray(xs.numpy().reshape(-1), np.float32)
    out = np.full((tokens, cols), np.nan, np.float32)  # every column must be written
    used = library.hm_kernels_qmatmul(
        code_bytes.ctypes.data, scale_bits.ctypes.data, None if min_bits is None else min_bits.ctypes.data, rows, cols,
        group, int(storage in INT4_STORAGE), int(storage.startswith("tiled")), xq_rows.ctypes.data, xq_rows.shape[1],
        xs_rows.ctypes.data, int(xs.shape[1] > 1), tokens, out.ctypes.data, isa, int(split),
    )  # fmt: skip
    return None if used < 0 else out


@pytest.mark.parametrize("case", QMATMUL_CASES)
@pytest.mark.parametrize("isa", [0, 1, 3, 4])
def test_qmatmul_paths_are_bit_exact(kernel_library, case, isa):
    codes, scales, mins, xq, xs = problem = qmatmul_problem(*case)
    out = library_qmatmul(ctypes.CDLL(str(kernel_library)), case, problem, isa)
    if out is None:
        pytest.skip(f"this CPU does not run path {isa}")
    assert torch.equal(torch.from_numpy(out), qmatmul_reference(xq, xs, codes, scales, mins))


SPLIT_CASES = [  # storage, rows, cols, group, tokens: split in blocks of 128 columns (4 int4 / 8 int8 chunks)
    ("tiled4", 576, 576, 32, 1),  # SmolLM2's q_proj: 5 blocks, the last of 64 columns
    ("tiled4", 576, 576, 32, 5),
    ("tiled4", 64, 200, 32, 1),  # 2 blocks, the last of 2 chunks and a narrow one (8 columns)
    ("tiled4", 64, 200, 32, 5),
    ("tiled4-sym", 64, 520, 32, 5),  # 5 blocks, a last block of 8 columns
    ("tiled8", 576, 300, 32, 1),  # 3 blocks, the last of 2 chunks and a narrow one (12 columns)
    ("tiled8", 576, 300, 32, 5),
    ("tiled8", 96, 1152, 32, 5),  # 9 full blocks
]


@pytest.mark.parametrize("case", SPLIT_CASES)
@pytest.mark.parametrize("isa", [0, 1, 3, 4])
def test_qmatmul_split_over_threads_has_the_bits_of_one_thread(kernel_library, case, isa):
    from hm_export.bench import set_threads  # ExecuTorch's threadpool, which the split runs on

    codes, scales, mins, xq, xs = problem = qmatmul_problem(*case)
    library = ctypes.CDLL(str(kernel_library))
    whole = library_qmatmul(library, case, problem, isa)
    if whole is None:
        pytest.skip(f"this CPU does not run path {isa}")
    assert torch.equal(torch.from_numpy(whole), qmatmul_reference(xq, xs, codes, scales, mins))
    try:
        for threads in (2, 3):
            set_threads(threads)
            for _ in range(2):  # the second split reuses the threads the first woke
                split = library_qmatmul(library, case, problem, isa, split=True)
                assert np.array_equal(split, whole), f"{threads} threads"
    finally:
        set_threads(1)


@pytest.fixture(scope="session", params=["armv8-a", "armv8.2-a+dotprod"])
def neon_harness(request, tmp_path_factory) -> Path:
    """The harness for plain ARMv8 NEON, and with the dot-product extension (the tiled paths' SDOT)."""
    compiler, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if compiler is None or qemu is None:
        pytest.skip("no AArch64 cross compiler and qemu-aarch64 (apt install g++-aarch64-linux-gnu qemu-user)")
    harness = tmp_path_factory.mktemp("neon") / "qmatmul_harness"
    source = Path(__file__).parent / "native" / "qmatmul_harness.cpp"
    subprocess.run(
        [compiler, "-std=c++17", "-O2", "-ffp-contract=off", f"-march={request.param}", "-static", f"-I{SOURCE_DIR}",
         str(source), "-o", str(harness)], check=True, capture_output=True,
    )  # fmt: skip
    return harness


@pytest.mark.parametrize("case", QMATMUL_CASES)
def test_qmatmul_neon_path_is_bit_exact_under_qemu(neon_harness, case):
    storage, rows, cols, group, tokens = case
    codes, scales, mins, xq, xs = qmatmul_problem(*case)
    flags = [
        int(storage in INT4_STORAGE),
        tokens,
        2,
        int(mins is not None),
        int(xs.shape[1] > 1),
        int(storage.startswith("tiled")),
    ]
    head = np.array([rows, cols, group, *flags], np.int64).tobytes()
    low = b"" if mins is None else mins[0].numpy().view(np.uint16).tobytes()
    body = codes[0].numpy().tobytes() + scales[0].numpy().view(np.uint16).tobytes() + low + padded_int8(xq).tobytes()
    stdin = head + body + xs.numpy().reshape(-1).astype(np.float32).tobytes()
    result = subprocess.run(["qemu-aarch64", str(neon_harness)], input=stdin, capture_output=True, check=True).stdout
    assert np.frombuffer(result[:8], np.int64)[0] == 2  # the NEON path ran
    out = torch.from_numpy(np.frombuffer(result[8:], np.float32).reshape(tokens, cols).copy())
    assert torch.equal(out, qmatmul_reference(xq, xs, codes, scales, mins))


class CacheAttention(torch.nn.Module):
    """One attention layer over cache buffers, as the decode programs call it."""

    def __init__(self, kv_heads: int, length: int, dim: int, window: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(kv_heads, length, dim, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(kv_heads, length, dim, dtype=dtype), persistent=False)
        self.window = window

    def forward(self, q, k, v, input_pos):
        return attend_cache(q, k, v, self.k_cache, self.v_cache, input_pos, q.shape[-1] ** -0.5, self.window)


# Groups of 3, 1 and 8 query heads per KV head; head dims of 8 (the x86 path's last columns only), 64 (two full
# 32-column blocks: SmolLM2's) and 40 (a block and a tail); 12 query heads on one KV head take the portable path.
# Caches in float16 (what the decode programs hold) and float32.
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(6, 2, 8), (9, 3, 64), (3, 3, 40), (8, 1, 40), (12, 1, 16)])
@pytest.mark.parametrize("window", [0, 4])
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.float32])
def test_cpp_attention_matches_the_reference_across_calls(
    kernel_library, tmp_path, window, heads, kv_heads, dim, cache_dtype
):
    from executorch.runtime import Runtime

    q, k, v, _ = attention_operands(heads, kv_heads, 5, 16, dim)
    dynamic = {"q": {2: torch.export.Dim("n", min=1, max=16)}}
    dynamic.update({"k": {2: dynamic["q"][2]}, "v": {2: dynamic["q"][2]}, "input_pos": None})
    eager = CacheAttention(kv_heads, 16, dim, window, cache_dtype)
    pte = lower_to_pte(
        CacheAttention(kv_heads, 16, dim, window, cache_dtype),
        (q, k, v, torch.tensor([0])),
        tmp_path / "a.pte",
        dynamic,
    )
    method = Runtime.get().load_program(str(pte)).load_method("forward")
    position = 0
    for seq in (5, 1, 1, 3):  # a prefill, then decode steps that must see the cache the earlier calls wrote
        q, k, v, _ = attention_operands(heads, kv_heads, seq, 16, dim, seed=position + 1)
        want = eager(q, k, v, torch.tensor([position]))
        got = method.execute([q, k, v, torch.tensor([position])])[0]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        position += seq


# --- layouts, filler, bundles --------------------------------------------------------------------------


def test_layout_groups_refine_every_level_block():
    cfg = tiny_config(d_model=192, n_heads=4, n_kv_heads=2, memory=MemoryConfig((2, 2, 2), (64, 32, 16), (0, 1)))
    assert SlotLayout.for_bank("fused-int4", cfg, ["int4-g128"] * 3).gate_up_group == 64  # 192 = 128 + 64 rows
    assert SlotLayout.for_bank("fused-int4", cfg, ["int4-g32"] * 3).down_group == 16  # the 16-wide level
    int8 = SlotLayout.for_bank("graph-int8", cfg, ["int8"] * 3)
    assert (int8.gate_up_group, int8.down_group) == (192, 16)
    with pytest.raises(ValueError, match="needs every bank level in int4"):
        SlotLayout.for_bank("fused-int4", cfg, ["int8", "int4-g32", "int4-g32"])


@pytest.mark.parametrize(("strategy", "scheme"), [("fused-int4", "int4-g32"), ("graph-int8", "int8")])
def test_quantized_filler_holds_the_bank_memory_exactly(tmp_path, strategy, scheme):
    checkpoint = tiny_checkpoint(tmp_path)
    write_bank(tmp_path / "bank", checkpoint, scheme)
    cfg = load_checkpoint(checkpoint).config
    layout = SlotLayout.for_bank(strategy, cfg, [scheme] * cfg.memory.num_levels)
    reader = BankReader(tmp_path / "bank")
    filler = SlotFiller(layout.contract(cfg, cfg.max_seq_len), reader, layout=layout)
    path = (1, 4)
    filler.set_path(path)
    blocks = [reader.read_block(level, node) for level, node in enumerate(path)]
    for index, (gate_up, down) in enumerate(filler.float_memory()):
        gates = [b.gate[index] for b in blocks]
        ups = [b.up[index] for b in blocks]
        assert np.array_equal(gate_up[0].numpy(), np.concatenate(gates + ups, axis=1))
        assert np.array_equal(down[0].numpy(), np.concatenate([b.down[index] for b in blocks], axis=0))
    float_bytes = 4 * sum(t.numel() for pair in filler.float_memory() for t in pair)
    slot_bytes = sum(t.numel() * t.element_size() for t in filler.slot)
    assert slot_bytes / float_bytes < (0.18 if scheme == "int4-g32" else 0.31)  # scales weigh a lot at d = 32


@pytest.mark.parametrize(
    ("strategy", "scheme", "targets"),
    [
        ("fused-int4", "int4-g32", ("executorch",)),
        ("graph-int4", "int4-g32", ("onnx",)),
        ("host-fp16", "float32", ("onnx",)),
    ],
)
@pytest.mark.slow
def test_bundle_with_a_slot_strategy_matches_eager(kernel_library, tmp_path, strategy, scheme, targets):
    checkpoint = tiny_checkpoint(tmp_path)
    bundle = tmp_path / "bundle"
    options = EmitOptions(slot_strategy=strategy)
    export_bundle(
        checkpoint, bundle, ExportRecipe(targets, bank_scheme=scheme, options=options, checks=0, router_program=False)
    )
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["slot"]["strategy"] == strategy
    model = load_checkpoint(checkpoint).model
    loader = BundleLoader(bundle, target=targets[0])
    tokens = list(range(1, 20))
    padded = torch.zeros(1, loader.contract.seq_len, dtype=torch.long)
    padded[0, : len(tokens)] = torch.tensor(tokens)
    decoder = loader.open_decoder(targets[0])
    for path in ((0, 0), (1, 4)):
        loader.set_path(path)
        with torch.no_grad():
            want = model(padded, loader.filler.program_memory())[0, : len(tokens)]
        torch.testing.assert_close(loader.logits(tokens), want, rtol=0, atol=1e-4)
        torch.testing.assert_close(decoder(torch.tensor([tokens]), 0, loader.slot), want, rtol=0, atol=1e-4)


def test_recipe_refuses_a_strategy_its_targets_or_bank_cannot_take(tmp_path):
    with pytest.raises(ValueError, match="not available for targets"):
        ExportRecipe(("onnx",), bank_scheme="int4-g32", options=EmitOptions(slot_strategy="fused-int4"))
    with pytest.raises(ValueError, match="unknown slot strategy"):
        ExportRecipe(options=EmitOptions(slot_strategy="int3"))
    with pytest.raises(ValueError, match="needs every bank level in int4"):
        recipe = ExportRecipe(
            bank_scheme="int8", options=EmitOptions(slot_strategy="fused-int4"), checks=0, router_program=False
        )
        export_bundle(tiny_checkpoint(tmp_path), tmp_path / "bundle", recipe)


# --- partitioning ----------------------------------------------------------------------------------------


class LinearMemory(torch.nn.Module):
    """An anchor linear (constant weight) followed by a memory linear whose weight is a slot input."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Linear(16, 16, bias=False)

    def forward(self, x, memory):
        h = self.anchor(x)
        return h + torch.nn.functional.linear(h, memory)


def delegate_inputs_and_leftovers(partitioner) -> tuple[set[str], set[str]]:
    from executorch.exir import to_edge_transform_and_lower

    program = torch.export.export(LinearMemory(), (torch.randn(1, 4, 16), torch.randn(16, 16)), strict=False)
    graph = to_edge_transform_and_lower(program, partitioner=[partitioner]).exported_program().graph
    calls = [n for n in graph.nodes if n.op == "call_function"]
    inputs = {a.name for n in calls if "call_delegate" in str(n.target) for a in n.args[1:]}
    leftovers = {n.name for n in calls if "call_delegate" not in str(n.target) and "getitem" not in str(n.target)}
    return inputs, leftovers


@pytest.mark.slow
def test_slot_weight_rule_delegates_slot_matmuls_and_keeps_anchor_weights_static():
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    from hm_export.kernels.partition import slot_weight_partitioner

    inputs, leftovers = delegate_inputs_and_leftovers(slot_weight_partitioner(["memory"]))
    assert inputs == {"x", "memory"} and not leftovers  # anchor weight packed inside the delegate
    inputs, leftovers = delegate_inputs_and_leftovers(XnnpackPartitioner(force_non_static_weights_for_f32_linear=True))
    assert "p_anchor_weight" in inputs  # the global flag feeds the anchor weight per call (re-packed)
    _, leftovers = delegate_inputs_and_leftovers(XnnpackPartitioner())
    assert leftovers  # by default the slot matmul falls back to portable kernels


def test_auto_picks_the_measured_default_per_target_and_bank():
    from hm_export.kernels.strategies import resolve_layout

    cfg = tiny_config()

    def pick(targets: tuple[str, ...], schemes: list[str]) -> str:
        return resolve_layout("auto", targets, cfg, schemes).strategy.name

    assert pick(("executorch",), ["int4-g32"] * 2) == "fused-int4"
    assert pick(("executorch",), ["int8"] * 2) == "fused-int8"
    assert pick(("executorch",), ["int8", "int4-g32"]) == "host-fp32"  # mixed bank: no single code width
    assert pick(("executorch", "onnx"), ["int4-g32"] * 2) == "host-fp32"  # ONNX Runtime has no fused kernel
    assert pick(("onnx",), ["int8"] * 2) == "host-fp32"
    assert pick(("executorch",), ["float32"] * 2) == "host-fp32"
