"""The ONNX mapping of ``--anchor-quant``: ONNX Runtime's weight-only quantizers on the emitted program.

:func:`quantize_anchor` rewrites the anchor's ``MatMul`` nodes whose weight is an initializer into
``MatMulNBits`` (int4 or int8 codes, one float scale per block along the input axis, symmetric) and the token
embedding's ``Gather`` into ``GatherBlockQuantized`` (int4 only in this ONNX Runtime; an 8-bit embedding stays
float32), with ``onnxruntime.quantization.MatMulNBitsQuantizer``.  Activations stay float32.  The slot matmuls
read graph inputs, not initializers, so they are never touched; the RoPE, mask and other table lookups are
excluded by name.  ``MatMulNBits`` takes power-of-two blocks of at least 16: a preset group that is not one
(or "per channel") uses blocks of 128 (ONNX Runtime pads the input axis to a whole block).

:func:`as_exported` gives the eager model that computes what the quantized program computes: each quantized
weight replaced by the values ONNX Runtime dequantizes (obtained by running each rewritten node alone on an
identity / every index), matched to the model's parameters by their float values.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hm_export.anchor_quant import AnchorQuant, WeightQuant
from hm_export.architectures import MemoryModel
from hm_export.model import TiedHead

NBITS_DOMAIN = "com.microsoft"


def _block(quant: WeightQuant) -> int:
    group = quant.group
    return group if group >= 16 and group & (group - 1) == 0 else 128


def _fingerprint(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def quantize_anchor(program: Path, preset: AnchorQuant, vocab: int, d_model: int) -> dict[str, Any]:
    """Quantize ``program`` (``.onnx`` + its ``.data``) in place; returns the manifest's description and, under
    ``"dequantized"`` (popped by the caller), fingerprint of each original weight -> its dequantized values."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = onnx.load(str(program))
    graph = model.graph
    for index, node in enumerate(graph.node):  # the quantizer selects nodes by name
        if not node.name:
            node.name = f"hm_node_{index}"
    initializers = {i.name: i for i in graph.initializer}
    shapes = {name: tuple(i.dims) for name, i in initializers.items()}
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and len(shapes.get(n.input[1], ())) == 2]
    head = [n.name for n in matmuls if shapes[n.input[1]] == (d_model, vocab)]
    linears = [n.name for n in matmuls if n.name not in head]
    gathers = [n for n in graph.node if n.op_type == "Gather" and shapes.get(n.input[0]) == (vocab, d_model)]
    embedding = [n.name for n in gathers]
    originals = {n.name: n.input[1] for n in matmuls} | {n.name: n.input[0] for n in gathers}
    description: dict[str, Any] = {"preset": preset.name, "activations": "float32 (weight-only quantization)"}
    passes: list[tuple[str, list[str], WeightQuant | None]] = [
        ("linears", linears, preset.linears),
        ("head", head, preset.head),
        ("embedding", embedding, preset.embedding if preset.embedding and preset.embedding.bits == 4 else None),
    ]
    arrays = {name: onnx.numpy_helper.to_array(initializers[name]) for name in originals.values()}
    for role, names, quant in passes:
        if quant is None or not names:
            if role == "embedding" and preset.embedding is not None:
                description[role] = "float32 (ONNX Runtime's GatherBlockQuantized quantizer is int4 only)"
            continue
        config = DefaultWeightOnlyQuantConfig(
            block_size=_block(quant),
            is_symmetric=True,
            bits=quant.bits,
            op_types_to_quantize=("Gather",) if role == "embedding" else ("MatMul",),
            quant_axes=(("MatMul", 0), ("Gather", 1)),
        )
        # The quantizer takes a node if it is included OR of a listed type: exclude every other node by name.
        others = [n.name for n in model.graph.node if n.name not in set(names)]
        quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=others, algo_config=config)
        quantizer.process()
        model = quantizer.model.model
        kind = "GatherBlockQuantized" if role == "embedding" else "MatMulNBits"
        description[role] = {"weights": f"int{quant.bits} blocks of {_block(quant)}", "op": kind, "nodes": len(names)}
    description["dequantized"] = _dequantized(model, originals, arrays, vocab)
    if head and embedding:
        description["tied_embedding"] = "stored twice: the Gather's table and the head's MatMul weight"
    data = program.name + ".data"
    (program.parent / data).unlink(missing_ok=True)
    onnx.save_model(model, str(program), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024)  # fmt: skip
    return description


