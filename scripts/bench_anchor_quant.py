"""Prefill and decode tokens/s of bundles' ExecuTorch decode programs next to plain ``.pte`` programs (e.g. the
one ExecuTorch's ``export_llm`` writes), interleaved in one run, with bytes on disk and the bandwidth bound.

Every program prefills the same ``--prompt`` tokens from position 0, then decodes ``--new`` tokens one call at a
time (greedy: each step feeds the argmax of the last logits, so every program runs its own continuation; the
work per step does not depend on the token).  ``--runs`` repetitions interleave the programs (run 1 of every
program, then run 2, ...), so contention on a shared machine hits them alike; we report mean and sd over runs
of prefill and decode tokens/s and each program's ratio to the first ``--pte`` (the reference).

A bundle runs with the memory of its first golden check's path (no router: nothing but the program is timed).
``--anchor-only`` also times each bundle's decode program exported without memory (same anchor preset; traced
from the bundle's source checkpoint, which must still exist).

Bytes: a bundle's program files plus one path's bank blocks; a plain program's file.  Bytes read per decoded
token: the program's weights minus its embedding table (a decode step reads one row of it), plus one path's
slot for a bundle; the bound is the measured single-thread read bandwidth over those bytes.

    OMP_NUM_THREADS=1 python scripts/bench_anchor_quant.py --bundle out/b-8da4w-g32 --pte etllm/smollm2_8da4w.pte \\
        [--threads 1] [--runs 5] [--prompt 64] [--new 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hm_export.bench import set_threads
from hm_export.bundle import read_manifest
from hm_export.runtime_stubs.loader import BundleLoader, target_files

Step = Callable[[torch.Tensor, int], torch.Tensor]  # (tokens [1, n], input_pos) -> logits of the last position


@dataclass
class Program:
    name: str
    bytes_on_disk: int
    bytes_per_token: int
    step: Step = field(repr=False)
    prefill_tps: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)


def _last_logits(out: torch.Tensor) -> torch.Tensor:
    return out.reshape(-1, out.shape[-1])[-1]


def bundle_program(bundle: Path) -> Program:
    """The bundle's ExecuTorch decode program with the memory of its first check's path in the slot."""
    loader = BundleLoader(bundle, target=None, verify=False)
    checks = json.loads((bundle / read_manifest(bundle)["checks"]["file"]).read_text())["checks"]
    loader.set_path(checks[0]["path"])
    decoder = loader.open_decoder("executorch")
    files = target_files(loader.root, loader.manifest, "executorch", decode=True)
    program_bytes = sum(path.stat().st_size for path in files.values())
    index = loader.bank.index
    path_bytes = sum(index.entry(level, node).length for level, node in enumerate(checks[0]["path"]))
    slot_bytes = sum(t.numel() * t.element_size() for t in loader.slot)
    per_token = program_bytes - _embedding_bytes(loader.manifest) + slot_bytes
    return Program(
        f"bundle:{bundle.name}",
        program_bytes + path_bytes,
        per_token,
        lambda tokens, pos: _last_logits(decoder(tokens, pos, loader.slot)),
    )


def _embedding_bytes(manifest: dict) -> int:
    """Bytes of the embedding table in the ExecuTorch program (read one row per token)."""
    model = manifest["model"]
    entry = manifest["targets"]["executorch"].get("anchor_quant", {}).get("embedding")
    values = model["vocab_size"] * model["d_model"]
    if entry is None:
        return 4 * values
    bits = 4 if "int4" in entry["weights"] else 8
    return values * bits // 8 + 2 * values // entry["group"]


def anchor_only_program(bundle: Path, workdir: Path) -> Program:
    """The bundle's decode program exported without memory (same anchor preset), from its source checkpoint."""
    from hm_export.anchor_quant import exported_model, get_preset
    from hm_export.checkpoint import load_checkpoint
    from hm_export.decode import trace_decode_program
    from hm_export.passes.pipeline import PIPELINES
    from hm_export.slot import SlotContract
    from hm_export.targets.executorch import emit_executorch

    manifest = read_manifest(bundle)
    ckpt = load_checkpoint(Path(manifest["source"]["checkpoint"]))
    preset = manifest["targets"]["executorch"].get("anchor_quant", {}).get("preset", "none")
    model, _ = exported_model(ckpt.model, get_preset(preset))
    contract = SlotContract.for_model(ckpt.config, ckpt.config.max_seq_len)
    traced = trace_decode_program(model, contract, PIPELINES["xnnpack_slot"], "state", memory=False, attention="kernel")
    out = workdir / f"{bundle.name}-anchor-only"
    emitted = emit_executorch(traced, out)
    return pte_program(out / emitted["files"]["program"], f"anchor-only:{bundle.name}", manifest)


