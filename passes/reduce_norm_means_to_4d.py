"""Rewrite last-axis means of rank-3 tensors (RMSNorm statistics) as 4-D means over the two inner axes.

XNNPACK lowers ``mean.dim`` only for 4-D inputs averaged over axes (2, 3) with ``keepdim``; RMSNorm's
``x.pow(2).mean(-1, keepdim=True)`` on ``[B, T, d]`` therefore fell back to portable kernels and cut
the delegated graph in pieces at every norm.  Guarantees afterwards: every ``aten.mean.dim`` over the
last axis of a rank-3 tensor with ``keepdim=True`` is ``view [B, T, d, 1] -> mean(2, 3) -> view [B, T, 1]``,
which computes the same value (a dynamic ``T``, as in the decode program, is written ``-1`` in the views;
means with a dynamic batch or width are left as they are).
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from hm_export.passes.base import SlotPassContext

aten = torch.ops.aten


def _is_rank3_last_axis_mean(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target != aten.mean.dim:
        return False
    source = node.args[0].meta.get("val")
    dims = node.args[1]
    keepdim = len(node.args) > 2 and bool(node.args[2])
    return (
        source is not None
        and source.dim() == 3
        and list(dims) in ([-1], [2])
        and keepdim
        and "dtype" not in node.kwargs
    )


def reduce_norm_means_to_4d(ep: ExportedProgram, ctx: SlotPassContext) -> ExportedProgram:
    graph = ep.graph
    rewritten = 0
    for node in list(graph.nodes):
        if not _is_rank3_last_axis_mean(node):
            continue
        source = node.args[0]
        batch, seq, width = source.meta["val"].shape
        if not isinstance(batch, int) or not isinstance(width, int):
            continue  # only a dynamic sequence axis can be left to the view (as -1)
        rows = seq if isinstance(seq, int) else -1
        with graph.inserting_before(node):
            as_4d = graph.call_function(aten.view.default, (source, [batch, rows, width, 1]))
            as_4d.meta["val"] = source.meta["val"].view(batch, seq, width, 1)
            mean = graph.call_function(aten.mean.dim, (as_4d, [2, 3], True))
            mean.meta["val"] = as_4d.meta["val"].mean(dim=(2, 3), keepdim=True)
            back = graph.call_function(aten.view.default, (mean, [batch, rows, 1]))
            back.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(back)
        graph.erase_node(node)
        rewritten += 1
    graph.lint()
    ep.graph_module.recompile()
    ctx.notes["norm_means_rewritten"] = rewritten
    return ep
