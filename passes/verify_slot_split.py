"""Verify the anchor / slot split.

Guarantees afterwards (or raises :class:`SlotPassError`): every declared memory parameter is a user
input (none is left in the state dict, among the constants, or as a parameter/buffer placeholder);
every declared anchor parameter is still a parameter of the program (none became an input); the
slot inputs are exactly ``ctx.slot_input_names`` in that order, after the original user inputs.
"""

from __future__ import annotations

from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from hm_export.passes.base import SlotPassContext, SlotPassError


def verify_slot_split(ep: ExportedProgram, ctx: SlotPassContext) -> ExportedProgram:
    sig = ep.graph_signature
    problems = []
    constant_names = set(ep.state_dict) | set(ep.constants)
    for name in ctx.memory_parameters:
        if name in constant_names:
            problems.append(f"bank weight {name!r} is still a constant of the program")
    params = {s.target for s in sig.input_specs if s.kind in (InputKind.PARAMETER, InputKind.BUFFER)}
    problems += [f"bank weight {name!r} is still a parameter" for name in ctx.memory_parameters if name in params]
    problems += [
        f"anchor weight {name!r} is not a static parameter" for name in ctx.anchor_parameters if name not in params
    ]
    user_inputs = [s.arg.name for s in sig.input_specs if s.kind == InputKind.USER_INPUT]
    slot_tail = user_inputs[len(user_inputs) - len(ctx.slot_input_names) :]
    if slot_tail != ctx.slot_input_names:
        problems.append(f"slot inputs are {slot_tail}, expected {ctx.slot_input_names}")
    if problems:
        raise SlotPassError("anchor/slot split is wrong: " + "; ".join(problems))
    ctx.notes["slot_inputs"] = len(ctx.slot_input_names)
    ctx.notes["anchor_parameters"] = len(ctx.anchor_parameters)
    return ep
