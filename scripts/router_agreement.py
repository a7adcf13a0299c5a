"""Router programs vs the Python MiniLM on 1,000 contexts of the shipped example (docs/native-runtime.md).

Usage: ``python scripts/router_agreement.py BUNDLE [-n 1000] [--target executorch,onnx] [--json]``

The contexts: the head (1,200 characters, what routes a document in examples/stdlib_docs/train.py) of every
example document, then windows of 600 characters from the middle of the documents until ``-n``. For each
router program in the bundle that runs on this host (ExecuTorch, ONNX Runtime; Core ML on macOS only, see
scripts/check_coreml_macos.py --router): the cosine of its embeddings with the Python MiniLM's, the share of
contexts routed to the same path through the bundle's tree, and every difference with its margins.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path

from hm_export.bundle import read_manifest
from hm_export.router import MiniLMEmbedder
from hm_export.router_program import measure_agreement, onnx_router

ROOT = Path(__file__).resolve().parent.parent


def example_contexts(count: int) -> list[str]:
    spec = importlib.util.spec_from_file_location("stdlib_train", ROOT / "examples" / "stdlib_docs" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    documents = list(train.stdlib_documents().values())
    contexts = [train.document_context(text) for text in documents]
    for step, text in enumerate(documents * 4):
        if len(contexts) >= count:
            break
        start = len(text) // 2 + 600 * (step // len(documents))
        contexts.append(text[start : start + 600])
    return contexts[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--target", default=None, help="Comma-separated (default: every program that runs here).")
    parser.add_argument(
        "--onnx-int8", action="store_true", help="Also a dynamic int8 variant of the ONNX router (not shipped)."
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    programs = read_manifest(args.bundle).router.programs
    targets = args.target.split(",") if args.target else [t for t in programs if t != "coreml"]
    contexts = example_contexts(args.n)
    reference = MiniLMEmbedder().embed(contexts)
    results = [measure_agreement(args.bundle, target, contexts, reference) for target in targets]
    if args.onnx_int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory() as scratch:
            quantized = Path(scratch) / "minilm.int8.onnx"
            quantize_dynamic(args.bundle / "router" / "minilm.onnx", quantized, weight_type=QuantType.QInt8)
            program = onnx_router(quantized, args.bundle / "router" / "tokenizer.json")
            results.append({**measure_agreement(args.bundle, program, contexts, reference), "target": "onnx-int8"})
            results[-1]["program_bytes"] = quantized.stat().st_size
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        cosine = r["cosine"]
        print(
            f"{r['target']}: {r['contexts']} contexts, cosine min {cosine['min']:.7f} mean {cosine['mean']:.7f}, "
            f"routes identical {100 * r['routes_identical']:.2f} % ({len(r['differences'])} differ), "
            f"min route margin {r['min_route_margin']:.5f}, {r['program_seconds_per_context'] * 1e3:.1f} ms/context"
        )
        for d in r["differences"]:
            route = f"{d['python_path']} -> {d['program_path']}"
            print(f"  context {d['context']}: {route} (margin {d['python_margin']:.2e})")


if __name__ == "__main__":
    main()
