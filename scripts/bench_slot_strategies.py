"""Slot strategies compared in one run: decode and prefill latency, slot RAM and block-swap cost per target.

For each model and target (ExecuTorch/XNNPACK, ONNX Runtime) every slot strategy of
:mod:`hm_export.kernels.strategies` that the target can emit is exported as a KV-cache decode program; the
slot is filled from a bank (``int4-g32`` for the float, int4 and fused-int4 strategies: the host-float
strategies dequantize it on the host; ``int8`` for the int8 strategies).  Per program, with ``--threads``
threads (1 by default):

* ``decode_ms``: mean latency of one single-token decode step after a ``--prompt``-token prefill
  (``--steps`` steps, ``--runs`` runs interleaved over all programs of the target);
* ``prefill_ms``: median latency of the ``--prompt``-token prefill call;
* ``slot_bytes``: the slot's RAM (every slot tensor, scales included);
* ``swap_ms``: median time to switch the slot to a new root-to-leaf path (every level changes) with the
  bank's blocks already in RAM (fetch from storage excluded: it is the same bytes for every strategy);
* ratios against the ``host-fp32`` program of the same target measured in the same run, and the decode
  latency of the same program without memory (``bare``) for scale.

Models: the shipped example's checkpoint (``--checkpoint``) and ``paper-ratio`` (random weights, the paper's
layer shape, fetched memory 10.9 % of the anchor; see scripts/bench_decode.py).  Usage::

    python scripts/bench_slot_strategies.py [--models stdlib_docs,paper-ratio] [--json out.json]
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

import numpy as np
import torch
from bench_decode import PAPER_RATIO, Step, fetched_ratio, tokens_per_s
from tokenizers import Tokenizer, models

from hm_export.bank import BankReader, resolve_preset, write_bank
from hm_export.bench import set_threads
from hm_export.checkpoint import load_checkpoint, save_checkpoint
from hm_export.config import MemoryConfig
from hm_export.decode import CacheSpec
from hm_export.kernels.strategies import STRATEGIES, SlotLayout
from hm_export.model import MemoryLM
from hm_export.passes.pipeline import PIPELINES
from hm_export.router import MINILM_DIM, CentroidTree
from hm_export.runtime_stubs.block_cache import CachePolicy, SlotFiller
from hm_export.runtime_stubs.executorch_runner import ExecuTorchDecoder
from hm_export.runtime_stubs.onnx_runner import OnnxDecoder
from hm_export.slot import SlotContract
from hm_export.targets.executorch import emit_executorch
from hm_export.targets.onnx import emit_onnx
from hm_export.trace import trace_decode_program

TARGETS = ("executorch", "onnx")
BANK_OF = {"int8": "int8"}  # storage -> bank scheme; everything else reads the int4-g32 bank
DEFAULT_BANK = "int4-g32"
BASELINE = "host-fp32"


def paper_ratio_checkpoint(directory: Path) -> Path:
    """A random model of the paper's layer shape saved as a checkpoint (its bank feeds the slot)."""
    torch.manual_seed(0)
    model = MemoryLM(PAPER_RATIO).eval()
    with torch.no_grad():
        for down in model.bank.down:
            down.normal_(0, down.shape[-2] ** -0.5)
    rng = np.random.default_rng(0)
    centroids = [
        rng.standard_normal((PAPER_RATIO.memory.nodes_at(lv), MINILM_DIM)).astype(np.float32) for lv in (0, 1, 2)
    ]
    tree = CentroidTree(PAPER_RATIO.memory, [c / np.linalg.norm(c, axis=1, keepdims=True) for c in centroids])
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    return save_checkpoint(directory, model, tree, tokenizer)


def leaf_paths(memory: MemoryConfig, count: int) -> list[tuple[int, ...]]:
    """``count`` root-to-leaf paths that differ from their predecessor at every level."""
    paths, leaves = [], memory.nodes_at(memory.num_levels - 1)
    stride = leaves // memory.branching[0] + 1  # jump to another level-0 subtree every time
    for i in range(count):
        node, path = (i * stride) % leaves, []
        for level in reversed(range(memory.num_levels)):
            path.append(node)
            node //= memory.branching[level]
        paths.append(tuple(reversed(path)))
    return paths


