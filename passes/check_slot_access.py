"""Check that the slot is read in place: every slot input feeds batched matmuls directly.

Guarantees afterwards (or raises :class:`SlotPassError`): each slot input's only users are
``aten.bmm`` nodes taking it as the weight operand, so the program never copies, slices, views,
transposes or casts the slot per call, and the runtime can bind the caller's buffers in place.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from hm_export.passes.base import SlotPassContext, SlotPassError

aten = torch.ops.aten


def check_slot_access(ep: ExportedProgram, ctx: SlotPassContext) -> ExportedProgram:
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    problems = []
    for name in ctx.slot_input_names:
        node = placeholders.get(name)
        if node is None:
            problems.append(f"slot input {name!r} is missing")
            continue
        if not node.users:
            problems.append(f"slot input {name!r} is unused")
        for user in node.users:
            if user.target != aten.bmm.default or user.args[1] is not node:
                problems.append(f"slot input {name!r} is read by {user.target} ({user.name}), not as a bmm weight")
    if problems:
        raise SlotPassError("slot would be copied or reshaped per call: " + "; ".join(problems))
    return ep
