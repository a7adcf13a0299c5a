"""One anchor linear, ours vs XNNPACK's: ``hm_export::qlinear`` (asymmetric int4 in groups of 32, the ``-asym``
presets) against torchao's 8da4w (symmetric int4 g32, HQQ) lowered to XNNPACK's qd8-qb4w GEMM, the linears of the
``8da4w-g32`` preset and of export_llm.  SmolLM2-135M's shapes, one ``.pte`` per (system, shape), all run in one
process per kernel path, interleaved (A B A B ...), 1 thread; prints microseconds per call and the ratio.

    python scripts/bench_qlinear.py [--tokens 1,64] [--runs 5] [--calls 200] [--isa avx512,avx2] [--json out.json]

``--isa`` re-runs our side with ``HM_KERNELS_ISA`` forced (read once per process, hence one subprocess per path).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # name: (in, out), SmolLM2-135M
    "q/o 576x576": (576, 576),
    "k/v 576x192": (576, 192),
    "gate/up 576x1536": (576, 1536),
    "down 1536x576": (1536, 576),
    "head 576x49152": (576, 49152),
}


def build(directory: Path, tokens: int) -> dict[str, dict[str, Path]]:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from hm_export.anchor_quant import GridLinear, WeightQuant, _linear_config

    programs: dict[str, dict[str, Path]] = {}
    for name, (width, out) in SHAPES.items():
        weight = torch.randn(out, width) * 0.05
        grid = GridLinear(weight, WeightQuant(4, 32, asymmetric=True))
        linear = torch.nn.Linear(width, out, bias=False)
        linear.weight.data.copy_(weight)
        from torchao.quantization import quantize_

        quantize_(linear, _linear_config(WeightQuant(4, 32), width))
        x = (torch.randn(1, tokens, width),)
        programs[name] = {}
        for system, module in (("hm_export::qlinear", grid), ("xnnpack 8da4w", linear)):
            program = torch.export.export(module, x, strict=False)
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            path = directory / f"{system.split()[0].replace(':', '_')}-{out}x{width}-t{tokens}.pte"
            path.write_bytes(edge.to_executorch().buffer)
            programs[name][system] = path
    return programs


def measure(programs: dict[str, dict[str, Path]], tokens: int, runs: int, calls: int) -> dict[str, dict[str, float]]:
    from executorch.runtime import Runtime

    from hm_export.bench import set_threads
    from hm_export.kernels import load_kernel_library

    set_threads(1)
    load_kernel_library()
    runtime = Runtime.get()
    out: dict[str, dict[str, float]] = {}
    for name, systems in programs.items():
        width = SHAPES[name][0]
        x = torch.randn(1, tokens, width)
        methods = {s: runtime.load_program(str(p)).load_method("forward") for s, p in systems.items()}
        best = {s: float("inf") for s in methods}
        for _ in range(runs):
            for system, method in methods.items():  # interleaved
                method.execute([x])
                start = time.perf_counter()
                for _ in range(calls):
                    method.execute([x])
                best[system] = min(best[system], (time.perf_counter() - start) / calls * 1e6)
        out[name] = {**{f"{s} us": round(v, 1) for s, v in best.items()}}
        ours, theirs = best["hm_export::qlinear"], best["xnnpack 8da4w"]
        out[name]["ours / xnnpack time"] = round(ours / theirs, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,64")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--isa", default="best")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: programs JSON to measure
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        programs = {n: {s: Path(p) for s, p in v.items()} for n, v in job["programs"].items()}
        print(json.dumps(measure(programs, job["tokens"], args.runs, args.calls)))
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report: dict[str, dict] = {"threads": 1, "runs": args.runs, "calls": args.calls, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in (int(t) for t in args.tokens.split(",")):
            programs = build(Path(tmp), tokens)
            job = json.dumps(
                {"tokens": tokens, "programs": {n: {s: str(p) for s, p in v.items()} for n, v in programs.items()}}
            )
            for isa in args.isa.split(","):
                env = dict(os.environ, **({} if isa == "best" else {"HM_KERNELS_ISA": isa}))
                done = subprocess.run(
                    [sys.executable, __file__, "--worker", job, "--runs", str(args.runs), "--calls", str(args.calls)],
                    env=env, capture_output=True, text=True, check=True,
                )  # fmt: skip
                report["results"][f"tokens={tokens} isa={isa}"] = json.loads(done.stdout.strip().splitlines()[-1])
                print(
                    f"tokens={tokens} isa={isa}", json.dumps(report["results"][f"tokens={tokens} isa={isa}"], indent=1)
                )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
