"""Core ML emitter (``mlprogram`` ``.mlpackage``) and its structural verification.

The slot is a set of fp16 ``matmul`` inputs (Core ML's ``linear`` and its compression ops need
constant weights, so only the anchor can be compressed).  The decode program's KV cache becomes
Core ML states (``ct.StateType``, iOS18+: ``read_state`` / ``write_state`` in the program) and its
token axis a ``RangeDim``; ``int64`` inputs become ``int32`` (Core ML has no int64 inputs).
``MLModel.predict`` exists only on macOS: on other hosts :func:`check_coreml_package` verifies the
package's structure against the program's I/O and ``hm-export verify`` / ``check`` report the numerical
checks as skipped (exit code 3); on macOS the same commands run them.
"""

from __future__ import annotations

import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from hm_export.anchor_quant import AnchorQuant, get_preset
from hm_export.errors import ExportError, UsageError
from hm_export.slot import SlotContract
from hm_export.trace import SlotProgram, TensorIO

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
    raise UsageError(f"unknown anchor compression {scheme!r}; choose from {ANCHOR_COMPRESSION}")


def _quantize_anchor(model: Any, preset: AnchorQuant) -> tuple[Any, dict[str, Any]]:
    """``--anchor-quant`` on Core ML: weight-only symmetric quantization of the ``linear`` ops (the anchor's
    projections and the head; coremltools configures by op type, so the head takes the linears' form), through
    the same compression as ``--coreml-anchor-compression``.  The embedding's ``gather`` table stays fp16."""
    import coremltools.optimize.coreml as cto

    quant = preset.linears or preset.head
    if quant is None:
        return model, {"preset": preset.name, "weights": "float (no linear quantized)"}
    if quant.group:
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype=f"int{quant.bits}", granularity="per_block", block_size=quant.group
        )
    else:
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype=f"int{quant.bits}")
    model = cto.linear_quantize_weights(model, cto.OptimizationConfig(op_type_configs={"linear": op}))
    return model, {
        "preset": preset.name,
        "linears": {"weights": quant.describe(), "op": "constexpr_blockwise_shift_scale (linear weights)"},
        "embedding": "float16 (the gather table is not compressed)",
        "activations": "float16 compute",
        "checks": "numerics need macOS; the recorded expected values are the ExecuTorch variant's",
    }


