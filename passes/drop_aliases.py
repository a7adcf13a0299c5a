"""Drop ``aten.alias`` nodes (Hugging Face graphs carry them, e.g. from no-op dropout and ``.to()``).

An alias in a functional graph only renames a value; coremltools 9.0 refuses the node ("Unsupported fx
node alias") and ExecuTorch keeps it outside XNNPACK as an ``alias_copy``.  Guarantees afterwards: no
``aten.alias`` node is left; each user reads the aliased value directly.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from hm_export.passes.base import SlotPassContext, replace_matching_nodes


def drop_aliases(ep: ExportedProgram, ctx: SlotPassContext) -> ExportedProgram:
    return replace_matching_nodes(
        ep,
        ctx,
        "aliases_dropped",
        lambda node: node.op == "call_function" and node.target == torch.ops.aten.alias.default,
        lambda graph, node: node.args[0],
    )
