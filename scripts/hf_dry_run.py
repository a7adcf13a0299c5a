"""Real-size dry run: a Hugging Face host of a published shape, with memories, exported on this machine.

Builds the host from its config with random weights (no hub access here; the shapes are the published
ones), attaches a memory bank, saves an hm-export checkpoint (fp16), exports it, then verifies the bundle
against the eager model on a few contexts.  Checkpoint writing and export each run in a subprocess whose
peak memory is sampled.  Reported: wall seconds and peak RSS per stage, program and bank sizes, verify.

Usage: ``python scripts/hf_dry_run.py [--shape qwen2.5-0.5b|llama-3.2-1b|gemma-3-270m] [--targets executorch]
[--seq-len 128] [--decode] [--dir /tmp/hm-hf-dry-run] [--json]``.
Everything under ``--dir`` is deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from benchlib import files_under, run_measured

# Published shapes (config.json of the hub models), vocabulary and all.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    },
    "llama-3.2-1b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    },
    "gemma-3-270m": {
        "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
        "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "max_position_embeddings": 32768, "sliding_window": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    },
}  # fmt: skip

BUILD = """
import json, sys, time
import hm_export  # first: from a checkout it hides the repository's kernels/ folder from transformers
import numpy as np, torch, transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from hm_export.checkpoint import save_checkpoint
from hm_export.config import MemoryConfig
from hm_export.hf import HostMemoryLM, host_model_config
from hm_export.router import MINILM_DIM, CentroidTree

shape, out, seq_len = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
start = time.perf_counter()
host_config = transformers.AutoConfig.for_model(**shape)
layers = tuple(range(host_config.num_hidden_layers))
memory = MemoryConfig(branching=(4, 4), widths=(256, 64), layers=layers)
torch.manual_seed(0)
model = HostMemoryLM(host_model_config(host_config, memory, seq_len)).eval()
with torch.no_grad():
    for down in model.bank.down:
        down.normal_(0.0, 0.02)
rng = np.random.default_rng(0)
centroids = [rng.standard_normal((memory.nodes_at(lv), MINILM_DIM)).astype(np.float32) for lv in range(2)]
tree = CentroidTree(memory, [c / np.linalg.norm(c, axis=1, keepdims=True) for c in centroids])
words = ["the", "cat", "dog", "sat", "on", "mat", "memory", "tree", ".", ","]
tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
built = time.perf_counter() - start
save_checkpoint(out, model, tree, tokenizer, storage_dtype="float16")
anchor = sum(p.numel() for p in model.anchor_parameters())
bank = sum(p.numel() for p in model.bank.parameters())
print(json.dumps({"anchor_params": anchor, "bank_params": bank, "build_seconds": round(built, 1)}))
"""

EXPORT = """
import json, sys
from hm_export.export import ExportRecipe, export_bundle
recipe = ExportRecipe(targets=tuple(sys.argv[3].split(",")), checks=0, decode=sys.argv[4] == "1", router_program=False)
report = export_bundle(sys.argv[1], sys.argv[2], recipe, overwrite=True)
print(json.dumps(report.seconds))
"""

VERIFY = """
import json, sys
from hm_export.verify import verify_bundle
report = verify_bundle(sys.argv[1], sys.argv[2], sys.argv[3], target=sys.argv[4], limit=4)
print(json.dumps({"passed": report.passed, "max_abs_diff": report.export["max_abs"], "max_rel_diff":
                  report.export["max_rel"], "top1": report.end_to_end["top1"], "contexts": report.contexts}))
"""


def megabytes(paths: list[Path]) -> float:
    return round(sum(p.stat().st_size for p in paths) / 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--targets", default="executorch")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/hm-hf-dry-run"))
    parser.add_argument("--decode", action="store_true", help="Also export the KV-cache decode programs.")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    checkpoint, bundle = args.dir / "checkpoint", args.dir / "bundle"
    args.dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"shape": args.shape, "host": SHAPES[args.shape], "seq_len": args.seq_len}
    report["decode_programs"] = args.decode
    try:
        built = run_measured(BUILD, json.dumps(SHAPES[args.shape]), str(checkpoint), str(args.seq_len))
        report["checkpoint"] = {
            **built.result,
            "seconds": round(built.seconds, 1),
            "peak_rss_mib": built.peak_process_rss_mib,
            "mb_on_disk": megabytes(files_under(checkpoint)),
        }
        exported = run_measured(EXPORT, str(checkpoint), str(bundle), args.targets, "1" if args.decode else "0")
        report["export"] = {
            "seconds": round(exported.seconds, 1),
            "stage_seconds": exported.result,
            "peak_rss_mib": exported.peak_process_rss_mib,
            "files_mb": {
                str(p.relative_to(bundle)): megabytes([p]) for p in files_under(bundle) if "bank/level" not in str(p)
            },
            "bank_mb": megabytes(files_under(bundle / "bank")),
        }
        contexts = args.dir / "contexts.jsonl"
        lines = [{"text": "the cat sat on the mat . " * 8, "context": f"topic {i}"} for i in range(4)]
        contexts.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
        report["verify"] = {}
        for target in args.targets.split(","):
            verified = run_measured(VERIFY, str(bundle), str(checkpoint), str(contexts), target)
            report["verify"][target] = {**verified.result, "peak_rss_mib": verified.peak_process_rss_mib}
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    print(json.dumps(report, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
