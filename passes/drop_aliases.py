"""Drop ``aten.alias`` nodes (Hugging Face graphs carry them, e.g. from no-op dropout and ``.to()``).

An alias in a functional graph only renames a value; coremltools 9.0 refuses the node ("Unsupported fx
node alias") and ExecuTorch keeps it outside XNNPACK as an ``alias_copy``.  Guarantees afterwards: no
``aten.alias`` node is left; each user reads the aliased value directly.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from hm_export.passes.base import SlotPassContext


def drop_aliases(ep: ExportedProgram, ctx: SlotPassContext) -> ExportedProgram:
    graph = ep.graph
    dropped = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            dropped += 1
    graph.lint()
    ep.graph_module.recompile()
    ctx.notes["aliases_dropped"] = dropped
    return ep
