"""Decode-speed ratios, measured in one run on this machine (the targets of the decode issue).

1. ``pte / eager``: decode tokens/s of the ExecuTorch decode program (``decode.pte``, XNNPACK, KV cache in
   mutable buffers) over eager torch running the same :class:`~hm_export.decode.DecodeModule` (KV cache,
   ``torch.no_grad``), with the same number of threads.  Target: >= 1.
2. ``memory / no memory``: per-token decode latency of the decode program with the memory slot over the
   same program exported without memory (no memory FFN, no slot inputs), for a model whose fetched memory
   is about 10 % of the anchor, as in the paper (160M anchor, 18M fetched).  Target: <= 1.15.  ONNX Runtime
   numbers are reported alongside.

Models: the shipped example's checkpoint (``--checkpoint``, when it exists) and ``paper-ratio``, a
train-free random model with the paper's layer shape (d 512, FFN 2048, memory widths 256/64/16 on every
layer) and 8 layers, vocabulary 8192: fetched memory = 10.9 % of the anchor.  Latency does not depend on
the weights' values, so random weights measure what trained ones would.

Each measurement prefills ``--prompt`` tokens, then times ``--steps`` single-token decode calls; ``--runs``
repetitions interleave the compared programs; we report the mean and sd over runs of tokens/s and the ratio
of the means, for every thread count of ``--threads`` (torch, ExecuTorch and ONNX Runtime alike).  Usage::

    python scripts/bench_decode.py [--threads 1,2] [--runs 5] [--steps 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hm_export.bench import set_threads
from hm_export.checkpoint import load_checkpoint
from hm_export.config import MemoryConfig, ModelConfig
from hm_export.decode import DecodeModule
from hm_export.model import MemoryLM, assemble_path
from hm_export.passes.pipeline import PIPELINES
from hm_export.runtime_stubs.executorch_runner import ExecuTorchDecoder
from hm_export.runtime_stubs.onnx_runner import OnnxDecoder
from hm_export.slot import SlotContract, slot_tensors
from hm_export.targets.executorch import emit_executorch
from hm_export.targets.onnx import emit_onnx
from hm_export.trace import example_path, trace_decode_program

PAPER_RATIO = ModelConfig(
    vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_hidden=2048, max_seq_len=256,
    memory=MemoryConfig(branching=(2, 2, 2), widths=(256, 64, 16), layers=tuple(range(8))),
)  # fmt: skip

Step = Callable[[torch.Tensor, int], torch.Tensor]  # (tokens [1, n], input_pos) -> logits


def fetched_ratio(cfg: ModelConfig) -> float:
    """Parameters of one fetched path over the anchor's parameters."""
    with torch.device("meta"):
        model = MemoryLM(cfg)
    fetched = sum(cfg.block_params(level) for level in range(cfg.memory.num_levels))
    return fetched / sum(p.numel() for p in model.anchor_parameters())


def tokens_per_s(step: Step, prompt: list[int], steps: int) -> float:
    """Prefill ``prompt`` from position 0, then time ``steps`` one-token decode calls."""
    logits = step(torch.tensor([prompt]), 0)
    token, elapsed = int(logits[-1].argmax()), 0.0
    for position in range(len(prompt), len(prompt) + steps):
        start = time.perf_counter()
        logits = step(torch.tensor([[token]]), position)
        elapsed += time.perf_counter() - start
        token = int(logits[-1].argmax())
    return steps / elapsed


def compare(steps_by_name: dict[str, Step], prompt: list[int], steps: int, runs: int) -> dict[str, dict]:
    """Interleaved runs of every step function; mean and sd of tokens/s per name."""
    rates: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for step in steps_by_name.values():  # warm-up
        tokens_per_s(step, prompt, 4)
    for _ in range(runs):
        for name, step in steps_by_name.items():
            rates[name].append(tokens_per_s(step, prompt, steps))
    return {
        name: {"tokens_per_s": round(statistics.fmean(r), 1), "sd": round(statistics.stdev(r), 1) if runs > 1 else 0.0}
        for name, r in rates.items()
    }


