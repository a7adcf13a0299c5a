"""The export options the README advertises, each exported for real: ``--separate-weights`` (ExecuTorch
program-data separation), the ``executorch-coreml`` target, Core ML anchor compression and the iOS17
deployment target.  All slow: every test converts or lowers a program."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import coremltools as ct
import pytest
from click.testing import CliRunner
from conftest import DECODE_CONTEXTS, tiny_checkpoint, tiny_config, tiny_model

from hm_export.checks import run_checks
from hm_export.cli import main
from hm_export.export import ExportRecipe, export_bundle
from hm_export.passes.pipeline import PIPELINES
from hm_export.slot import SlotContract
from hm_export.targets import EmitOptions
from hm_export.targets.coreml import emit_coreml
from hm_export.trace import TensorIO, trace_slot_program
from hm_export.verify import verify_bundle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("options")
    (work / "contexts.jsonl").write_text("".join(json.dumps(item) + "\n" for item in DECODE_CONTEXTS[:2]))
    tiny_checkpoint(work, name="ckpt", cfg=tiny_config(max_seq_len=16), seed=4)
    return work


def export(work: Path, name: str, targets: tuple[str, ...], options: EmitOptions | None = None) -> Path:
    contexts, options = work / "contexts.jsonl", options or EmitOptions()
    recipe = ExportRecipe(
        targets, options=options, checks=2, check_new_tokens=4, check_contexts=contexts, router_program=False
    )
    export_bundle(work / "ckpt", work / name, recipe)
    return work / name


def test_separate_weights_put_the_anchor_in_ptd_files_that_the_runtime_loads(work):
    bundle = export(work, "separate", ("executorch",), EmitOptions(separate_weights=True))
    entry = json.loads((bundle / "manifest.json").read_text())["targets"]["executorch"]
    # One program (docs/bundle-format.md): the decode program serves the window, its weights in one .ptd.
    assert entry["files"] == {} and entry["window"] == "decode"
    assert entry["decode"]["files"] == {"program": "executorch/decode.pte", "data": "executorch/decode.ptd"}
    from hm_export.checkpoint import load_checkpoint

    model = load_checkpoint(work / "ckpt").model
    weight = model.blocks[0].attn.wq.weight.detach().numpy().astype("<f4").tobytes()
    anchor_bytes = 4 * sum(p.numel() for p in model.anchor_parameters())
    pte, ptd = (bundle / "executorch/decode.pte").read_bytes(), (bundle / "executorch/decode.ptd").read_bytes()
    assert weight in ptd and weight not in pte  # the weights moved, the program kept none
    assert len(pte) < anchor_bytes <= len(ptd)  # the .pte: graph and XNNPACK metadata
    # The runtime loads program + data: golden checks and verify pass.
    report = run_checks(bundle)
    assert report.passed, [r for r in report.results if r.status != "pass"]
    assert report.summary()["executorch/decode"]["pass"] == 2
    assert verify_bundle(bundle, work / "ckpt", work / "contexts.jsonl").passed


def test_executorch_coreml_target_lowers_to_the_core_ml_delegate_and_is_skipped_here(work):
    bundle = export(work, "et-coreml", ("executorch-coreml",))
    entry = json.loads((bundle / "manifest.json").read_text())["targets"]["executorch-coreml"]
    assert entry["files"] == {"program": "executorch_coreml/model.pte"} and "decode" not in entry
    assert entry["delegation"]["backend"] == "coreml" and entry["delegation"]["delegated_subgraphs"] >= 1
    assert entry["delegation"]["delegated_nodes"] > 50
    assert b"CoreMLBackend" in (bundle / entry["files"]["program"]).read_bytes()
    # No runtime here: verify and check say skipped (exit 3), after checking what needs no runtime.
    runner = CliRunner()
    args = ["--checkpoint", str(work / "ckpt"), "--contexts", str(work / "contexts.jsonl"), "--json"]
    result = runner.invoke(main, ["verify", str(bundle), "--target", "executorch-coreml", *args])
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "skipped" and report["quantization"]["passed"] and report["routes"]["passed"]
    check = run_checks(bundle)
    assert check.status == "skipped" and check.summary()["executorch-coreml/window"] == {
        "pass": 0,
        "fail": 0,
        "skipped": 2,
    }
    assert check.summary()["bank/memory"]["fail"] == 0


@pytest.fixture(scope="module")
def window_program():
    """The full-window program of a model whose anchor weights are big enough for coremltools to compress
    (its default threshold skips weights of 2048 elements or fewer)."""
    cfg = tiny_config(vocab_size=128, d_model=64, ffn_hidden=128, max_seq_len=16)
    model = tiny_model(cfg, seed=0)
    program = trace_slot_program(model, SlotContract.for_model(cfg, 16), PIPELINES["folded_slot"])
    weights = [p for p in model.anchor_parameters() if p.dim() == 2]  # the tied embedding once
    compressible = sum(1 for p in weights if p.numel() > 2048)
    return program, 2 * sum(p.numel() for p in model.anchor_parameters()), compressible


@pytest.mark.parametrize(
    ("deployment", "compression", "op", "max_ratio"),
    [
        ("iOS17", "int8", "constexpr_affine_dequantize", 0.65),  # measured 0.60 of the fp16 anchor
        ("iOS18", "int4-block32", "constexpr_blockwise_shift_scale", 0.45),  # 0.39
        ("iOS18", "palettize4", "constexpr_lut_to_dense", 0.45),  # 0.36
    ],
)
def test_core_ml_anchor_compression_and_deployment_target(
    window_program, tmp_path, deployment, compression, op, max_ratio
):
    program, anchor_fp16, compressible = window_program
    entry = emit_coreml(program, tmp_path, "float16", deployment, compression)  # checks the structure itself
    assert entry["deployment_target"] == deployment and entry["anchor_compression"] == compression
    spec = ct.models.MLModel(str(tmp_path / "model.mlpackage"), skip_model_load=True).get_spec()
    assert spec.specificationVersion == {"iOS17": 8, "iOS18": 9}[deployment]
    assert entry["ops"].get(op, 0) == compressible == 11  # embedding, wq, wo, gate, up, down of both layers
    assert entry["ops"]["matmul"] == 2 * 2 + 2 * 2  # the slot: gate_up and down per memory layer, plus attention
    weights = sum(p.stat().st_size for p in (tmp_path / "model.mlpackage").rglob("weight.bin"))
    assert weights < max_ratio * anchor_fp16
    inputs = {f.name: f.type.multiArrayType for f in spec.description.input}
    assert all(
        inputs[t.name].dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16 for t in program.contract.tensors
    )


def test_ios17_refuses_a_program_with_states(window_program, tmp_path):
    """Core ML states (the decode program's KV cache) need iOS18: the emitter refuses before converting."""
    program = window_program[0]
    with_state = replace(program, states=(TensorIO("k_cache0", (1, 2, 16, 8), "float32"),))
    with pytest.raises(ValueError, match="KV cache needs Core ML states: use deployment target iOS18"):
        emit_coreml(with_state, tmp_path, "float16", "iOS17")
    assert not (tmp_path / "model.mlpackage").exists()
