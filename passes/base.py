"""What every slot pass receives, the error it raises, and the node-rewrite loop the rewrite passes share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.export import ExportedProgram

from hm_export.errors import ExportError


class SlotPassError(ExportError):
    """A pass found the program in a state that would make the exported bundle wrong or slow."""


@dataclass
class SlotPassContext:
    """The model's own declaration of which parameters are memory (slot) and which are anchor."""

    memory_parameters: list[str]
    anchor_parameters: list[str]
    slot_input_names: list[str]
    slot_reader: str = "bmm"  # how the program reads the slot: "bmm", "convert" or "memory_swiglu"
    notes: dict[str, object] = field(default_factory=dict)


def replace_matching_nodes(
    ep: ExportedProgram,
    ctx: SlotPassContext,
    note: str,
    matches: Callable[[torch.fx.Node], bool],
    replacement: Callable[[torch.fx.Graph, torch.fx.Node], torch.fx.Node | None],
) -> ExportedProgram:
    """Replace every node that ``matches`` by what ``replacement`` builds before it (``None``: keep the node),
    then lint and recompile; the count goes to ``ctx.notes[note]``.  The rewrite passes share this loop."""
    graph = ep.graph
    replaced = 0
    for node in list(graph.nodes):
        if not matches(node):
            continue
        with graph.inserting_before(node):
            new = replacement(graph, node)
        if new is None:
            continue
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        replaced += 1
    graph.lint()
    ep.graph_module.recompile()
    ctx.notes[note] = replaced
    return ep
