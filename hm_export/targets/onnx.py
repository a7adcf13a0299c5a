"""ONNX emitter and ONNX Runtime runners.

The program is exported with the dynamo exporter from the slot-split ``ExportedProgram``: the slot
tensors are graph inputs carrying the contract's names, the anchor weights live in the external data
file ``{stem}.onnx.data``.  The runners bind the loader's slot buffers once with IOBinding; a block
swap overwrites those buffers in place, so nothing is re-bound or reallocated per context.  The decode
program's KV cache is explicit: ``past_*`` inputs and ``present_*`` outputs, bound to two preallocated
cache buffers that swap roles after every call (no cache is allocated or copied by the caller).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from hm_export.errors import ExportError
from hm_export.trace import SlotProgram

OPSET = 20
# Tensors the runners bind: tokens and positions, logits and caches, and every slot strategy's storage.


def emit_onnx(slot_program: SlotProgram, out_dir: Path, anchor_quant: str = "none") -> dict[str, Any]:
    """Write ``{stem}.onnx`` + ``{stem}.onnx.data`` into ``out_dir`` and check the graph's I/O names; a quantized
    ``anchor_quant`` preset then rewrites the anchor's weights (:mod:`hm_export.targets.onnx_quant`).  The
    returned ``_dequantized`` (for the caller, not the manifest) maps each quantized weight to its values."""
    import onnx

    from hm_export.anchor_quant import get_preset

    start = time.perf_counter()
    names = slot_program.input_names
    program_file = f"{slot_program.stem}.onnx"
    exported = torch.onnx.export(
        slot_program.program,
        args=slot_program.example_inputs,
        dynamo=True,
        input_names=names,
        output_names=slot_program.output_names,
        opset_version=OPSET,
        verbose=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    exported.save(str(out_dir / program_file), external_data=True)
    graph = onnx.load(str(out_dir / program_file), load_external_data=False).graph
    graph_inputs = [i.name for i in graph.input]
    if graph_inputs != names:
        raise ExportError(f"{out_dir / program_file}: inputs {graph_inputs} differ from the program's {names}")
    initializers = {i.name for i in graph.initializer}
    leaked = [n for n in slot_program.contract.input_names if n in initializers]
    if leaked:
        raise ExportError(f"{out_dir / program_file}: slot tensors stored as weights: {leaked}")
    preset = get_preset(anchor_quant)
    quantization: dict[str, Any] = {"preset": preset.name}
    if preset.quantized:
        from hm_export.targets.onnx_quant import quantize_anchor

        cfg = slot_program.outputs[0].shape[-1], slot_program.contract.d_model
        quantization = quantize_anchor(out_dir / program_file, preset, vocab=int(cfg[0]), d_model=cfg[1])
    return {
        "files": {"program": program_file, "data": f"{program_file}.data"},
        "opset": OPSET,
        "nodes": len(graph.node),
        "anchor_quant": {k: v for k, v in quantization.items() if k != "dequantized"},
        **({"_dequantized": quantization["dequantized"]} if "dequantized" in quantization else {}),
        "seconds": {"export": round(time.perf_counter() - start, 2)},
    }


