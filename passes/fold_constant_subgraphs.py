"""Fold every subgraph that depends only on constants (causal mask, RoPE tables, their slices and tiles).

Guarantees afterwards: no op whose inputs are all parameters, buffers or constants is left in the
graph, so masks and RoPE tables are precomputed once at export instead of rebuilt on every call; except the
dequantization of quantized anchor weights (``--anchor-quant``): a weight's codes and scales stay as they are,
so the backend sees the quantized pattern (XNNPACK's ``qd8`` GEMMs) and stores the codes, not float weights.
The slot is made of user inputs, so nothing that reads it is folded; run this after the lift.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.export import ExportedProgram

from hm_export.passes.base import SlotPassContext


def _quantization_ops() -> set[Any]:
    """The (de)quantization ops of torchao's and ExecuTorch's quantized weights that must not be folded."""
    ops: set[Any] = set()
    for namespace, names in (
        ("torchao", ("dequantize_affine", "quantize_affine", "choose_qparams_affine")),
        ("quantized_decomposed", ("dequantize_per_channel_group", "dequantize_per_channel", "dequantize_per_token")),
    ):
        for name in names:
            packet = getattr(getattr(torch.ops, namespace), name, None)
            if packet is not None:
                ops.update(getattr(packet, overload) for overload in packet.overloads())
    return ops


def fold_constant_subgraphs(ep: ExportedProgram, ctx: SlotPassContext) -> ExportedProgram:
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass, get_default_skip_targets_no_quant

    before = len(ep.graph.nodes)
    ep = constant_prop_pass(ep, custom_skip_targets=get_default_skip_targets_no_quant() | _quantization_ops())
    ctx.notes["folded_nodes"] = before - len(ep.graph.nodes)
    return ep
