"""The quantized-slot operator, its C++ ExecuTorch kernel, the slot strategies and a bundle using them.

Tolerances: the reference op and an independent dequantize-then-matmul compute the same float32 products
in a different order: ``atol = 1e-5 * max|out|``.  The C++ kernel sums in yet another order: same bound.
Bundles are compared with the eager model on the memory the slot really holds (``atol = 1e-4``, as the other
bundle tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_checkpoint, tiny_config

from hm_export.bank import BankReader, write_bank
from hm_export.checkpoint import load_checkpoint
from hm_export.config import MemoryConfig
from hm_export.export import ExportRecipe, export_bundle
from hm_export.kernels import build_kernel_library, load_kernel_library, memory_swiglu, registered_in_runtime
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


def dequantize_then_matmul(x, gate_up, gate_up_scales, down, down_scales) -> torch.Tensor:
    weights = torch.from_numpy(numpy_dequantize(gate_up, gate_up_scales))
    width = weights.shape[1] // 2
    hidden = x @ weights
    return (torch.nn.functional.silu(hidden[..., :width]) * hidden[..., width:]) @ torch.from_numpy(
        numpy_dequantize(down, down_scales)
    )


CASES = [  # bits, d, width, gate_up group, down group, tokens
    (4, 32, 12, 32, 4, 1),
    (4, 64, 24, 16, 8, 7),
    (8, 32, 12, 32, 4, 1),
    (8, 48, 20, 48, 10, 5),
]


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_dequantize_then_matmul(case):
    operands = random_operands(*case)
    got = memory_swiglu(*operands)
    want = dequantize_then_matmul(*operands)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


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


# --- the C++ kernel in the ExecuTorch runtime ----------------------------------------------------------


@pytest.fixture(scope="session")
def kernel_library(tmp_path_factory) -> Path:
    library = build_kernel_library(tmp_path_factory.mktemp("kernels-build"))
    load_kernel_library(library)
    return library


class OneMemoryLayer(torch.nn.Module):
    def forward(self, x, gate_up, gate_up_scales, down, down_scales):
        return memory_swiglu(x, gate_up, gate_up_scales, down, down_scales) + x


def lower_to_pte(operands, path: Path, dynamic_tokens: bool = False) -> Path:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    dynamic = ({1: torch.export.Dim("n", min=1, max=16)}, None, None, None, None) if dynamic_tokens else None
    program = torch.export.export(OneMemoryLayer(), operands, dynamic_shapes=dynamic, strict=False)
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    path.write_bytes(edge.to_executorch().buffer)
    return path


@pytest.mark.slow
def test_kernel_library_registers_the_out_variant(kernel_library):
    assert registered_in_runtime("hm_export::memory_swiglu.out")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_cpp_kernel_matches_the_reference(kernel_library, tmp_path, case):
    from executorch.runtime import Runtime

    operands = random_operands(*case)
    pte = lower_to_pte(operands, tmp_path / "op.pte")
    assert b"hm_export::memory_swiglu" in pte.read_bytes()  # the program calls the op (name and overload stored apart)
    method = Runtime.get().load_program(str(pte)).load_method("forward")
    got = method.execute(list(operands))[0]
    want = OneMemoryLayer()(*operands)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


@pytest.mark.slow
def test_cpp_kernel_follows_a_dynamic_token_count(kernel_library, tmp_path):
    from executorch.runtime import Runtime

    operands = random_operands(4, 32, 12, 32, 4, 3)
    method = Runtime.get().load_program(str(lower_to_pte(operands, tmp_path / "dyn.pte", True))).load_method("forward")
    for tokens in (1, 9):
        resized = (torch.randn(1, tokens, 32), *operands[1:])
        want = OneMemoryLayer()(*resized)
        got = method.execute(list(resized))[0]
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


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
            want = model(padded, loader.filler.float_memory())[0, : len(tokens)]
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