def pte_program(path: Path, name: str | None = None, manifest: dict | None = None) -> Program:
    """A plain program: ``forward(tokens [1, n], input_pos [1])`` with its KV cache in mutable buffers."""
    import executorch.kernels.quantized  # noqa: F401  (quantized embeddings)
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (export_llm's sdpa / update_cache)
    from executorch.runtime import Runtime

    from hm_export.kernels import load_kernel_library

    load_kernel_library()  # the hm_export ops of an anchor-only program
    method = Runtime.get().load_program(str(path)).load_method("forward")
    size = path.stat().st_size
    per_token = size - (_embedding_bytes(manifest) if manifest else 0)
    return Program(
        name or f"pte:{path.name}",
        size,
        per_token,
        lambda tokens, pos: _last_logits(method.execute([tokens, torch.tensor([pos])])[0]),
    )


def read_bandwidth_gbs(megabytes: int = 1024, repeats: int = 3) -> float:
    """Single-thread read bandwidth: the best of ``repeats`` sums over a buffer larger than any cache here."""
    data = np.ones(megabytes * 2**20 // 8, dtype=np.float64)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def time_program(program: Program, prompt: torch.Tensor, new_tokens: int) -> None:
    start = time.perf_counter()
    logits = program.step(prompt, 0)
    program.prefill_tps.append(prompt.shape[1] / (time.perf_counter() - start))
    position = prompt.shape[1]
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = program.step(logits.argmax().reshape(1, 1), position)
        position += 1
    program.decode_tps.append(new_tokens / (time.perf_counter() - start))


def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.mean(values), 1),
        "sd": round(statistics.stdev(values), 1) if len(values) > 1 else 0.0,
        "runs": [round(v, 1) for v in values],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, action="append", default=[])
    parser.add_argument("--pte", type=Path, action="append", default=[], help="plain programs; the first: reference")
    parser.add_argument("--anchor-only", action="store_true", help="also each bundle's program without memory")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=49152, help="prompt tokens are drawn below this id")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hm-bench-anchor-quant"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    programs = [pte_program(path) for path in args.pte] + [bundle_program(b) for b in args.bundle]
    if args.anchor_only:
        programs += [anchor_only_program(b, args.workdir) for b in args.bundle]
    prompt = torch.from_numpy(np.random.default_rng(0).integers(1, args.vocab, (1, args.prompt)))
    for program in programs:  # warm up: first calls allocate and pack
        time_program(program, prompt[:, :8], 2)
        program.prefill_tps.clear()
        program.decode_tps.clear()
    for run in range(args.runs):
        for program in programs:
            time_program(program, prompt, args.new)
        print(f"run {run + 1}/{args.runs}", file=sys.stderr)
    bandwidth = read_bandwidth_gbs()
    reference = programs[0]
    rows = []
    for p in programs:
        decode, prefill = statistics.mean(p.decode_tps), statistics.mean(p.prefill_tps)
        rows.append(
            {
                "program": p.name,
                "bytes_on_disk": p.bytes_on_disk,
                "bytes_read_per_token": p.bytes_per_token,
                "bandwidth_bound_tokens_per_s": round(bandwidth * 1e9 / p.bytes_per_token, 1),
                "prefill_tokens_per_s": summary(p.prefill_tps),
                "decode_tokens_per_s": summary(p.decode_tps),
                "decode_ratio_to_reference": round(decode / statistics.mean(reference.decode_tps), 3),
                "prefill_ratio_to_reference": round(prefill / statistics.mean(reference.prefill_tps), 3),
            }
        )
    report = {
        "reference": reference.name,
        "threads": args.threads,
        "runs": args.runs,
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
        "read_bandwidth_gbs": round(bandwidth, 2),
        "programs": rows,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
