"""Trace a checkpoint's model into a ``torch.export`` program whose memory is a slot."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export import ExportedProgram

from hm_export.model import MemoryLM, assemble_path
from hm_export.passes.base import SlotPassContext
from hm_export.passes.pipeline import PassPipeline, PassRecord
from hm_export.slot import SlotContract, SlotModule, slot_tensors


@dataclass
class SlotProgram:
    """A program whose user inputs are ``(tokens, *slot)`` plus what the passes recorded."""

    program: ExportedProgram
    contract: SlotContract
    example_inputs: tuple[torch.Tensor, ...]
    pass_records: list[PassRecord]
    notes: dict[str, object]


def trace_slot_program(model: MemoryLM, contract: SlotContract, pipeline: PassPipeline) -> SlotProgram:
    """Export the anchor with the memory of path ``(0, 0, ...)`` as parameters, then run ``pipeline``.

    The path only provides example values: after the lift, the slot is an input and any path can be fed.
    """
    first_path = [0] * model.cfg.memory.num_levels
    for level in range(1, len(first_path)):
        first_path[level] = first_path[level - 1] * model.cfg.memory.branching[level]
    memory = assemble_path(model, first_path)
    module = SlotModule(model, memory).eval()
    tokens = torch.zeros(1, contract.seq_len, dtype=torch.long)
    ctx = SlotPassContext(module.memory_parameter_names(), module.anchor_parameter_names(), contract.input_names)
    with torch.no_grad():
        program = torch.export.export(module, (tokens,), strict=False)
    program, records = pipeline.run(program, ctx)
    return SlotProgram(program, contract, (tokens, *slot_tensors(memory)), records, ctx.notes)
