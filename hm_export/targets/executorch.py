"""ExecuTorch emitter: lower the slot program to XNNPACK and write ``.pte`` (and optionally ``.ptd``).

The slot matmuls are ``bmm`` nodes, which XNNPACK delegates without
``force_non_static_weights_for_f32_linear``; the anchor's weights therefore stay static (pre-packed
once at load).  The partitioner applies that flag per node, only to matmuls fed by the slot
(:mod:`hm_export.kernels.partition`), never globally.  After lowering we check that every slot input
of a float32 slot is consumed by a delegate, so a slot matmul silently falling back to portable kernels
fails the export instead of shipping slow (the quantized slot strategies read it outside XNNPACK by
design: the kernels or in-graph dequantization, recorded in the delegation summary).
The runtime binds the caller's input buffers (``alloc_graph_input=False``): a block swap overwrites
those buffers and the next call sees it without any copy.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from hm_export.errors import ExportError
from hm_export.passes.base import SlotPassError
from hm_export.trace import WINDOW_STEM, SlotProgram

# The decode program's second method (trace.SlotProgram.prefill): same inputs as ``forward``, the last position's
# logits; both methods read one copy of the weights (ExecuTorch stores equal constants once) and one KV cache
# (shared mutable buffers: a runtime loads them with shared memory arenas).
PREFILL_METHOD = "prefill"
DATA_TAG = "anchor"  # the full-window program's .ptd stem; one tag for delegated and portable constants


def _data_tag(slot_program: SlotProgram) -> str:
    """The .ptd stem: ``anchor`` for the full-window program, the program's own stem for the others (each
    program's constants are keyed by that program, so every program carries its own data file)."""
    return DATA_TAG if slot_program.stem == WINDOW_STEM else slot_program.stem


def _tag_constants_for_data_file(slot_program: SlotProgram) -> torch.export.ExportedProgram:
    """Re-export with every constant tagged for the external ``anchor.ptd`` (program-data separation)."""
    from executorch.exir.passes.external_constants_pass import delegate_external_constants_pass_unlifted

    module = slot_program.program.module()
    tag = _data_tag(slot_program)
    delegate_external_constants_pass_unlifted(module=module, gen_tag_fn=lambda _node: tag)
    with torch.no_grad():
        return torch.export.export(
            module, slot_program.example_inputs, dynamic_shapes=slot_program.dynamic_shapes, strict=False
        )


def _delegation_summary(
    edge_program: torch.export.ExportedProgram, slot_names: list[str], slot_reader: str
) -> dict[str, Any]:
    """XNNPACK's share of the program.  A float32 slot (``slot_reader`` ``bmm``) must be read only by delegates;
    other slot strategies read it with portable conversions or the hm_export kernels, recorded per input."""
    from executorch.devtools.backend_debug import get_delegation_info

    graph_module = edge_program.graph_module
    info = get_delegation_info(graph_module)
    placeholders = {n.name: n for n in graph_module.graph.nodes if n.op == "placeholder"}
    not_delegated = {
        name: sorted({_op_name(u.target) for u in placeholders[name].users if "call_delegate" not in str(u.target)})
        for name in slot_names
    }
    not_delegated = {k: v for k, v in not_delegated.items() if v}
    if not_delegated and slot_reader == "bmm":
        raise SlotPassError(f"slot inputs read outside XNNPACK (portable fallback): {not_delegated}")
    return {
        "backend": "xnnpack",
        "delegated_subgraphs": info.num_delegated_subgraphs,
        "delegated_nodes": info.num_delegated_nodes,
        "non_delegated_nodes": info.num_non_delegated_nodes,
        "non_delegated_ops": {
            op: b.non_delegated
            for op, b in sorted(info.delegation_by_operator.items())
            if b.non_delegated and op != "getitem"
        },
        "slot_inputs_delegated": not not_delegated,
        **({"slot_read_outside_xnnpack": not_delegated} if not_delegated else {}),
    }


def _op_name(target: Any) -> str:
    """``namespace::op`` of an (edge) operator, else its string form."""
    return target.name() if callable(getattr(target, "name", None)) else str(target)


CUSTOM_OP_NAMESPACES = ("hm_export::", "quantized_decomposed::")  # kernels outside the default runtime


