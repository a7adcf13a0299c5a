"""Expand tanh-approximated GELU into the elementwise ops of its formula.

ExecuTorch 1.5's XNNPACK partitioner delegates ``aten.gelu`` without looking at ``approximate`` and
XNNPACK computes the exact (erf) GELU, so a Gemma-style ``gelu(x, approximate="tanh")`` came back up to
4e-4 off in the logits of a two-layer model.  Guarantees afterwards: no ``aten.gelu`` with
``approximate="tanh"`` is left; each became ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))``
(what PyTorch's kernel computes) out of mul / add / tanh, which XNNPACK delegates exactly.  Exact GELU
(``approximate="none"``) is left alone.
"""

from __future__ import annotations

import math

import torch
from torch.export import ExportedProgram

from hm_export.passes.base import SlotPassContext, replace_matching_nodes

aten = torch.ops.aten
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
CUBIC = 0.044715


def _is_tanh_gelu(node: torch.fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target == aten.gelu.default
        and node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none") == "tanh"
    )


def _expanded(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    x = node.args[0]

    def emit(target: torch._ops.OpOverload, *args: object) -> torch.fx.Node:
        out = graph.call_function(target, args)
        out.meta["val"] = target(*(a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args))
        return out

    cube = emit(aten.mul.Tensor, emit(aten.mul.Tensor, x, x), x)
    inner = emit(aten.add.Tensor, x, emit(aten.mul.Tensor, cube, CUBIC))
    gate = emit(aten.add.Tensor, emit(aten.tanh.default, emit(aten.mul.Tensor, inner, SQRT_2_OVER_PI)), 1.0)
    return emit(aten.mul.Tensor, emit(aten.mul.Tensor, x, 0.5), gate)


def expand_tanh_gelu(ep: ExportedProgram, ctx: SlotPassContext) -> ExportedProgram:
    return replace_matching_nodes(ep, ctx, "tanh_gelus_expanded", _is_tanh_gelu, _expanded)