def measure_model(name: str, model: MemoryLM, args: argparse.Namespace, work: Path) -> list[dict]:
    """Export the four programs of ``model`` once, then measure them at every thread count of ``args``."""
    cfg = model.cfg
    contract = SlotContract.for_model(cfg, cfg.max_seq_len)
    slot = slot_tensors(assemble_path(model, example_path(cfg.memory)))
    steps = min(args.steps, cfg.max_seq_len - args.prompt)
    prompt = [(7 * i + 3) % cfg.vocab_size for i in range(args.prompt)]

    def emit(runtime: str, memory: bool) -> Path:
        out = work / f"{name}-{runtime}-{'memory' if memory else 'bare'}"
        pipeline = PIPELINES["xnnpack_slot" if runtime == "executorch" else "folded_slot"]
        program = trace_decode_program(model, contract, pipeline, "state" if runtime == "executorch" else "io", memory)
        files = emit_executorch(program, out) if runtime == "executorch" else emit_onnx(program, out)
        return out / files["files"]["program"]

    started = time.perf_counter()
    programs = {(rt, mem): emit(rt, mem) for rt in ("executorch", "onnx") for mem in (True, False)}
    export_seconds = time.perf_counter() - started
    cache = DecodeModule(model, ()).cache_spec
    eager = DecodeModule(model, assemble_path(model, example_path(cfg.memory))).eval()

    def eager_step(tokens: torch.Tensor, position: int) -> torch.Tensor:
        with torch.no_grad():
            return eager(tokens, torch.tensor([position]))[0]

    def runner(runtime: str, memory: bool, threads: int) -> Step:
        path, inputs = programs[(runtime, memory)], slot if memory else []
        names = contract.input_names if memory else []
        decoder = ExecuTorchDecoder(path) if runtime == "executorch" else OnnxDecoder(path, names, cache, threads)
        return lambda tokens, position: decoder(tokens, position, inputs)

    measured = []
    for threads in args.threads:
        set_threads(threads)
        results = compare(
            {
                "eager": eager_step,
                "pte": runner("executorch", True, threads),
                "pte_no_memory": runner("executorch", False, threads),
                "onnx": runner("onnx", True, threads),
                "onnx_no_memory": runner("onnx", False, threads),
            },
            prompt,
            steps,
            args.runs,
        )
        rate = {k: v["tokens_per_s"] for k, v in results.items()}
        measured.append(
            {
                "model": name,
                "threads": threads,
                "anchor_params": sum(p.numel() for p in model.anchor_parameters()),
                "fetched_over_anchor": round(fetched_ratio(cfg), 4),
                "prompt": args.prompt,
                "steps": steps,
                "export_seconds": round(export_seconds, 1),
                "decode": results,
                "pte_over_eager_tokens_per_s": round(rate["pte"] / rate["eager"], 3),
                "memory_over_no_memory_latency_pte": round(rate["pte_no_memory"] / rate["pte"], 3),
                "memory_over_no_memory_latency_onnx": round(rate["onnx_no_memory"] / rate["onnx"], 3),
            }
        )
    return measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("examples/stdlib_docs/checkpoint"))
    parser.add_argument("--threads", type=lambda v: [int(t) for t in v.split(",")], default=[1, 2], help="e.g. 1,2")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {"paper-ratio": MemoryLM(PAPER_RATIO).eval()}
    if (args.checkpoint / "config.json").is_file():
        models = {"stdlib_docs": load_checkpoint(args.checkpoint).model, **models}
    with tempfile.TemporaryDirectory() as tmp:
        results = [row for name, model in models.items() for row in measure_model(name, model, args, Path(tmp))]
    report = {"runs": args.runs, "results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    columns = ("eager", "pte", "pte bare", "onnx", "onnx bare")
    print(f"{'model':12s} {'threads':>7s} {'fetched/anchor':>14s} " + " ".join(f"{c:>10s}" for c in columns)
          + f" {'pte/eager':>9s} {'mem/bare pte':>12s} {'mem/bare onnx':>13s}")  # fmt: skip
    for r in results:
        d = r["decode"]
        cells = " ".join(
            f"{d[k]['tokens_per_s']:10.1f}" for k in ("eager", "pte", "pte_no_memory", "onnx", "onnx_no_memory")
        )
        print(
            f"{r['model']:12s} {r['threads']:7d} {r['fetched_over_anchor']:14.3f} {cells}"
            f" {r['pte_over_eager_tokens_per_s']:9.2f} {r['memory_over_no_memory_latency_pte']:12.3f}"
            f" {r['memory_over_no_memory_latency_onnx']:13.3f}"
        )
    print(f"(decode tokens/s, mean of {args.runs} interleaved runs; targets: pte/eager >= 1, mem/bare <= 1.15)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
