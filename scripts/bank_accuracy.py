"""Held-out perplexity and top-1 agreement per bank scheme on the shipped example (docs/bank-benchmarks.md).

Usage: ``python scripts/bank_accuracy.py [--checkpoint DIR] [--heldout FILE] [--schemes a,b,...] [--out FILE]``.
Writes the JSON result to ``--out`` (default ``examples/stdlib_docs/bank_accuracy.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hm_export.bank.accuracy import scheme_accuracy
from hm_export.router import MiniLMEmbedder

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "stdlib_docs"
DEFAULT_SCHEMES = "float16,bfloat16,int8,int4-g32,int4-g64,int4-g128,mixed-int8-int4"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=EXAMPLE / "checkpoint")
    parser.add_argument("--heldout", type=Path, default=EXAMPLE / "heldout.jsonl")
    parser.add_argument("--schemes", default=DEFAULT_SCHEMES)
    parser.add_argument("--out", type=Path, default=EXAMPLE / "bank_accuracy.json")
    parser.add_argument("--json", action="store_true", help="Print the JSON result instead of a table.")
    args = parser.parse_args()
    heldout = [json.loads(line) for line in args.heldout.read_text().splitlines() if line.strip()]
    result = scheme_accuracy(args.checkpoint, heldout, args.schemes.split(","), MiniLMEmbedder())
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{result['heldout_windows']} windows, {result['scored_tokens']} scored tokens, "
        f"{result['distinct_paths']} distinct paths"
    )
    print(f"float32 bank perplexity {result['reference']['perplexity']}")
    print("| scheme | bits/param | perplexity | change % | top-1 agreement | max abs logit diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in result["schemes"]:
        print(
            f"| {row['scheme']} | {row['bits_per_param']} | {row['perplexity']} | "
            f"{row['perplexity_change_pct']:+.3f} | {row['top1_agreement']:.4f} | {row['max_abs_logit_diff']} |"
        )


if __name__ == "__main__":
    main()
