"""Numerical check of a bundle's Core ML package on macOS (``MLModel.predict`` exists only there).

Usage (on a Mac, with hm-export installed):

    python scripts/check_coreml_macos.py BUNDLE --checkpoint CHECKPOINT --contexts contexts.jsonl -n 32

It runs ``hm-export verify --target coreml`` (against the float checkpoint; the package computes in fp16 by
default, so verify applies its float16 tolerances, docs/verify.md; ``--rtol`` / ``--min-top1`` override them).
Exit code 0 on pass, 1 on failure, 2 when not on macOS.

With ``--router`` it also runs the bundle's Core ML router program (``router/minilm.mlpackage``, float32) on
``--router-contexts`` contexts of the shipped example (scripts/router_agreement.py's) and requires cosine
>= 0.9999 with the Python MiniLM and >= 99.9 % of the routes identical (differences listed with margins).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from hm_export.verify import verify_bundle

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--contexts", type=Path, required=True)
    parser.add_argument("-n", type=int, default=32)
    parser.add_argument("--rtol", type=float, default=None, help="export error relative to the logit scale")
    parser.add_argument("--min-top1", type=float, default=None, help="top-1 agreement with the checkpoint")
    parser.add_argument("--router", action="store_true", help="Also check the Core ML router program's numerics.")
    parser.add_argument("--router-contexts", type=int, default=1000)
    args = parser.parse_args()
    if platform.system() != "Darwin":
        print("Core ML prediction needs macOS; run `hm-export verify --target coreml` here for the structure")
        return 2
    overrides = {"rtol": args.rtol, "min_top1": args.min_top1}
    report = verify_bundle(args.bundle, args.checkpoint, args.contexts, args.n, "coreml", overrides)
    summary = report.to_dict()
    summary.pop("results")
    print(json.dumps(summary, indent=2))
    passed = report.status == "pass"
    if args.router:
        from router_agreement import example_contexts

        from hm_export.router_program import measure_agreement

        router = measure_agreement(args.bundle, "coreml", example_contexts(args.router_contexts))
        print(json.dumps(router, indent=2))
        passed = passed and router["cosine"]["min"] >= 0.9999 and router["routes_identical"] >= 0.999
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
