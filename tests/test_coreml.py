"""The Core ML package's structure against the slot contract (prediction itself needs macOS)."""

from __future__ import annotations

import json
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
from coremltools.proto import FeatureTypes_pb2 as ft

from hm_export.checkpoint import load_checkpoint
from hm_export.slot import SlotContract
from hm_export.targets.coreml import check_coreml_package

pytestmark = pytest.mark.slow  # every test here needs an exported bundle or a C++ build


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _program(manifest: dict) -> dict:
    """The Core ML target's one program (the decode package serves the window too: docs/bundle-format.md)."""
    entry = manifest["targets"]["coreml"]
    return entry["decode"] if entry.get("window") == "decode" else entry


def test_package_inputs_match_the_slot_contract(decode_bundle: tuple[Path, Path]) -> None:
    checkpoint, bundle = decode_bundle
    manifest = _manifest(bundle)
    contract = SlotContract.from_dict(manifest["slot"])
    entry = _program(manifest)
    spec = ct.models.MLModel(str(bundle / entry["files"]["package"]), skip_model_load=True).get_spec()
    inputs = {f.name: f.type.multiArrayType for f in spec.description.input}
    assert list(inputs) == ["tokens", "input_pos", *contract.input_names]
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
    # The weights are the anchor's, found byte for byte (float16) in the package, and no bank block is: the slot
    # is inputs (the checkpoint's weights, not the manifest's counts).
    model = load_checkpoint(checkpoint).model
    blob = next((bundle / entry["files"]["package"]).rglob("weight.bin")).read_bytes()
    anchor = [p.detach().numpy() for p in model.anchor_parameters() if p.dim() == 2]
    assert all(weight.astype("<f2").tobytes() in blob for weight in anchor)
    assert report["weights_bytes"] >= 2 * sum(weight.size for weight in anchor)
    for name in ("gate", "up", "down"):
        for level, blocks in enumerate(getattr(model.bank, name)):
            for matrix in blocks.detach().numpy().reshape(-1, *blocks.shape[-2:]):  # [nodes * layers, rows, cols]
                for form in (matrix, matrix.T):
                    assert np.ascontiguousarray(form).astype("<f2").tobytes() not in blob, (name, level)


def test_structural_check_fails_on_a_contract_mismatch(decode_bundle: tuple[Path, Path]) -> None:
    _, bundle = decode_bundle
    manifest = _manifest(bundle)
    contract = SlotContract.from_dict(manifest["slot"])
    entry = _program(manifest)
    package, io, precision, params = (
        bundle / entry["files"]["package"],
        entry["io"],
        entry["precision"],
        entry["anchor_params"],
    )
    first_slot = [i["name"] for i in io["inputs"]].index(contract.input_names[0])
    wrong_shape = json.loads(json.dumps(io))
    wrong_shape["inputs"][first_slot]["shape"][-1] += 1
    report = check_coreml_package(package, contract, wrong_shape, precision, params)
    assert not report["passed"] and any(f"input {contract.input_names[0]}" in p for p in report["problems"])
    renamed = json.loads(json.dumps(io))
    renamed["inputs"][first_slot + 1]["name"] = "slot_renamed"
    report = check_coreml_package(package, contract, renamed, precision, params)
    assert not report["passed"] and any("differ from the program's" in p for p in report["problems"])
    report = check_coreml_package(package, contract, io, "float32", params)
    assert not report["passed"] and any("float32" in p for p in report["problems"])
    report = check_coreml_package(package, contract, io, precision, params // 4)
    assert any("more than the anchor alone" in p for p in report["problems"])
