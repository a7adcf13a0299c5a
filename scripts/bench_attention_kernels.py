"""hm_export::attend_cache (float32 and float16 caches) against ExecuTorch's llama::update_cache +
llama::custom_sdpa (float32), one decode step of a 30-layer SmolLM2-shaped attention stack (9 query heads, 3 KV
heads, head dim 64, cache of --length positions), in the ExecuTorch runtime, interleaved runs.  Why:
docs/kernels.md ("attention kernel").

    OMP_NUM_THREADS=1 python scripts/bench_attention_kernels.py [--layers 30] [--length 512] [--position 128]
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
from hm_export.kernels import attend_cache, load_kernel_library


class Ours(torch.nn.Module):
    def __init__(self, layers: int, length: int, dtype: torch.dtype) -> None:
        super().__init__()
        for i in range(layers):
            self.register_buffer(f"k{i}", torch.zeros(3, length, 64, dtype=dtype), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(3, length, 64, dtype=dtype), persistent=False)
        self.layers = layers

    def forward(self, q, k, v, input_pos):  # q [1, 9, 1, 64], k/v [1, 3, 1, 64]
        out = q.new_zeros(1, 1, 9, 64)
        for i in range(self.layers):
            out = out + attend_cache(q, k, v, getattr(self, f"k{i}"), getattr(self, f"v{i}"), input_pos, 0.125, 0)
        return out


class Theirs(torch.nn.Module):
    def __init__(self, layers: int, length: int) -> None:
        super().__init__()
        for i in range(layers):
            self.register_buffer(f"k{i}", torch.zeros(1, length, 3, 64), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(1, length, 3, 64), persistent=False)
        self.layers = layers

    def forward(self, q, k, v, input_pos):  # q [1, 1, 9, 64], k/v [1, 1, 3, 64]
        start = input_pos[0].item()
        torch._check_is_size(start)
        torch._check(start < self.k0.shape[1])
        out = q.new_zeros(1, 1, 9, 64)
        for i in range(self.layers):
            kc, vc = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            torch.ops.llama.update_cache(k, kc, start)
            torch.ops.llama.update_cache(v, vc, start)
            out = out + torch.ops.llama.custom_sdpa(q, kc, vc, start, None, 0.0, True, 0.125)
        return out


def lower(module: torch.nn.Module, args: tuple, path: Path) -> Path:
    from executorch.exir import to_edge_transform_and_lower

    program = torch.export.export(module, args, strict=False)
    path.write_bytes(to_edge_transform_and_lower(program).to_executorch().buffer)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--position", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.runtime import Runtime

    load_kernel_library()
    set_threads(1)
    q, k, v = torch.randn(1, 9, 1, 64), torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64)
    pos = torch.tensor([args.position])
    work = Path(tempfile.mkdtemp())
    ours = {
        dtype: lower(Ours(args.layers, args.length, dtype), (q, k, v, pos), work / f"ours-{dtype}.pte")
        for dtype in (torch.float32, torch.float16)
    }
    theirs_args = (q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), pos)
    theirs = lower(Theirs(args.layers, args.length), theirs_args, work / "theirs.pte")
    methods = {
        **{
            f"hm_export::attend_cache ({str(dtype)[6:]} cache)": (
                Runtime.get().load_program(str(path)).load_method("forward"),
                [q, k, v, pos],
            )
            for dtype, path in ours.items()
        },
        "llama::update_cache+custom_sdpa": (
            Runtime.get().load_program(str(theirs)).load_method("forward"),
            list(theirs_args),
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.runs):
        for name, (method, inputs) in methods.items():
            times[name].append(seconds_per_call(partial(method.execute, inputs), args.steps) * 1e3)
    report = {
        "layers": args.layers,
        "cache_length": args.length,
        "position": args.position,
        "ms_per_step": {
            n: {"mean": round(statistics.mean(t), 4), "runs": [round(x, 4) for x in t]} for n, t in times.items()
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
