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

from hm_export.passes.base import SlotPassContext, replace_matching_nodes

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


def _as_4d_mean(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node | None:
    source = node.args[0]
    batch, seq, width = source.meta["val"].shape
    if not isinstance(batch, int) or not isinstance(width, int):
        return None  # only a dynamic sequence axis can be left to the view (as -1)
    rows = seq if isinstance(seq, int) else -1
    as_4d = graph.call_function(aten.view.default, (source, [batch, rows, width, 1]))
    as_4d.meta["val"] = source.meta["val"].view(batch, seq, width, 1)
    mean = graph.call_function(aten.mean.dim, (as_4d, [2, 3], True))
    mean.meta["val"] = as_4d.meta["val"].mean(dim=(2, 3), keepdim=True)
    back = graph.call_function(aten.view.default, (mean, [batch, rows, 1]))
    back.meta["val"] = node.meta["val"]
    return back


def reduce_norm_means_to_4d(ep: ExportedProgram, ctx: SlotPassContext) -> ExportedProgram:
    return replace_matching_nodes(ep, ctx, "norm_means_rewritten", _is_rank3_last_axis_mean, _as_4d_mean)
