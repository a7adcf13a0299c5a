"""Fold every subgraph that depends only on constants (causal mask, RoPE tables, their slices and tiles).

Guarantees afterwards: no op whose inputs are all parameters, buffers or constants is left in the
graph, so masks and RoPE tables are precomputed once at export instead of rebuilt on every call.
The slot is made of user inputs, so nothing that reads it is folded; run this after the lift.

Plain torch (what ExecuTorch's ``constant_prop_pass`` does for lifted programs, written here so the ONNX and
Core ML targets need no ExecuTorch install): the constant placeholders (parameters, buffers that are never
mutated, lifted tensor constants) seed a walk in graph order; a pure ``call_function`` node whose arguments
are all constant is run on the real tensors.  Each folded node still read by a non-constant node becomes a
new lifted tensor constant (a placeholder before the user inputs, with its ``InputSpec``); folded nodes and
constant placeholders nobody reads any more are removed with their stored tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.exported_program import InputKind, InputSpec, TensorArgument
from torch.utils import _pytree as pytree

from hm_export.passes.base import SlotPassContext

_LITERALS = (bool, int, float, str, torch.dtype, torch.device, torch.layout, torch.memory_format, type(None))
PREFIX = "_folded_constant"


def _constant_inputs(ep: ExportedProgram) -> dict[torch.fx.Node, torch.Tensor]:
    """Placeholder -> tensor for parameters, never-mutated buffers and lifted tensor constants."""
    signature = ep.graph_signature
    mutated = set(signature.buffers_to_mutate.values())
    out: dict[torch.fx.Node, torch.Tensor] = {}
    for node in ep.graph.find_nodes(op="placeholder"):
        if node.name in signature.inputs_to_parameters:
            out[node] = ep.state_dict[signature.inputs_to_parameters[node.name]]
        elif node.name in signature.inputs_to_buffers and signature.inputs_to_buffers[node.name] not in mutated:
            name = signature.inputs_to_buffers[node.name]
            out[node] = ep.state_dict[name] if name in ep.state_dict else ep.constants[name]
        elif node.name in signature.inputs_to_lifted_tensor_constants:
            out[node] = ep.constants[signature.inputs_to_lifted_tensor_constants[node.name]]
    return out


def _all_constant(value: Any, known: dict[torch.fx.Node, torch.Tensor]) -> bool:
    return all(
        (leaf in known) if isinstance(leaf, torch.fx.Node) else isinstance(leaf, _LITERALS)
        for leaf in pytree.tree_leaves(value)
    )


def _fold(ep: ExportedProgram) -> dict[torch.fx.Node, Any]:
    known: dict[torch.fx.Node, Any] = dict(_constant_inputs(ep))
    output = ep.graph.find_nodes(op="output")[0]
    for node in ep.graph.nodes:
        if node.op != "call_function" or node.is_impure() or output in node.users:  # outputs stay computed
            continue
        if not _all_constant((node.args, node.kwargs), known):
            continue
        args, kwargs = pytree.tree_map_only(torch.fx.Node, known.__getitem__, (node.args, node.kwargs))
        with torch.no_grad():
            value = node.target(*args, **kwargs)
        if isinstance(value, torch.Tensor) and 0 in value.stride():
            value = value.contiguous()  # a broadcast view: store real data
        known[node] = value
    return known


def _drop(ep: ExportedProgram, node: torch.fx.Node) -> None:
    """Remove a constant placeholder and the tensor stored for it."""
    signature = ep.graph_signature
    tables = (signature.inputs_to_parameters, signature.inputs_to_buffers, signature.inputs_to_lifted_tensor_constants)
    for table in tables:
        if node.name in table:
            ep.state_dict.pop(table[node.name], None)
            ep.constants.pop(table[node.name], None)
    ep.graph.erase_node(node)


def fold_constant_subgraphs(ep: ExportedProgram, ctx: SlotPassContext) -> ExportedProgram:
    before = len(ep.graph.nodes)
    known = _fold(ep)
    specs = {spec.arg.name: spec for spec in ep.graph_signature.input_specs}
    placeholders = list(ep.graph.find_nodes(op="placeholder"))
    fake_mode = detect_fake_mode(tuple(node.meta["val"] for node in placeholders if "val" in node.meta))
    first_user_input = next(node for node in placeholders if node.name in ep.graph_signature.user_inputs)
    for node, value in reversed(list(known.items())):  # users before the nodes they read
        if all(user in known for user in node.users):
            if node.op == "placeholder":
                _drop(ep, node)
            else:
                ep.graph.erase_node(node)
            continue
        if node.op == "placeholder" or not isinstance(value, torch.Tensor):
            continue
        name = f"{PREFIX}{len(ep.constants)}"
        while name in ep.constants:
            name += "_"
        ep.constants[name] = value
        with ep.graph.inserting_before(first_user_input):
            placeholder = ep.graph.placeholder(name)
        placeholder.meta.update(node.meta)
        placeholder.meta["val"] = fake_mode.from_tensor(value, static_shapes=True) if fake_mode else value
        node.replace_all_uses_with(placeholder)
        ep.graph.erase_node(node)
        specs[placeholder.name] = InputSpec(
            InputKind.CONSTANT_TENSOR, TensorArgument(placeholder.name), target=name, persistent=True
        )
    ep.graph_signature.input_specs = [specs[node.name] for node in ep.graph.find_nodes(op="placeholder")]
    ep.graph.eliminate_dead_code()
    ep.graph_module.recompile()
    ctx.notes["folded_nodes"] = before - len(ep.graph.nodes)
    return ep
