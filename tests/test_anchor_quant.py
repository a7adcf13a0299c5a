"""``--anchor-quant``: every preset exports a tiny model, passes its golden checks, and stores each weight once.

"Stored once" is a byte search over every file of the bundle, as the bank-bytes test searches the programs: the
float32 bytes of each float anchor weight, or the codes of each quantized one in the layout the runtime stores
(XNNPACK's int4: two codes + 8 per byte along the input, even index in the low nibble; int8 as is; the ``-asym``
presets' tables as ``hm_export::qlinear`` reads them), must occur exactly once.  The one exception is documented:
an XNNPACK-quantized tied embedding is stored as the lookup table and again as the head's XNNPACK weights (each of
those once); the ``-asym`` presets store it once, the lookup reading the head's table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import DECODE_CONTEXTS, tiny_checkpoint, tiny_config

from hm_export.anchor_quant import (
    PRESETS,
    GridLinear,
    LookupTable,
    QuantizedEmbedding,
    WeightQuant,
    asymmetric_codes,
    exported_model,
    get_preset,
)
from hm_export.checkpoint import load_checkpoint
from hm_export.checks import run_checks
from hm_export.export import ExportRecipe, export_bundle
from hm_export.targets import EmitOptions

# d 64, FFN 128, vocab 96: widths divisible by 32, so every preset's groups apply (and g128 falls back to 64).
CFG = tiny_config(vocab_size=96, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=128)


def bundle_bytes(bundle: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(bundle.rglob("*")) if p.is_file())


def xnnpack_int4(codes: torch.Tensor) -> bytes:
    """int4 codes [out, in] as XNNPACK serializes them: code + 8, pairs along the input, even index low."""
    shifted = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(codes.shape[0], -1, 2)
    return (shifted[..., 0] | (shifted[..., 1] << 4)).numpy().tobytes()


def stored_forms(module: torch.nn.Module) -> dict[str, bytes]:
    """What each anchor weight of a quantized (or float) model looks like in the program."""
    forms = {}
    for name, child in module.named_modules():
        if isinstance(child, torch.nn.Linear):
            weight = child.weight
            if hasattr(weight, "qdata"):  # torchao's quantized tensor: int8 storage of the int4/int8 codes
                codes = weight.qdata
                forms[name] = xnnpack_int4(codes) if int(codes.max()) <= 7 and int(codes.min()) >= -8 else None
                if forms[name] is None:
                    forms[name] = codes.numpy().tobytes()
            else:
                forms[name] = weight.detach().numpy().astype("<f4").tobytes()
        elif isinstance(child, (GridLinear, LookupTable)):  # the codes as the kernels read them (a tied table: once)
            forms[name] = child.codes.numpy().tobytes()
        elif isinstance(child, QuantizedEmbedding):
            forms[name] = child.weight.numpy().tobytes()
        elif isinstance(child, torch.nn.Embedding):
            forms[name] = child.weight.detach().numpy().astype("<f4").tobytes()
    return forms


def path_logits(model: torch.nn.Module, quantized: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Both models' logits on one fixed prompt and path, and their cosine.

    Fixed tokens: on a random tiny model the cosine depends on the input (0.86-0.99 over 100 random prompts for
    ``8da4w-g32``), so an unseeded prompt made the threshold a coin toss.
    """
    tokens = torch.randint(0, CFG.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    paths = torch.tensor([1, 3])
    with torch.no_grad():
        float_logits, quantized_logits = model.forward_path(tokens, paths), quantized.forward_path(tokens, paths)
    cosine = torch.nn.functional.cosine_similarity(quantized_logits.flatten(), float_logits.flatten(), dim=0)
    return float_logits, quantized_logits, float(cosine)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("contexts") / "contexts.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in DECODE_CONTEXTS))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_exports_passes_its_checks_and_stores_each_weight_once(tmp_path, contexts, preset):
    checkpoint = tiny_checkpoint(tmp_path, cfg=CFG, seed=2)
    bundle = tmp_path / "bundle"
    recipe = ExportRecipe(
        ("executorch",),
        bank_scheme="int4-g32",
        options=EmitOptions(anchor_quant=preset),
        checks=2,
        check_new_tokens=6,
        check_contexts=contexts,
        router_program=False,  # tested on the session's decode bundle
    )
    export_bundle(checkpoint, bundle, recipe)
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = manifest["targets"]["executorch"]
    assert entry["window"] == "decode" and entry["files"] == {}  # one program per target
    assert sorted(p.name for p in (bundle / "executorch").iterdir()) == ["decode.pte"]
    assert entry["anchor_quant"]["preset"] == preset
    kv_cache = "float32" if preset == "none" else "float16"  # a quantized anchor's cache is float16
    assert entry["decode"]["cache"]["dtype"] == kv_cache
    assert {state["dtype"] for state in entry["decode"]["io"]["states"]} == {kv_cache}
    report = run_checks(bundle)
    assert report.passed, [r for r in report.results if r.status == "fail"]
    assert report.summary()["executorch/decode"]["pass"] == 2

    model, _ = exported_model(load_checkpoint(checkpoint).model, get_preset(preset))
    data = bundle_bytes(bundle)
    for name, form in stored_forms(model).items():
        assert data.count(form) == 1, (preset, name)


def test_group_falls_back_to_a_multiple_of_32_that_divides_the_width():
    assert WeightQuant(4, 128).group_for(576) == 96  # SmolLM2's width
    assert WeightQuant(4, 128).group_for(1536) == 128
    assert WeightQuant(4, 32).group_for(48) == 0  # no multiple of 32 divides it: per channel
    with pytest.raises(ValueError, match="multiple of 32"):
        WeightQuant(4, 48)


def test_quantized_model_keeps_the_slot_and_unties_the_head(tmp_path):
    model = load_checkpoint(tiny_checkpoint(tmp_path, cfg=CFG)).model
    quantized, description = exported_model(model, get_preset("8da4w-g32"))
    assert quantized is not model and model.head.weight is model.embed.weight  # the original is untouched
    assert isinstance(quantized.embed, QuantizedEmbedding)
    assert hasattr(quantized.head.weight, "qdata") and hasattr(quantized.blocks[0].ffn.up.weight, "qdata")
    assert description["linears"]["groups_by_input_width"] == {"64": 32, "128": 32}
    float_logits, quantized_logits, cosine = path_logits(model, quantized)
    assert not torch.equal(quantized_logits, float_logits) and cosine > 0.9  # quantized, still the same model
    float_copy, description = exported_model(model, get_preset("none"))  # the head reads the embedding's table
    assert type(float_copy.head).__name__ == "KernelTiedHead" and "stored once" in description["tied_embedding"]
    torch.testing.assert_close(path_logits(model, float_copy)[1], float_logits, rtol=0, atol=1e-6)


def test_cli_offers_every_preset():
    from hm_export.cli import ANCHOR_QUANT_PRESETS

    assert sorted(ANCHOR_QUANT_PRESETS) == sorted(PRESETS)


def test_recipe_refuses_unknown_presets_and_targets_without_a_mapping():
    with pytest.raises(ValueError, match="unknown anchor quantization"):
        ExportRecipe(options=EmitOptions(anchor_quant="int3"))
    with pytest.raises(ValueError, match="not available for targets"):
        ExportRecipe(("executorch-coreml",), options=EmitOptions(anchor_quant="8da4w-g32"))


def test_verify_defaults_add_each_presets_allowance_to_the_bank_schemes():
    """``verify``'s defaults for a quantized anchor: the bank's perplexity allowance plus the preset's, the lower
    top-1 floor, never exact; an 8da program is judged by the int8-activations export rule."""
    from hm_export.reference import PROGRAM_TOLERANCE, default_tolerances, program_precision, scheme_tolerance

    bank = default_tolerances(["int4-g32", "int4-g32"], "int4", "float32")
    for preset in PRESETS.values():
        got = default_tolerances(["int4-g32", "int4-g32"], "int4", "float32", preset)
        if not preset.quantized:
            assert got == bank
            continue
        extra_ppl, top1 = preset.tolerance
        assert got.max_ppl_increase_pct == scheme_tolerance("int4-g32").max_ppl_increase_pct + extra_ppl
        assert got.min_top1 == min(scheme_tolerance("int4-g32").min_top1, top1) and not got.exact
    exact = default_tolerances(["float32"], "float32", "float32", get_preset("none"))
    assert exact.exact and not default_tolerances(["float32"], "float32", "float32", get_preset("int8-weight")).exact
    record = {"linears": {"activations": "int8, dynamic per token (asymmetric)"}, "embedding": {"weights": "int4"}}
    assert (
        program_precision({}, record) == "int8-activations" and program_precision({}, {"preset": "none"}) == "float32"
    )
    assert program_precision({"state_dtype": "float16"}, record) == "float16"
    assert PROGRAM_TOLERANCE["int8-activations"].rtol > PROGRAM_TOLERANCE["float32"].rtol


def q41_blocks(rows: int, cols: int, full_span: bool, seed: int = 0) -> torch.Tensor:
    """Float32 ``[rows, cols]`` made of Q4_1 blocks of 32 along the input: ``d * q + m`` with float16 ``d > 0``,
    ``m`` and ``q`` in 0..15 (``full_span``: each block holds a 0 and a 15, as llama.cpp's quantizer makes them)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = rows * cols // 32
    q = torch.randint(0, 16, (blocks, 32), generator=generator)
    if full_span:
        q[:, 0], q[:, 1] = 0, 15
        q = q[:, torch.randperm(32, generator=generator)]
    d = (torch.rand(blocks, 1, generator=generator) * 0.02 + 1e-4).half().float()
    m = (-torch.rand(blocks, 1, generator=generator) * 0.15).half().float()
    return (d * q.float() + m).view(rows, cols)


def test_asymmetric_grid_recovers_q41_blocks_exactly():
    """Min-max on Q4_1 blocks (llama.cpp's: each spans 0..15) gives back d and m, so every weight bit for bit; on
    blocks that do not span the range the grid is another one: then each weight is within half a step (plus the
    float16 rounding of the min)."""
    weight = q41_blocks(64, 96, full_span=True)
    table = GridLinear(weight, WeightQuant(4, 32, asymmetric=True))
    assert torch.equal(table.dequantized(), weight)
    assert table.codes.shape == (3, 2, 512) and table.scales.shape == table.mins.shape == (3, 64)  # tiled
    loose = q41_blocks(64, 96, full_span=False, seed=1)
    _, scales, mins = asymmetric_codes(loose, 32)
    step = scales.repeat_interleave(32, dim=1)
    error = (GridLinear(loose, WeightQuant(4, 32, asymmetric=True)).dequantized() - loose).abs()
    assert (error <= step / 2 + (loose.view(64, 3, 32).amin(-1) - mins).abs().repeat_interleave(32, 1) + 1e-6).all()
    assert not torch.equal(error, torch.zeros_like(error))  # a block spanning e.g. 1..14 is not on the same grid


def test_tiled_layout():
    """Row 4k + r of a group, column j of a chunk (of 32 int4 columns, j and 16 + j in one byte; of 16 int8 ones):
    byte 64k + 4j + r; the last chunk padded with code 0; untile_codes inverts tile_codes; groups must be a multiple
    of 4 rows."""
    from hm_export.kernels import tile_codes, tiled_columns, untile_codes

    generator = torch.Generator().manual_seed(5)
    q = torch.randint(0, 16, (24, 40), dtype=torch.uint8, generator=generator)
    tiles = tile_codes(q, 12)
    assert tiles.shape == (2, 2, 192) and tiles.dtype == torch.uint8
    # row 17: group 1, its row 5 = quad 1, r 1; column 5 (chunk 0, j 5) low, column 21 high; column 37 (chunk 1)
    assert int(tiles[1, 0, 64 + 4 * 5 + 1]) == int(q[17, 5]) + 16 * int(q[17, 21])
    assert int(tiles[1, 1, 64 + 4 * 5 + 1]) == int(q[17, 37])  # its high nibble would be column 53: padding
    assert torch.equal(untile_codes(tiles, 40), q)
    ids = torch.tensor([0, 5, 21, 37, 39, 5])  # a lookup's columns: both nibbles, the last chunk, a repeat
    assert torch.equal(tiled_columns(tiles, ids), q[:, ids])
    q8 = torch.randint(-127, 128, (24, 40), dtype=torch.int8, generator=generator)
    tiles8 = tile_codes(q8, 12)
    assert tiles8.shape == (2, 3, 192) and tiles8.dtype == torch.int8
    assert int(tiles8[1, 2, 64 + 4 * 5 + 1]) == int(q8[17, 37])  # column 37: chunk 2, j 5
    assert int(tiles8[1, 2, 64 + 4 * 9 + 1]) == 0  # column 41: padding
    assert torch.equal(untile_codes(tiles8, 40), q8)
    assert torch.equal(tiled_columns(tiles8, ids), q8[:, ids])
    with pytest.raises(ValueError, match="multiple of 4"):
        tile_codes(q, 6)


def test_int8_grid_recovers_q80_blocks_exactly():
    generator = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (40 * 64 // 32, 32), generator=generator)
    q[:, 5] = 127  # llama.cpp's Q8_0: d = max|w| / 127, so each block holds a +-127
    d = (torch.rand(q.shape[0], 1, generator=generator) * 0.01 + 1e-4).half().float()
    weight = (d * q.float()).view(40, 64)
    table = GridLinear(weight, WeightQuant(8, 32))
    assert table.codes.dtype == torch.int8 and table.mins.numel() == 0
    assert torch.equal(table.dequantized(), weight)


@pytest.mark.parametrize("quant", [WeightQuant(4, 32, asymmetric=True), WeightQuant(8, 32)])
def test_grid_ops_compute_the_dequantized_product_and_lookup(quant):
    """qlinear = int8 activations (one scale per token and group of 32) times the dequantized weights (to float32
    rounding); qembedding = the dequantized rows."""
    from hm_export.kernels import qembedding, qlinear, quantize_groups

    weight = torch.randn(48, 96)
    table = GridLinear(weight, quant, bias=torch.randn(48))
    x = torch.randn(2, 5, 96)
    xq, xs = quantize_groups(x.reshape(-1, 96), 32)
    activations = (xq.view(10, 3, 32) * xs[:, :, None]).view(10, 96)
    want = (activations @ table.dequantized().t()).view(2, 5, 48) + table.bias
    torch.testing.assert_close(table(x), want, rtol=1e-5, atol=1e-5)
    tokens = torch.tensor([[0, 47, 3], [12, 12, 1]])
    assert torch.equal(qembedding(tokens, table.codes, table.scales, table.mins), table.dequantized()[tokens])
    with pytest.raises(ValueError, match="qlinear: x must be float32"):
        qlinear(torch.randn(3, 95), table.codes, table.scales, table.mins)
    with pytest.raises(ValueError, match="scales"):  # scales (the output width) for fewer chunks than the codes hold
        qlinear(x, table.codes, table.scales[:, :-20], table.mins)
    with pytest.raises(ValueError, match="no row group"):
        qlinear(torch.randn(2, 0), table.codes[:0], table.scales[:0], table.mins[:0])


def test_asym_presets_are_executorch_only():
    for preset in ("8da4w-g32-asym", "8da4w-g32-asym-e8", "8da4w-g32-asym-e8-screen64"):
        ExportRecipe(("executorch",), options=EmitOptions(anchor_quant=preset))
        for target in ("onnx", "coreml"):
            with pytest.raises(ValueError, match=f"{preset}' is not available for targets \\['{target}'\\]"):
                ExportRecipe((target,), options=EmitOptions(anchor_quant=preset))


def test_asym_preset_ties_one_table_and_keeps_the_slot(tmp_path):
    model = load_checkpoint(tiny_checkpoint(tmp_path, cfg=CFG)).model
    quantized, description = exported_model(model, get_preset("8da4w-g32-asym"))
    assert type(quantized.head).__name__ == "GridTiedHead" and quantized.head.embedding[0] is quantized.embed
    assert isinstance(quantized.blocks[0].ffn.up, GridLinear) and "stored once" in description["tied_embedding"]
    assert not [n for n, m in quantized.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    bank = dict(model.named_parameters())
    assert all(torch.equal(p, bank[n]) for n, p in quantized.named_parameters() if n.startswith("bank"))  # untouched
    assert description["linears"]["groups_by_input_width"] == {"64": 32, "128": 32}
    float_logits, quantized_logits, cosine = path_logits(model, quantized)
    assert not torch.equal(quantized_logits, float_logits) and cosine > 0.95


def test_screened_head_reads_the_int8_table_where_it_matters(tmp_path):
    """``-screen64``: the head's logits from an int4 copy of the tied table, the 64 best per token from the int8
    table the lookup reads (one table, stored once): close to the ``-asym-e8`` head's logits."""
    from hm_export.anchor_quant import ScreenedTiedHead

    model = load_checkpoint(tiny_checkpoint(tmp_path, cfg=CFG)).model
    screened, description = exported_model(model, get_preset("8da4w-g32-asym-e8-screen64"))
    head = screened.head
    assert isinstance(head, ScreenedTiedHead) and head.embedding[0] is screened.embed and head.top == 64
    table = head.embedding[0].table  # the int8 table, by column: token v's codes are row v
    assert head.screen.codes.dtype == torch.uint8 and table.codes.dtype == torch.int8
    assert table.codes.shape == (CFG.vocab_size, CFG.d_model) and description["embedding"]["layout"].startswith("by")
    assert description["head"]["kernel"] == "hm_export::screened_head" and description["head"]["exact_top"] == 64
    assert description["embedding"]["shared_with_head"] and "stored once" in description["tied_embedding"]
    e8, _ = exported_model(model, get_preset("8da4w-g32-asym-e8"))
    _, e8_logits, _ = path_logits(model, e8)
    _, screened_logits, cosine = path_logits(model, screened)
    best = screened_logits.topk(64, dim=-1).indices
    # the best 64: the int8 table with float activations, against the e8 head's int8 activations (max 0.012 here;
    # the int4 head of -asym: 0.069)
    torch.testing.assert_close(screened_logits.gather(-1, best), e8_logits.gather(-1, best), rtol=0, atol=0.03)
    assert not torch.equal(screened_logits, e8_logits) and cosine > 0.95