def swap_ms(filler: SlotFiller, paths: list[tuple[int, ...]]) -> float:
    """Median ms of a full-path switch with every block already in RAM."""
    for path in paths:  # read every block once: later switches only copy / dequantize
        filler.set_path(path)
    times = []
    for _ in range(3):
        for path in paths:
            start = time.perf_counter()
            filler.set_path(path)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure_model(name: str, checkpoint: Path, args: argparse.Namespace, work: Path) -> list[dict]:
    model = load_checkpoint(checkpoint).model
    cfg = model.cfg
    levels = cfg.memory.num_levels
    banks = {scheme: work / f"{name}-bank-{scheme}" for scheme in {DEFAULT_BANK, *BANK_OF.values()}}
    for scheme, bank in banks.items():
        write_bank(bank, checkpoint, scheme)
    paths = leaf_paths(cfg.memory, 8)
    prompt = [(7 * i + 3) % cfg.vocab_size for i in range(args.prompt)]
    steps = min(args.steps, cfg.max_seq_len - args.prompt)
    cache = CacheSpec.for_model(cfg)
    rows = []
    for target in TARGETS:
        pipeline = PIPELINES["xnnpack_slot" if target == "executorch" else "folded_slot"]
        form = "state" if target == "executorch" else "io"
        decoders: dict[str, Step] = {}
        facts: dict[str, dict] = {}
        bare = trace_decode_program(model, SlotContract.for_model(cfg, cfg.max_seq_len), pipeline, form, memory=False)
        for strategy in ["bare", *[s for s in STRATEGIES if target in STRATEGIES[s].targets]]:
            started = time.perf_counter()
            out = work / f"{name}-{target}-{strategy}"
            if strategy == "bare":
                program, slot, contract_names = bare, [], []
            else:
                scheme = BANK_OF.get(STRATEGIES[strategy].storage, DEFAULT_BANK)
                layout = SlotLayout.for_bank(strategy, cfg, resolve_preset(scheme, levels))
                contract = layout.contract(cfg, cfg.max_seq_len)
                program = trace_decode_program(model, contract, pipeline, form, layout=layout)
                filler = SlotFiller(contract, BankReader(banks[scheme]), CachePolicy(resident_levels=levels), layout)
                facts[strategy] = {
                    "bank": scheme,
                    "slot_bytes": sum(t.numel() * t.element_size() for t in filler.slot),
                    "swap_ms": round(swap_ms(filler, paths), 3),
                }
                slot, contract_names = filler.slot, contract.input_names
            emitted = emit_executorch(program, out) if target == "executorch" else emit_onnx(program, out)
            path = out / emitted["files"]["program"]
            if target == "executorch":
                decoder = ExecuTorchDecoder(path, None, emitted.get("custom_ops"))
            else:
                decoder = OnnxDecoder(path, contract_names, cache, args.threads)
            decoders[strategy] = _step(decoder, slot)
            print(f"  {name} {target} {strategy}: exported in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        set_threads(args.threads)
        decode = _interleaved(decoders, prompt, steps, args.runs)
        prefill = {s: _prefill_ms(step, prompt) for s, step in decoders.items()}
        base = facts[BASELINE]
        for strategy, fact in facts.items():
            rows.append(
                {
                    "model": name,
                    "target": target,
                    "strategy": strategy,
                    **fact,
                    "decode_ms": decode[strategy],
                    "prefill_ms": prefill[strategy],
                    "decode_ratio": round(decode[strategy] / decode[BASELINE], 3),
                    "prefill_ratio": round(prefill[strategy] / prefill[BASELINE], 3),
                    "slot_ratio": round(fact["slot_bytes"] / base["slot_bytes"], 4),
                    "swap_ratio": round(fact["swap_ms"] / base["swap_ms"], 3),
                    "decode_ms_bare": decode["bare"],
                    "fetched_over_anchor": round(fetched_ratio(cfg), 4),
                }
            )
    return rows


def _step(decoder: Callable, slot: list[torch.Tensor]) -> Step:
    return lambda tokens, position: decoder(tokens, position, slot)


def _interleaved(steps_by_name: dict[str, Step], prompt: list[int], steps: int, runs: int) -> dict[str, float]:
    """Mean ms per decode step of every program, runs interleaved (after one warm-up each)."""
    rates: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for step in steps_by_name.values():
        tokens_per_s(step, prompt, 4)
    for _ in range(runs):
        for name, step in steps_by_name.items():
            rates[name].append(tokens_per_s(step, prompt, steps))
    return {name: round(1e3 / statistics.fmean(r), 4) for name, r in rates.items()}


def _prefill_ms(step: Step, prompt: list[int], repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(torch.tensor([prompt]), 0)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("examples/stdlib_docs/checkpoint"))
    parser.add_argument("--models", default="stdlib_docs,paper-ratio", help="comma-separated subset")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    wanted = args.models.split(",")
    set_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoints = {}
        if "stdlib_docs" in wanted:
            checkpoints["stdlib_docs"] = args.checkpoint
        if "paper-ratio" in wanted:
            checkpoints["paper-ratio"] = paper_ratio_checkpoint(work / "paper-ratio-ckpt")
        for name, checkpoint in checkpoints.items():
            rows += measure_model(name, checkpoint, args, work)
    report = {"threads": args.threads, "runs": args.runs, "steps": args.steps, "prompt": args.prompt, "results": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    header = (
        f"{'model':12s} {'target':10s} {'strategy':11s} {'decode ms':>9s} {'x fp32':>6s} {'prefill ms':>10s} "
        f"{'x fp32':>6s} {'slot KiB':>8s} {'x fp32':>6s} {'swap ms':>7s} {'x fp32':>6s} {'bare ms':>7s}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['model']:12s} {r['target']:10s} {r['strategy']:11s} {r['decode_ms']:9.3f} {r['decode_ratio']:6.2f} "
            f"{r['prefill_ms']:10.2f} {r['prefill_ratio']:6.2f} {r['slot_bytes'] / 1024:8.0f} {r['slot_ratio']:6.3f} "
            f"{r['swap_ms']:7.3f} {r['swap_ratio']:6.2f} {r['decode_ms_bare']:7.3f}"
        )
    print(f"({args.threads} thread(s); decode: mean over {args.runs} interleaved runs of {args.steps} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
