"""Named pipelines of slot passes, run in order with a record of what each did."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from torch.export import ExportedProgram

from hm_export.passes.base import SlotPassContext
from hm_export.passes.check_slot_access import check_slot_access
from hm_export.passes.drop_aliases import drop_aliases
from hm_export.passes.expand_tanh_gelu import expand_tanh_gelu
from hm_export.passes.fold_constant_subgraphs import fold_constant_subgraphs
from hm_export.passes.lift_memory_to_slot import lift_memory_to_slot
from hm_export.passes.reduce_norm_means_to_4d import reduce_norm_means_to_4d
from hm_export.passes.verify_slot_split import verify_slot_split

SlotPass = Callable[[ExportedProgram, SlotPassContext], ExportedProgram]


@dataclass(frozen=True)
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int


@dataclass(frozen=True)
class PassPipeline:
    name: str
    passes: tuple[SlotPass, ...]

    def run(self, ep: ExportedProgram, ctx: SlotPassContext) -> tuple[ExportedProgram, list[PassRecord]]:
        records = []
        for slot_pass in self.passes:
            before, start = len(ep.graph.nodes), time.perf_counter()
            ep = slot_pass(ep, ctx)
            records.append(
                PassRecord(slot_pass.__name__, round(time.perf_counter() - start, 4), before, len(ep.graph.nodes))
            )
        return ep, records


# Split anchor and slot; then precompute constants (mask, RoPE), drop aliases (Hugging Face graphs) and
# check the slot is read in place;
# XNNPACK additionally wants RMSNorm means in the 4-D form it can delegate, and tanh-GELU spelled out
# (its GELU is the erf form whatever ``approximate`` says).
SLOT_SPLIT = PassPipeline("slot_split", (lift_memory_to_slot, verify_slot_split))
FOLDED_SLOT = PassPipeline(
    "folded_slot", (lift_memory_to_slot, verify_slot_split, fold_constant_subgraphs, drop_aliases, check_slot_access)
)
XNNPACK_SLOT = PassPipeline(
    "xnnpack_slot",
    (
        lift_memory_to_slot,
        verify_slot_split,
        fold_constant_subgraphs,
        drop_aliases,
        reduce_norm_means_to_4d,
        expand_tanh_gelu,
        check_slot_access,
    ),
)
PIPELINES = {p.name: p for p in (SLOT_SPLIT, FOLDED_SLOT, XNNPACK_SLOT)}
