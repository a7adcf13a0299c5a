"""Core ML emitter (``mlprogram`` ``.mlpackage``) and its structural verification.

The slot is a set of fp16 ``matmul`` inputs (Core ML's ``linear`` and its compression ops need
constant weights, so only the anchor can be compressed).  ``MLModel.predict`` exists only on macOS:
on other hosts :func:`check_coreml_package` verifies the package's structure against the slot
contract and reports numerical checks as skipped; ``scripts/check_coreml_macos.py`` runs them.
"""

from __future__ import annotations

import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from hm_export.slot import LOGITS_OUTPUT, TOKENS_INPUT, SlotContract
from hm_export.trace import SlotProgram

PACKAGE = "model.mlpackage"
DEPLOYMENT_TARGETS = ("iOS17", "iOS18")
PRECISIONS = ("float16", "float32")
ANCHOR_COMPRESSION = ("none", "int8", "int4-block32", "palettize4")


def _compress_anchor(model: Any, scheme: str) -> Any:
    """Compress the anchor's constant weights (the slot is made of inputs, so it is never touched)."""
    import coremltools.optimize.coreml as cto

    if scheme == "int8":
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric"))
        return cto.linear_quantize_weights(model, config)
    if scheme == "int4-block32":
        op_config = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=32
        )
        return cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=op_config))
    if scheme == "palettize4":
        config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=4))
        return cto.palettize_weights(model, config)
    raise ValueError(f"unknown anchor compression {scheme!r}; choose from {ANCHOR_COMPRESSION}")


def emit_coreml(
    slot_program: SlotProgram,
    out_dir: Path,
    precision: str = "float16",
    deployment_target: str = "iOS18",
    anchor_compression: str = "none",
) -> dict[str, Any]:
    import coremltools as ct

    if precision not in PRECISIONS or deployment_target not in DEPLOYMENT_TARGETS:
        raise ValueError(f"Core ML precision must be one of {PRECISIONS}, target one of {DEPLOYMENT_TARGETS}")
    start = time.perf_counter()
    contract = slot_program.contract
    slot_dtype = np.float16 if precision == "float16" else np.float32
    inputs = [ct.TensorType(name=TOKENS_INPUT, shape=(1, contract.seq_len), dtype=np.int32)]
    inputs += [ct.TensorType(name=t.name, shape=t.shape, dtype=slot_dtype) for t in contract.tensors]
    model = ct.convert(
        slot_program.program.run_decompositions({}),
        convert_to="mlprogram",
        inputs=inputs,
        outputs=[ct.TensorType(name=LOGITS_OUTPUT, dtype=slot_dtype)],
        minimum_deployment_target=getattr(ct.target, deployment_target),
        compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32,
    )
    if anchor_compression != "none":
        model = _compress_anchor(model, anchor_compression)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(str(out_dir / PACKAGE))
    program = slot_program.program
    anchor_params = sum(v.numel() for v in [*program.state_dict.values(), *program.constants.values()])
    structure = check_coreml_package(out_dir / PACKAGE, contract, precision, anchor_params)
    if not structure["passed"]:
        raise RuntimeError(f"{out_dir / PACKAGE}: structural check failed: {structure['problems']}")
    return {
        "runtime": "coreml",
        "files": {"package": PACKAGE},
        "precision": precision,
        "deployment_target": deployment_target,
        "anchor_compression": anchor_compression,
        "slot_dtype": precision,
        "ops": structure["ops"],
        "anchor_params": anchor_params,
        "seconds": {"convert": round(time.perf_counter() - start, 2)},
    }


def _array_dtype_name(code: int) -> str:
    from coremltools.proto import FeatureTypes_pb2 as ft

    return ft.ArrayFeatureType.ArrayDataType.Name(code).lower()


def check_coreml_package(package: Path, contract: SlotContract, precision: str, anchor_params: int) -> dict[str, Any]:
    """Structural verification: I/O names, shapes, dtypes vs the slot contract; op counts; no bank inside."""
    import coremltools as ct

    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    problems: list[str] = []
    want_slot = "float16" if precision == "float16" else "float32"
    expected = {TOKENS_INPUT: ([1, contract.seq_len], "int32")}
    expected.update({t.name: (list(t.shape), want_slot) for t in contract.tensors})
    seen = {}
    for feature in spec.description.input:
        array = feature.type.multiArrayType
        seen[feature.name] = (list(array.shape), _array_dtype_name(array.dataType))
    if list(seen) != list(expected):
        problems.append(f"inputs {list(seen)} differ from the contract {list(expected)}")
    for name, (shape, dtype) in expected.items():
        if name in seen and seen[name] != (shape, dtype):
            problems.append(f"input {name}: {seen[name]} != contract {(shape, dtype)}")
    outputs = [o.name for o in spec.description.output]
    if outputs != [LOGITS_OUTPUT]:
        problems.append(f"outputs {outputs} != [{LOGITS_OUTPUT!r}]")
    ops: Counter[str] = Counter()
    slot_readers: dict[str, set[str]] = {t.name: set() for t in contract.tensors}
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in block.operations:
                ops[op.type] += 1
                for argument in op.inputs.values():
                    for binding in argument.arguments:
                        if binding.name in slot_readers:
                            slot_readers[binding.name].add(op.type)
    for name, readers in slot_readers.items():
        if readers != {"matmul"}:
            problems.append(f"slot input {name} is read by {sorted(readers) or 'nothing'}, expected matmul only")
    weights = Path(package) / "Data" / "com.apple.CoreML" / "weights"
    weights_bytes = sum(p.stat().st_size for p in weights.rglob("*") if p.is_file()) if weights.exists() else 0
    # The package may hold the anchor and folded constants (``anchor_params`` elements, at most 4 bytes
    # each, plus blob alignment), never a bank block.
    limit = anchor_params * (2 if precision == "float16" else 4) * 1.01 + 64 * ops["const"]
    if weights_bytes > limit:
        problems.append(f"weights take {weights_bytes} bytes, more than the anchor alone ({int(limit)})")
    return {
        "passed": not problems,
        "problems": problems,
        "ops": dict(sorted(ops.items())),
        "weights_bytes": weights_bytes,
        "numerics": "available" if platform.system() == "Darwin" else "skipped (MLModel.predict needs macOS)",
    }


class CoreMLRunner:
    """Runs the package with ``MLModel.predict`` (macOS only); slot buffers are passed as fp16/fp32 arrays."""

    def __init__(self, package: Path, slot_names: list[str], precision: str) -> None:
        import coremltools as ct

        from hm_export.targets import HostUnsupported

        if platform.system() != "Darwin":
            raise HostUnsupported("Core ML prediction needs macOS; on this host only the structure is checked")
        self.model = ct.models.MLModel(str(package))
        self.slot_names = slot_names
        self.dtype = np.float16 if precision == "float16" else np.float32

    def __call__(self, tokens: Any, slot: list[Any]) -> Any:
        import torch

        feeds = {TOKENS_INPUT: tokens.numpy().astype(np.int32)}
        feeds.update({name: t.numpy().astype(self.dtype) for name, t in zip(self.slot_names, slot)})
        return torch.from_numpy(self.model.predict(feeds)[LOGITS_OUTPUT].astype(np.float32))
