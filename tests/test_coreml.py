"""The Core ML package's structure against the slot contract (prediction itself needs macOS)."""

from __future__ import annotations

import json
from pathlib import Path

import coremltools as ct
import pytest
from coremltools.proto import FeatureTypes_pb2 as ft

from hm_export.checkpoint import load_checkpoint
from hm_export.model import assemble_path
from hm_export.slot import SlotContract
from hm_export.targets.coreml import check_coreml_package

pytestmark = pytest.mark.slow  # every test here needs an exported bundle or a C++ build


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_package_inputs_match_the_slot_contract(decode_bundle: tuple[Path, Path]) -> None:
    checkpoint, bundle = decode_bundle
    manifest = _manifest(bundle)
    contract = SlotContract.from_dict(manifest["slot"])
    entry = manifest["targets"]["coreml"]
    spec = ct.models.MLModel(str(bundle / entry["files"]["package"]), skip_model_load=True).get_spec()
    inputs = {f.name: f.type.multiArrayType for f in spec.description.input}
    assert list(inputs) == ["tokens", *contract.input_names]
    assert list(inputs["tokens"].shape) == [1, contract.seq_len]
    assert inputs["tokens"].dataType == ft.ArrayFeatureType.INT32
    for tensor in contract.tensors:
        assert list(inputs[tensor.name].shape) == list(tensor.shape), tensor.name
        assert inputs[tensor.name].dataType == ft.ArrayFeatureType.FLOAT16, tensor.name
    assert [o.name for o in spec.description.output] == ["logits"]

    report = check_coreml_package(
        bundle / entry["files"]["package"], contract, entry["io"], entry["precision"], entry["anchor_params"]
    )
    assert report["passed"], report["problems"]
    assert report["ops"]["matmul"] == 2 * len(contract.memory_layers) + 2 * manifest["model"]["n_layers"]
    # The fp16 weights are the anchor's, counted here from the checkpoint (not from the manifest): the package
    # holds them (>=), plus folded tables (RoPE, masks) far smaller than one path's memory (the slot is inputs).
    model = load_checkpoint(checkpoint).model
    anchor_fp16 = 2 * sum(p.numel() for p in model.anchor_parameters())
    path_fp16 = 2 * sum(t.numel() for t in assemble_path(model, (0, 0))[0]) * len(contract.memory_layers)
    assert anchor_fp16 <= report["weights_bytes"] < anchor_fp16 + path_fp16 // 4


def test_structural_check_fails_on_a_contract_mismatch(decode_bundle: tuple[Path, Path]) -> None:
    _, bundle = decode_bundle
    manifest = _manifest(bundle)
    contract = SlotContract.from_dict(manifest["slot"])
    entry = manifest["targets"]["coreml"]
    package, io, precision, params = (
        bundle / entry["files"]["package"],
        entry["io"],
        entry["precision"],
        entry["anchor_params"],
    )
    wrong_shape = json.loads(json.dumps(io))
    wrong_shape["inputs"][1]["shape"][-1] += 1
    report = check_coreml_package(package, contract, wrong_shape, precision, params)
    assert not report["passed"] and any(f"input {io['inputs'][1]['name']}" in p for p in report["problems"])
    renamed = json.loads(json.dumps(io))
    renamed["inputs"][2]["name"] = "slot_renamed"
    report = check_coreml_package(package, contract, renamed, precision, params)
    assert not report["passed"] and any("differ from the program's" in p for p in report["problems"])
    report = check_coreml_package(package, contract, io, "float32", params)
    assert not report["passed"] and any("float32" in p for p in report["problems"])
    report = check_coreml_package(package, contract, io, precision, params // 4)
    assert any("more than the anchor alone" in p for p in report["problems"])