def _custom_ops(edge_program: torch.export.ExportedProgram) -> list[str]:
    """The operators the program calls whose kernels must be loaded before it runs: the hm_export kernels, and
    ExecuTorch's quantized kernels (a quantized embedding); an op that mutates its inputs (``attend_cache``)
    appears wrapped in ``auto_functionalized`` until ``to_executorch``."""
    names = set()
    for node in edge_program.graph.nodes:
        if node.op == "call_function":
            functionalized = "auto_functionalized" in str(node.target) and node.args
            names.add(_op_name(node.args[0] if functionalized else node.target))
    return sorted(name for name in names if name.startswith(CUSTOM_OP_NAMESPACES))


def emit_executorch(slot_program: SlotProgram, out_dir: Path, separate_weights: bool = False) -> dict[str, Any]:
    """Lower to XNNPACK and write ``{stem}.pte`` (+ its ``.ptd`` when ``separate_weights``) into ``out_dir``.

    The full-window program is ``model.pte`` (+ ``anchor.ptd``), the decode program ``decode.pte`` (+
    ``decode.ptd``); the decode program's KV cache becomes mutable buffers that live in the method's
    planned memory across calls. A decode program with a :attr:`SlotProgram.prefill` gets it as the method
    :data:`PREFILL_METHOD`, sharing ``forward``'s constants and KV cache.
    """
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    from hm_export.kernels.partition import slot_weight_partitioner

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    methods = {"forward": slot_program}
    if slot_program.prefill is not None:
        methods[PREFILL_METHOD] = slot_program.prefill
    programs = {
        name: _tag_constants_for_data_file(method) if separate_weights else method.program
        for name, method in methods.items()
    }
    # Only slot-fed matmuls may take XNNPACK's non-static-weight path: the anchor's weights stay pre-packed.
    partitioner = slot_weight_partitioner(slot_program.contract.input_names)
    edge = to_edge_transform_and_lower(programs, partitioner=[partitioner])
    seconds["lower"] = time.perf_counter() - start
    slot_reader = str(slot_program.notes.get("slot_reader", "bmm"))
    delegation = _delegation_summary(edge.exported_program("forward"), slot_program.contract.input_names, slot_reader)
    custom_ops = sorted({op for name in methods for op in _custom_ops(edge.exported_program(name))})

    start = time.perf_counter()
    tag = _data_tag(slot_program)
    config = ExecutorchBackendConfig(
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=len(methods) > 1),
        external_constants=(lambda _node: tag) if separate_weights else False,
    )
    et_program = edge.to_executorch(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"program": f"{slot_program.stem}.pte"}
    (out_dir / files["program"]).write_bytes(et_program.buffer)
    if separate_weights:
        et_program.write_tensor_data_to_file(str(out_dir))
        files["data"] = f"{tag}.ptd"
        if not (out_dir / files["data"]).is_file():
            raise ExportError(f"ExecuTorch did not write {out_dir / files['data']}")
    seconds["emit"] = time.perf_counter() - start
    return {
        "runtime": "executorch",
        "backend": "xnnpack",
        "files": files,
        "delegation": delegation,
        **({"custom_ops": custom_ops} if custom_ops else {}),
        **({"prefill_method": PREFILL_METHOD} if PREFILL_METHOD in methods else {}),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }


def emit_executorch_coreml(slot_program: SlotProgram, out_dir: Path) -> dict[str, Any]:
    """Lower the whole program to ExecuTorch's Core ML delegate (runs on Apple devices only)."""
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner
    from executorch.exir import to_edge_transform_and_lower

    start = time.perf_counter()
    edge = to_edge_transform_and_lower(slot_program.program, partitioner=[CoreMLPartitioner()])
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(edge.exported_program().graph_module)
    et_program = edge.to_executorch()
    out_dir.mkdir(parents=True, exist_ok=True)
    program_file = f"{slot_program.stem}.pte"
    (out_dir / program_file).write_bytes(et_program.buffer)
    return {
        "runtime": "executorch",
        "backend": "coreml",
        "files": {"program": program_file},
        "delegation": {
            "backend": "coreml",
            "delegated_subgraphs": info.num_delegated_subgraphs,
            "delegated_nodes": info.num_delegated_nodes,
            "non_delegated_nodes": info.num_non_delegated_nodes,
        },
        "runs_on": "Apple devices only (CoreMLBackend is not registered in Linux runtimes)",
        "seconds": {"lower": round(time.perf_counter() - start, 2)},
    }
