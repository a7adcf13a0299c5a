"""XNNPACK partitioning that treats only slot tensors as non-static weights.

XNNPACK delegates a ``linear`` / ``addmm`` / ``mm`` only when its weight is a constant, unless the global
``force_non_static_weights_for_f32_linear`` flag is set; that flag applies to *every* float matmul, so the
anchor's constant weights are then fed to the delegate as inputs and re-packed on every call.  The rule here
decides per node instead: a matmul whose weight is computed from a slot input (directly, or through a
transpose or an in-graph dequantization) takes the non-static path; every other matmul keeps its weight
static, pre-packed once at load.  The memory FFN of :mod:`hm_export.model` uses ``bmm``, which XNNPACK
delegates without the flag, so the rule matters for memory written as ``linear`` / ``mm`` (the brief's
"memory linear" form; see docs/kernels.md); for the shipped programs it is a no-op that keeps them so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def reads_slot(node: torch.fx.Node, slot_inputs: frozenset[str]) -> bool:
    """Whether ``node`` is computed from one of the placeholders named in ``slot_inputs``."""
    seen, todo = {node}, [node]
    while todo:
        current = todo.pop()
        if current.op == "placeholder":
            if current.name in slot_inputs:
                return True
            continue
        for source in current.all_input_nodes:
            if source not in seen:
                seen.add(source)
                todo.append(source)
    return False


class _SlotWeightRule:
    """Mixin over an XNNPACK GEMM config: the non-static-weight path only for weights read from the slot."""

    slot_inputs: frozenset[str] = frozenset()
    weight_idx: int

    def get_deps(self, node: torch.fx.Node, ep: Any) -> Any:
        from executorch.backends.xnnpack.utils.utils import get_input_node

        weight = get_input_node(node, self.weight_idx)
        self.force_non_static_weights_for_f32_linear = reads_slot(weight, self.slot_inputs)
        return super().get_deps(node, ep)  # type: ignore[misc]


def slot_weight_partitioner(slot_inputs: Sequence[str]) -> Any:
    """An ``XnnpackPartitioner`` whose linear/addmm/mm configs apply :class:`_SlotWeightRule` for ``slot_inputs``."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.gemm_configs import AddmmConfig, LinearConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    names = frozenset(slot_inputs)
    configs = [
        type(f"Slot{config.__name__}", (_SlotWeightRule, config), {"slot_inputs": names})
        if issubclass(config, (LinearConfig, AddmmConfig))  # MMConfig is an AddmmConfig
        else config
        for config in ALL_PARTITIONER_CONFIGS
    ]
    return XnnpackPartitioner(configs=configs)