def emit_coreml(
    slot_program: SlotProgram,
    out_dir: Path,
    precision: str = "float16",
    deployment_target: str = "iOS18",
    anchor_compression: str = "none",
    anchor_quant: str = "none",
) -> dict[str, Any]:
    import coremltools as ct

    if precision not in PRECISIONS or deployment_target not in DEPLOYMENT_TARGETS:
        raise UsageError(f"Core ML precision must be one of {PRECISIONS}, target one of {DEPLOYMENT_TARGETS}")
    if slot_program.states and deployment_target == "iOS17":
        raise UsageError(
            "the decode program's KV cache needs Core ML states: use deployment target iOS18, or --no-decode"
        )
    start = time.perf_counter()
    float_dtype = np.float16 if precision == "float16" else np.float32

    def tensor_type(io: TensorIO, named: bool = True, dtype: Any = None) -> Any:
        shape = tuple(ct.RangeDim(*slot_program.axes[d], default=1) if isinstance(d, str) else d for d in io.shape)
        dtype = dtype or (np.int32 if io.dtype == "int64" else float_dtype)
        return ct.TensorType(name=io.name if named else None, shape=shape, dtype=dtype)

    # coremltools 9 supports fp16 states only ("State only support fp16 dtype"), also in fp32 programs.
    states = [
        ct.StateType(wrapped_type=tensor_type(s, named=False, dtype=np.float16), name=s.name)
        for s in slot_program.states
    ]
    model = ct.convert(
        slot_program.program.run_decompositions({}),
        convert_to="mlprogram",
        inputs=[tensor_type(io) for io in slot_program.inputs],
        outputs=[ct.TensorType(name=io.name, dtype=float_dtype) for io in slot_program.outputs],
        states=states or None,
        minimum_deployment_target=getattr(ct.target, deployment_target),
        compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32,
    )
    preset = get_preset(anchor_quant)
    if preset.quantized and anchor_compression != "none":
        raise ValueError("--coreml-anchor-compression and a quantized --anchor-quant both compress the anchor")
    quantization: dict[str, Any] = {"preset": preset.name}
    if preset.quantized:
        model, quantization = _quantize_anchor(model, preset)
    elif anchor_compression != "none":
        model = _compress_anchor(model, anchor_compression)
    out_dir.mkdir(parents=True, exist_ok=True)
    package = f"{slot_program.stem}.mlpackage"
    model.save(str(out_dir / package))
    program = slot_program.program
    anchor_params = sum(v.numel() for v in [*program.state_dict.values(), *program.constants.values()])
    io = slot_program.io_dict()
    structure = check_coreml_package(out_dir / package, slot_program.contract, io, precision, anchor_params)
    if not structure["passed"]:
        raise ExportError(f"{out_dir / package}: structural check failed: {structure['problems']}")
    return {
        "runtime": "coreml",
        "files": {"package": package},
        "io": io,
        "precision": precision,
        **({"state_dtype": "float16"} if states else {}),
        "deployment_target": deployment_target,
        "anchor_compression": anchor_compression,
        "anchor_quant": quantization,
        "slot_dtype": precision,
        "ops": structure["ops"],
        "anchor_params": anchor_params,
        "seconds": {"convert": round(time.perf_counter() - start, 2)},
    }


def _array_dtype_name(code: int) -> str:
    from coremltools.proto import FeatureTypes_pb2 as ft

    return ft.ArrayFeatureType.ArrayDataType.Name(code).lower()


def _features(features: Any) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, dtype) of spec features; a flexible (RangeDim) axis reads as -1."""
    seen = {}
    for feature in features:
        array = feature.type.multiArrayType if feature.type.HasField("multiArrayType") else None
        if array is None:  # a state wraps its array type
            array = feature.type.stateType.arrayType
        shape = list(array.shape)
        for axis, bounds in enumerate(array.shapeRange.sizeRanges):
            if bounds.lowerBound != bounds.upperBound:
                shape[axis] = -1
        seen[feature.name] = (shape, _array_dtype_name(array.dataType))
    return seen


def _expected(entries: list[dict[str, Any]], float_dtype: str) -> dict[str, tuple[list[int], str]]:
    """The manifest's I/O entries as Core ML sees them: int64 -> int32, floats in the package precision."""
    return {
        e["name"]: (
            [-1 if isinstance(d, str) else d for d in e["shape"]],
            "int32" if e["dtype"] == "int64" else float_dtype,
        )
        for e in entries
    }


def check_coreml_package(
    package: Path, contract: SlotContract, io: dict[str, Any], precision: str, anchor_params: int
) -> dict[str, Any]:
    """Structural verification: inputs, outputs and states (names, shapes, dtypes) vs the program's ``io``
    description; slot inputs read only by ``matmul``; op counts; weights no bigger than the anchor."""
    import coremltools as ct

    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    problems: list[str] = []
    want_float = "float16" if precision == "float16" else "float32"
    description = spec.description
    for kind, features in (("input", description.input), ("output", description.output), ("state", description.state)):
        expected = _expected(io.get(f"{kind}s", []), "float16" if kind == "state" else want_float)
        seen = _features(features)
        if list(seen) != list(expected):
            problems.append(f"{kind}s {list(seen)} differ from the program's {list(expected)}")
        for name, (shape, dtype) in expected.items():
            seen_shape, seen_dtype = seen.get(name, (shape, dtype))
            if seen_dtype != dtype or (kind != "output" and seen_shape != shape):
                problems.append(f"{kind} {name}: {seen[name]} != expected {(shape, dtype)}")
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


