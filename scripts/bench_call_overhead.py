"""The Python runtime's fixed cost per decode step: ExecuTorch's Python bindings convert every input of every call
(tokens, input_pos and each slot tensor: 122 inputs for SmolLM2's fused-int4 slot), where the C++ runtime binds the
slot once.  Two programs that do almost nothing, one with the bundle's decode inputs and one with only tokens and
input_pos, are timed through ``Method.execute`` against a decode step of the bundle, interleaved.  Why:
docs/peers.md (the Python runtime against the C++ one).

    OMP_NUM_THREADS=1 python scripts/bench_call_overhead.py BUNDLE [--steps 200] [--runs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from functools import partial
from pathlib import Path

import torch
from benchlib import seconds_per_call

from hm_export.bench import set_threads
from hm_export.runtime_stubs.generate import Generator
from hm_export.runtime_stubs.loader import BundleLoader


class NoOp(torch.nn.Module):
    """Returns ``tokens + input_pos`` as float: reads none of the other inputs."""

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, *unused: torch.Tensor) -> torch.Tensor:
        return (tokens + input_pos).float()


def lower(inputs: tuple[torch.Tensor, ...], path: Path) -> Path:
    """``NoOp`` for ``inputs``, with the decode programs' memory plan (inputs bound, not copied)."""
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    program = to_edge_transform_and_lower(torch.export.export(NoOp(), inputs, strict=False))
    config = ExecutorchBackendConfig(memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False))
    path.write_bytes(program.to_executorch(config).buffer)
    return path


def decode_step_seconds(generator: Generator, prompt: list[int], steps: int) -> float:
    """Mean time of ``steps`` one-token decode calls after prefilling ``prompt``, as the generation loop makes them."""
    generator.prefill_last(prompt)
    positions = iter(range(len(prompt), len(prompt) + steps))
    token = torch.tensor([[5]])
    return seconds_per_call(lambda: generator.decoder(token, next(positions), generator.loader.slot), steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from executorch.runtime import Runtime

    set_threads(1)
    loader = BundleLoader(args.bundle, target=None, verify=False)
    generator = Generator(loader, "executorch")
    loader.set_path([0] * loader.config.memory.num_levels)
    slot = loader.slot
    tokens, position = torch.tensor([[5]]), torch.tensor([64])
    work = Path(tempfile.mkdtemp())
    calls = {
        "no-op, all decode inputs": (lower((tokens, position, *slot), work / "all.pte"), [tokens, position, *slot]),
        "no-op, tokens and input_pos": (lower((tokens, position), work / "two.pte"), [tokens, position]),
    }
    methods = {
        name: (Runtime.get().load_program(str(pte)).load_method("forward"), i) for name, (pte, i) in calls.items()
    }
    times: dict[str, list[float]] = {name: [] for name in [*methods, "decode step"]}
    prompt = list(range(100, 164))
    steps = min(args.steps, loader.config.max_seq_len - len(prompt))
    for _ in range(args.runs):
        for name, (method, inputs) in methods.items():
            times[name].append(seconds_per_call(partial(method.execute, inputs), args.steps) * 1e6)
        times["decode step"].append(decode_step_seconds(generator, prompt, steps) * 1e6)
    mean = {name: statistics.mean(t) for name, t in times.items()}
    extra_inputs = len(slot)
    per_input = (mean["no-op, all decode inputs"] - mean["no-op, tokens and input_pos"]) / extra_inputs
    report = {
        "bundle": str(args.bundle),
        "slot_inputs": extra_inputs,
        "us_per_call": {
            name: {"mean": round(m, 1), "runs": [round(x, 1) for x in times[name]]} for name, m in mean.items()
        },
        "us_per_slot_input": round(per_input, 2),
        "slot_conversion_share_of_step": round(per_input * extra_inputs / mean["decode step"], 4),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