def _dequantized(model: Any, originals: dict[str, str], arrays: dict[str, np.ndarray], vocab: int) -> dict[str, Any]:
    """Fingerprint of each quantized original weight -> the float values its rewritten node computes with."""
    import onnx

    initializers = {i.name: i for i in model.graph.initializer}
    out: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        source = next((originals[n] for n in originals if node.name.startswith(n + "_Q")), None)
        if source is None:
            continue
        original = arrays[source]
        if node.op_type == "MatMulNBits":
            rows = original.shape[0]
            probe = ("A", np.eye(rows, dtype=np.float32))
        else:
            probe = ("indices", np.arange(vocab, dtype=np.int64))
        values = _run_alone(node, initializers, probe, onnx)
        out[_fingerprint(original)] = values.reshape(original.shape)
    return out


def _run_alone(node: Any, initializers: dict[str, Any], probe: tuple[str, np.ndarray], onnx: Any) -> np.ndarray:
    """Run ``node`` alone with its initializers, feeding ``probe`` as its one non-initializer input."""
    import onnxruntime as ort

    name, value = probe
    inputs = list(node.input)
    data_input = next(i for i in inputs if i not in initializers)
    single = onnx.helper.make_node(node.op_type, [name if i == data_input else i for i in inputs], ["Y"],
                                   domain=node.domain, **{a.name: onnx.helper.get_attribute_value(a)
                                                          for a in node.attribute})  # fmt: skip
    elem = onnx.TensorProto.FLOAT if value.dtype == np.float32 else onnx.TensorProto.INT64
    graph = onnx.helper.make_graph(
        [single], "probe", [onnx.helper.make_tensor_value_info(name, elem, list(value.shape))],
        [onnx.helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
        [initializers[i] for i in inputs if i in initializers and i],
    )  # fmt: skip
    opsets = [onnx.helper.make_opsetid("", 20), onnx.helper.make_opsetid(NBITS_DOMAIN, 1)]
    session = ort.InferenceSession(onnx.helper.make_model(graph, opset_imports=opsets).SerializeToString())
    return session.run(None, {name: value})[0]


@torch.no_grad()
def as_exported(model: MemoryModel, dequantized: dict[str, np.ndarray]) -> MemoryModel:
    """A copy of ``model`` whose quantized weights hold ONNX Runtime's dequantized values (linear weights are
    stored transposed in the program; the embedding as is)."""
    clone = copy.deepcopy(model)
    found = []  # (parent, name, module, key): every match first, since a tied head reads the embedding's weight
    for parent in list(clone.modules()):  # type: ignore[attr-defined]
        for name, module in parent.named_children():
            if isinstance(module, (nn.Linear, TiedHead)):  # stored transposed: MatMul(x, W^T)
                key = _fingerprint(module.weight.detach().numpy().T)
            elif isinstance(module, nn.Embedding):
                key = _fingerprint(module.weight.detach().numpy())
            else:
                continue
            if key in dequantized:
                found.append((parent, name, module, key))
    for parent, name, module, key in found:
        if isinstance(module, nn.Embedding):
            module.weight = nn.Parameter(torch.from_numpy(dequantized[key].copy()), requires_grad=False)
        else:  # a tied head becomes its own (dequantized) linear
            linear = nn.Linear(module.weight.shape[1], module.weight.shape[0], bias=False)
            linear.weight = nn.Parameter(torch.from_numpy(dequantized[key].T.copy()), requires_grad=False)
            setattr(parent, name, linear)
    if len(found) != len(dequantized):
        raise RuntimeError(f"matched {len(found)} of {len(dequantized)} quantized ONNX weights to the model's weights")
    return clone
