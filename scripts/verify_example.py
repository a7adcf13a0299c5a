"""``hm-export verify`` on the shipped example, one bundle per bank scheme, next to scripts/bank_accuracy.py.

Usage: ``python scripts/verify_example.py [--schemes float32,int8,int4-g32] [--target executorch] [-n 256]
[--work DIR] [--out docs/verify-example.json]``.

Exports ``examples/stdlib_docs/checkpoint`` once per scheme (``--no-decode``-like: full-window program only, no
golden checks), verifies each bundle against the checkpoint on ``heldout.jsonl`` (its ``context_tokens`` make
verify score the positions after each window's first 64 tokens, as bank_accuracy.py does), and prints the
export, quantization and end-to-end figures beside ``examples/stdlib_docs/bank_accuracy.json``'s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from hm_export.export import ExportRecipe, export_bundle
from hm_export.verify import verify_bundle

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "stdlib_docs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schemes", default="float32,int8,int4-g32")
    parser.add_argument("--target", default="executorch")
    parser.add_argument("-n", type=int, default=256, help="held-out windows (heldout.jsonl has 256)")
    parser.add_argument("--work", type=Path, default=None, help="where the bundles go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = parser.parse_args()
    accuracy = {row["scheme"]: row for row in json.loads((EXAMPLE / "bank_accuracy.json").read_text())["schemes"]}
    rows = []
    with tempfile.TemporaryDirectory(prefix="hm-verify-example-") as tmp:
        work = args.work or Path(tmp)
        for scheme in args.schemes.split(","):
            bundle = work / f"stdlib-{scheme}"
            recipe = ExportRecipe((args.target,), bank_scheme=scheme, decode=False, checks=0, router_program=False)
            export_bundle(EXAMPLE / "checkpoint", bundle, recipe, overwrite=True)
            report = verify_bundle(bundle, EXAMPLE / "checkpoint", EXAMPLE / "heldout.jsonl", args.n, args.target)
            summary = report.to_dict()
            del summary["results"]
            summary["bank_accuracy"] = accuracy.get(scheme)
            summary["slot_strategy"] = json.loads((bundle / "manifest.json").read_text())["slot"].get("strategy")
            rows.append(summary)
    result = {"date": datetime.now(UTC).isoformat(timespec="minutes"), "target": args.target, "runs": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"{rows[0]['contexts']} held-out windows, target {args.target}")
    print(
        "| scheme | slot | status | export max abs (rel) | quantization max abs | memory RMSE per level "
        "| ppl increase % (bank_accuracy.json) | top-1 vs checkpoint (bank_accuracy.json) |"
    )
    print("|---|---|---|---:|---:|---|---:|---:|")
    for row in rows:
        reference = row["bank_accuracy"] or {}
        quantization = row["quantization"]
        print(
            f"| {','.join(row['bank_schemes'])} | {row['slot_strategy']} | {row['status']} "
            f"| {row['export']['max_abs']:.2e} ({row['export']['max_rel']:.1e}) | {quantization['max_abs']:.3g} "
            f"| {', '.join(f'{e:.4f}' for e in row['memory']['max_relative_rmse'])} "
            f"| {row['end_to_end'].get('perplexity_increase_pct', 0):+.3f} "
            f"({reference.get('perplexity_change_pct', float('nan')):+.3f}) "
            f"| {row['end_to_end']['top1']:.4f} ({reference.get('top1_agreement', float('nan')):.4f}) |"
        )


if __name__ == "__main__":
    main()
