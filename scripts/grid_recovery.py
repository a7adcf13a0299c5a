"""How exactly the ``-asym`` presets' grids hold a checkpoint's anchor weights (docs/anchor-quant.md).

For every anchor linear and the token embedding of CHECKPOINT, the weights as :class:`hm_export.anchor_quant.
GridLinear` stores them (min-max asymmetric int4 in groups of 32, llama.cpp's Q4_1; symmetric int8 in groups of
32, Q8_0) are dequantized and compared with the float weights: the share of weights recovered bit for bit and the
largest absolute error, per kind of tensor.  A host that is a dequantized Q4_1 GGUF (SmolLM2's) should come back
exactly where its GGUF stored Q4_1 (the linears) and Q8_0 (its token embedding).

    python scripts/grid_recovery.py CHECKPOINT [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from hm_export.anchor_quant import GridLinear, WeightQuant
from hm_export.checkpoint import load_checkpoint

GRIDS = {"asym-int4-g32 (Q4_1)": WeightQuant(4, 32, asymmetric=True), "int8-g32 (Q8_0)": WeightQuant(8, 32)}


@torch.no_grad()
def recovery(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, dict[str, float]]]:
    """Per grid and kind of tensor (the name without layer indices): exact share and max |error|."""
    report: dict[str, dict[str, dict[str, float]]] = {}
    for grid, quant in GRIDS.items():
        kinds: dict[str, list[float]] = {}
        for name, weight in weights.items():
            restored = GridLinear(weight, quant, name=name).dequantized()
            exact = float((restored == weight).float().mean())
            error = float((restored - weight).abs().max())
            kind = re.sub(r"\.\d+\.", ".N.", name)
            total = kinds.setdefault(kind, [0.0, 0.0, 0.0])
            total[0] += exact * weight.numel()
            total[1] = max(total[1], error)
            total[2] += weight.numel()
        report[grid] = {
            kind: {"exact_share": round(t[0] / t[2], 6), "max_abs_error": t[1], "weights": int(t[2])}
            for kind, t in sorted(kinds.items())
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    model = load_checkpoint(args.checkpoint).model
    weights = {
        name: module.weight.detach().float()
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and not name.startswith("slot")
    }
    report = {"checkpoint": str(args.checkpoint), "grids": recovery(weights)}
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
