"""Check that the slot is read in place, by exactly the consumer its strategy declares (``ctx.slot_reader``).

Guarantees afterwards (or raises :class:`SlotPassError`), for every slot input:

* ``bmm`` (float32 slot): its only users are ``aten.bmm`` nodes taking it as the weight operand, so the
  program never copies, slices, views, transposes or casts the slot per call, and the runtime can bind the
  caller's buffers in place;
* ``memory_swiglu`` (fused quantized slot): its only users are ``hm_export::memory_swiglu`` nodes, which read
  the codes and scales directly;
* ``convert`` (float16 slot, in-graph dequantization): its only users are dtype conversions, the first step
  of the per-call dequantization; nothing else touches the stored form.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from hm_export.passes.base import SlotPassContext, SlotPassError

aten = torch.ops.aten
EXPECTED_READER = {
    "bmm": "as a bmm weight",
    "memory_swiglu": "by hm_export::memory_swiglu",
    "convert": "by a dtype conversion",
}


def _reads_correctly(reader: str, user: torch.fx.Node, node: torch.fx.Node) -> bool:
    if reader == "bmm":
        return user.target == aten.bmm.default and user.args[1] is node
    if reader == "memory_swiglu":
        return str(user.target).startswith("hm_export.memory_swiglu")
    if reader == "convert":  # export adds a metadata assertion (no compute) in front of each conversion
        return user.target in (aten.to.dtype, aten._to_copy.default, aten._assert_tensor_metadata.default)
    raise SlotPassError(f"unknown slot reader {reader!r}, expected one of {sorted(EXPECTED_READER)}")


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
            if not _reads_correctly(ctx.slot_reader, user, node):
                expected = EXPECTED_READER[ctx.slot_reader]
                problems.append(f"slot input {name!r} is read by {user.target} ({user.name}), not {expected}")
    if problems:
        raise SlotPassError("slot would be copied or reshaped per call: " + "; ".join(problems))
    ctx.notes["slot_reader"] = ctx.slot_reader
    return ep
