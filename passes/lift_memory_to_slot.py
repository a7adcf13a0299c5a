"""Lift the declared memory parameters into graph inputs (the slot).

Guarantees afterwards: every parameter named in ``ctx.memory_parameters`` is a ``USER_INPUT``
placeholder named after ``ctx.slot_input_names`` (same order), placed after the program's original
user inputs; its tensor is gone from the state dict; the program's call signature takes
``(*original_inputs, *slot)``.  Parameters are selected by the model's declaration, never by name
patterns, and a declared name that is not a parameter of the program is an error.
"""

from __future__ import annotations

from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument
from torch.utils import _pytree as pytree

from hm_export.passes.base import SlotPassContext, SlotPassError


def lift_memory_to_slot(ep: ExportedProgram, ctx: SlotPassContext) -> ExportedProgram:
    specs = ep.graph_signature.input_specs
    by_target = {s.target: s for s in specs if s.kind in (InputKind.PARAMETER, InputKind.BUFFER)}
    missing = [name for name in ctx.memory_parameters if name not in by_target]
    if missing:
        raise SlotPassError(f"declared memory parameters are not parameters of the exported program: {missing}")
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    memory_args = {by_target[name].arg.name: slot for name, slot in zip(ctx.memory_parameters, ctx.slot_input_names)}

    kept = [s for s in specs if s.arg.name not in memory_args and s.kind != InputKind.USER_INPUT]
    users = [s for s in specs if s.kind == InputKind.USER_INPUT]
    slot_specs = []
    for name in ctx.memory_parameters:
        node = placeholders[by_target[name].arg.name]
        node.name = node.target = memory_args[node.name]
        slot_specs.append(InputSpec(InputKind.USER_INPUT, TensorArgument(name=node.name), target=None))

    # Placeholders must appear in signature order: non-user inputs, user inputs, then the slot.
    order = [s.arg.name for s in kept + users + slot_specs]
    first_op = next(n for n in ep.graph.nodes if n.op != "placeholder")
    nodes_by_name = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for name in order:
        first_op.prepend(nodes_by_name[name])
    ep.graph.lint()
    ep.graph_module.recompile()

    state_dict = {k: v for k, v in ep.state_dict.items() if k not in set(ctx.memory_parameters)}
    signature = ExportGraphSignature(
        input_specs=kept + users + slot_specs, output_specs=ep.graph_signature.output_specs
    )
    example_user_inputs = tuple(nodes_by_name[s.arg.name].meta["val"] for s in users + slot_specs)
    in_spec = pytree.tree_flatten((example_user_inputs, {}))[1]
    call_graph = [entry for entry in ep.module_call_graph]
    root_signature = call_graph[0].signature
    if root_signature is not None:
        root_signature.in_spec = in_spec
        root_signature.inputs = [TensorArgument(name=s.arg.name) for s in users + slot_specs]
        if root_signature.forward_arg_names is not None:
            root_signature.forward_arg_names = [*root_signature.forward_arg_names, *ctx.slot_input_names]
    return ExportedProgram(
        root=ep.graph_module,
        graph=ep.graph,
        graph_signature=signature,
        state_dict=state_dict,
        range_constraints=ep.range_constraints,
        module_call_graph=call_graph,
        example_inputs=None,
        constants=ep.constants,
        verifiers=ep.verifiers,
    )
