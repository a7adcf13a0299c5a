"""``hm_runner --context --prompt`` (C++: router program, tokenizers, decode program) vs ``hm-export run``'s
library path (Python: MiniLM, ``tokenizers``, the same decode program) on a bundle (docs/native-runtime.md).

Usage: ``python scripts/native_generate_compare.py BUNDLE [-n 8] [--max-new-tokens 32] [--json]``

Per golden check of the bundle: its context, and as prompt the text of its prompt ids; plus the two contexts
and prompts of scripts/demo.sh. Each is continued greedily by both; reported: path, prompt ids, new ids and
text equal. Exit 1 when any differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hm_export.bundle import read_manifest
from hm_export.native import build_native_runner, run_native_generate
from hm_export.runtime_stubs.loader import BundleLoader, complete

ROOT = Path(__file__).resolve().parent.parent
DEMO = (
    (
        '"""Generic socket server classes. This module tries to capture the various aspects of\n'
        'defining a server: for socket-based servers, address family, socket type and request handling."""',
        "class TCPServer(BaseServer):\n    def server_bind(self):\n        ",
    ),
    (
        '"""Basic message object for the email package. A Message holds MIME headers and a payload,\n'
        'which may be a list of sub-messages."""',
        "def get_payload(self, i=None, decode=False):\n        ",
    ),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("-n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build" / "native")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runner = build_native_runner(args.build_dir)
    loader = BundleLoader(args.bundle, target="executorch")
    checks = json.loads((args.bundle / read_manifest(args.bundle).checks.file).read_text())["checks"]
    cases = [(c["context"], loader.tokenizer.decode(c["prompt"])) for c in checks[: args.n]] + list(DEMO)
    rows = []
    for context, prompt in cases:
        python = complete(loader, context, prompt, max_new_tokens=args.max_new_tokens)
        native = run_native_generate(runner, args.bundle, context, prompt, args.max_new_tokens)["generation"]
        rows.append(
            {
                "context": context[:50],
                "path": native["path"],
                "path_equal": native["path"] == list(python.context_path),
                "prompt_ids_equal": native["prompt_tokens"] == loader.tokenizer.encode(prompt).ids,
                "tokens_equal": native["new_tokens"] == python.new_tokens,
                "text_equal": native["text"] == python.text,
                "text": native["text"],
            }
        )
    keys = ("path_equal", "prompt_ids_equal", "tokens_equal", "text_equal")
    equal = all(r[k] for r in rows for k in keys)
    if args.json:
        print(json.dumps({"equal": equal, "cases": rows}, indent=2))
    else:
        for r in rows:
            flags = "".join(
                "=" if r[k] else "X" for k in ("path_equal", "prompt_ids_equal", "tokens_equal", "text_equal")
            )
            print(f"{flags}  {r['path']}  {r['context']!r} -> {r['text'][:60]!r}")
        print(f"{'all equal' if equal else 'DIFFERENCES'}: {len(rows)} continuations (path, prompt ids, new ids, text)")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
