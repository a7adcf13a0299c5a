"""ONNX emitter and ONNX Runtime runner.

The program is exported with the dynamo exporter from the slot-split ``ExportedProgram``: the slot
tensors are graph inputs carrying the contract's names, the anchor weights live in the external data
file ``model.onnx.data``.  The runner binds the loader's slot buffers once with IOBinding; a block
swap overwrites those buffers in place, so nothing is re-bound or reallocated per context.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hm_export.slot import LOGITS_OUTPUT, TOKENS_INPUT
from hm_export.trace import SlotProgram

PROGRAM_FILE = "model.onnx"
OPSET = 20


def emit_onnx(slot_program: SlotProgram, out_dir: Path) -> dict[str, Any]:
    """Write ``model.onnx`` + ``model.onnx.data`` into ``out_dir`` and check the graph's I/O names."""
    import onnx

    start = time.perf_counter()
    names = [TOKENS_INPUT, *slot_program.contract.input_names]
    exported = torch.onnx.export(
        slot_program.program,
        args=slot_program.example_inputs,
        dynamo=True,
        input_names=names,
        output_names=[LOGITS_OUTPUT],
        opset_version=OPSET,
        verbose=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    exported.save(str(out_dir / PROGRAM_FILE), external_data=True)
    graph = onnx.load(str(out_dir / PROGRAM_FILE), load_external_data=False).graph
    graph_inputs = [i.name for i in graph.input]
    if graph_inputs != names:
        raise RuntimeError(f"{out_dir / PROGRAM_FILE}: inputs {graph_inputs} differ from the slot contract {names}")
    initializers = {i.name for i in graph.initializer}
    leaked = [n for n in slot_program.contract.input_names if n in initializers]
    if leaked:
        raise RuntimeError(f"{out_dir / PROGRAM_FILE}: slot tensors stored as weights: {leaked}")
    return {
        "files": {"program": PROGRAM_FILE, "data": f"{PROGRAM_FILE}.data"},
        "opset": OPSET,
        "nodes": len(graph.node),
        "seconds": {"export": round(time.perf_counter() - start, 2)},
    }


class OnnxRunner:
    """ONNX Runtime session whose slot inputs are bound once to the caller's buffers (IOBinding)."""

    def __init__(self, program: Path, slot_names: list[str], threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(program), options, providers=["CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        self.slot_names = slot_names
        self._bound: list[int] = []

    def _bind_slot(self, slot: list[torch.Tensor]) -> None:
        for name, tensor in zip(self.slot_names, slot):
            if not tensor.is_contiguous() or tensor.dtype != torch.float32:
                raise ValueError(f"slot input {name} must be a contiguous float32 tensor")
            self.binding.bind_input(name, "cpu", 0, np.float32, list(tensor.shape), tensor.data_ptr())
        self._bound = [t.data_ptr() for t in slot]

    def __call__(self, tokens: torch.Tensor, slot: list[torch.Tensor]) -> torch.Tensor:
        if [t.data_ptr() for t in slot] != self._bound:  # first call, or the caller swapped buffers
            self._bind_slot(slot)
        tokens = tokens.contiguous()
        self.binding.bind_input(TOKENS_INPUT, "cpu", 0, np.int64, list(tokens.shape), tokens.data_ptr())
        self.binding.bind_output(LOGITS_OUTPUT, "cpu")
        self.session.run_with_iobinding(self.binding)
        return torch.from_numpy(self.binding.copy_outputs_to_cpu()[0])
