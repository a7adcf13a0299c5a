"""Fold every subgraph that depends only on constants (causal mask, RoPE tables, their slices and tiles).

Guarantees afterwards: no op whose inputs are all parameters, buffers or constants is left in the
graph, so masks and RoPE tables are precomputed once at export instead of rebuilt on every call.
The slot is made of user inputs, so nothing that reads it is folded; run this after the lift.
"""

from __future__ import annotations

from torch.export import ExportedProgram

from hm_export.passes.base import SlotPassContext


def fold_constant_subgraphs(ep: ExportedProgram, ctx: SlotPassContext) -> ExportedProgram:
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    before = len(ep.graph.nodes)
    ep = constant_prop_pass(ep)
    ctx.notes["folded_nodes"] = before - len(ep.graph.nodes)
    return ep
