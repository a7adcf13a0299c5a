"""Paper-scale proof of the bank format, quantizer and loader (docs/bank-benchmarks.md).

1. Write a synthetic bf16 bank source in the checkpoint format with the paper's 160M configuration
   (35 layers, d = 512, levels of 16 / 256 / 4096 nodes with widths 256 / 64 / 16: 4.6B parameters,
   ~9.2 GB), streaming: never more than a few blocks in memory.
2. Quantize it with each scheme (a subprocess whose whole process tree's RSS is sampled), from a cold
   page cache (the source's pages are dropped first): throughput in GB/s of input, peak RSS, bank size.
3. Fetch random root-to-leaf paths into a slot with the streaming loader (no cache: every changed level is
   one read from storage), warm page cache and cold (each block's pages dropped before its read): p50/p99
   fetch+fill latency per level and bytes read per context swap.

Usage: ``python scripts/paper_scale_bank.py [--dir /tmp/hm-paper-bank] [--scale paper|small|tiny] [--json]``.
Everything written under ``--dir`` is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from benchlib import (
    evict_page_cache,
    files_under,
    percentiles,
    random_paths,
    run_measured,
    scale_config,
    write_synthetic_checkpoint,
)

from hm_export.bank import BankReader
from hm_export.bank.format import block_file
from hm_export.bank.tools import inspect_bank
from hm_export.config import ModelConfig
from hm_export.runtime_stubs.block_cache import CachePolicy, SlotFiller
from hm_export.slot import SlotContract

IMPORTS_ONLY = "import hm_export.bank; print('{}')"  # the interpreter + numpy + torch baseline
QUANTIZE = """
import json, sys
from hm_export.bank import quantize_bank
report = quantize_bank(sys.argv[1], sys.argv[2], sys.argv[3], layout=sys.argv[4], workers=int(sys.argv[5]) or None)
print(json.dumps(report.to_dict()))
"""


def quantize_measured(
    source: Path, bank: Path, scheme: str, layout: str, workers: int, cold: bool = True
) -> dict[str, Any]:
    """Quantize in a subprocess, sampling its process tree's memory; ``cold``: drop the source's pages first."""
    if cold:
        evict_page_cache(files_under(source))
    measured = run_measured(QUANTIZE, str(bank), str(source), scheme, layout, str(workers))
    report = measured.result
    return {
        "scheme": scheme,
        "layout": layout,
        "source_cache": "cold" if cold else "warm",
        "level_schemes": report["level_schemes"],
        "workers": report["workers"],
        "seconds": report["seconds"],
        "source_gb": round(report["source_bytes"] / 1e9, 3),
        "input_gb_per_s": report["source_gb_per_s"],
        "peak_pss_mib": measured.peak_tree_pss_mib,
        "peak_process_rss_mib": measured.peak_process_rss_mib,
        "bank_bytes": report["bank_bytes"],
    }


def fetch_latency(bank: Path, cfg: ModelConfig, count: int, cold: bool, seed: int = 1) -> dict[str, Any]:
    """Swap through ``count`` random paths with no cache; fetch and fetch+fill latency per level, bytes/swap."""
    contract = SlotContract.for_model(cfg, seq_len=1)
    filler = SlotFiller(contract, BankReader(bank), CachePolicy(resident_levels=0, cache_bytes=0))
    total: dict[int, list[float]] = {lv: [] for lv in range(cfg.memory.num_levels)}
    fetch: dict[int, list[float]] = {lv: [] for lv in range(cfg.memory.num_levels)}
    swap_bytes, swap_seconds = [], []
    layout = filler.blocks.reader.index.layout
    try:
        for index, path in enumerate(random_paths(cfg.memory, count + 1, seed)):
            if cold and layout == "per-block":
                evict_page_cache([bank / block_file(lv, node) for lv, node in enumerate(path)])
            update = filler.set_path(path)
            if index == 0:  # the first fill of an empty slot is not a swap
                continue
            for level, seconds, fetched in zip(update.levels_changed, update.level_seconds, update.fetch_seconds):
                total[level].append(seconds)
                fetch[level].append(fetched)
            swap_bytes.append(update.storage_bytes)
            swap_seconds.append(update.seconds)
    finally:
        filler.close()
    levels = [lv for lv in total if total[lv]]
    return {
        "cold": cold,
        "swaps": count,
        "per_level": {f"level{lv}": percentiles(total[lv]) for lv in levels},
        "fetch_only": {f"level{lv}": percentiles(fetch[lv]) for lv in levels},
        "swap": percentiles(swap_seconds),
        "bytes_per_swap_mean": round(sum(swap_bytes) / len(swap_bytes)),
    }


def swap_bytes_model(bank: Path) -> dict[str, Any]:
    """Bytes read per context swap, by which levels change (from the index: one read per changed level)."""
    summary = inspect_bank(bank)
    reads = [lv["read_bytes_per_block"] for lv in summary["levels"]]
    nodes = [lv["nodes"] for lv in summary["levels"]]
    # Two independent uniformly random leaves share level l's node with probability 1 / n_l.
    expected_random = sum(size * (1 - 1 / n) for size, n in zip(reads, nodes))
    return {
        "read_bytes_per_block": reads,
        "full_path": sum(reads),
        "sibling_leaf_swap": reads[-1],
        "expected_random_swap": round(expected_random),
        "expected_random_swap_level0_resident": round(expected_random - reads[0] * (1 - 1 / nodes[0])),
    }


def run(
    directory: Path, scale: str, schemes: list[str], layouts: list[str], paths: int, workers: int, warm: bool
) -> dict:
    cfg = scale_config(scale)
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "source"
    start = time.perf_counter()
    source_bytes = write_synthetic_checkpoint(source, cfg, workers=workers or None)
    params = sum(cfg.block_params(lv) * cfg.memory.nodes_at(lv) for lv in range(cfg.memory.num_levels))
    result: dict[str, Any] = {
        "scale": scale,
        "config": {
            "d_model": cfg.d_model,
            "memory_layers": len(cfg.memory.layers),
            "branching": list(cfg.memory.branching),
            "widths": list(cfg.memory.widths),
            "nodes": [cfg.memory.nodes_at(lv) for lv in range(cfg.memory.num_levels)],
            "bank_params": params,
            "fetched_params_per_path": sum(cfg.block_params(lv) for lv in range(cfg.memory.num_levels)),
        },
        "source": {
            "dtype": "bfloat16",
            "bytes": source_bytes,
            "write_seconds": round(time.perf_counter() - start, 1),
        },
        "quantize_baseline_pss_mib": run_measured(IMPORTS_ONLY).peak_tree_pss_mib,
        "quantize": [],
        "fetch": [],
    }
    for layout in layouts:
        for scheme in schemes:
            bank = directory / f"bank-{scheme}-{layout}"
            quantized = quantize_measured(source, bank, scheme, layout, workers)
            quantized["bits_per_param"] = round(8 * quantized["bank_bytes"] / params, 3)
            result["quantize"].append(quantized)
            entry = {"scheme": scheme, "layout": layout, "bytes_model": swap_bytes_model(bank)}
            entry["warm"] = fetch_latency(bank, cfg, paths, cold=False)
            if layout == "per-block":
                entry["cold"] = fetch_latency(bank, cfg, paths, cold=True)
            result["fetch"].append(entry)
    for scheme in schemes if warm else []:  # the same quantization with the source in the page cache
        bank = directory / f"bank-{scheme}-warm"
        for path in files_under(source):  # make sure every page of the source is cached
            with open(path, "rb") as handle:
                while handle.read(64 << 20):
                    pass
        quantized = quantize_measured(source, bank, scheme, layouts[0], workers, cold=False)
        quantized["bits_per_param"] = round(8 * quantized["bank_bytes"] / params, 3)
        result["quantize"].append(quantized)
        shutil.rmtree(bank)
    return result


def print_tables(result: dict) -> None:
    config = result["config"]
    print(f"bank: {config['bank_params'] / 1e9:.2f}B params, nodes {config['nodes']}, widths {config['widths']}")
    print(f"bf16 source: {result['source']['bytes'] / 1e9:.2f} GB written in {result['source']['write_seconds']} s")
    print(f"quantizer process after imports (python, numpy, torch): {result['quantize_baseline_pss_mib']} MiB PSS")
    print(
        "\n| scheme | layout | source cache | input GB/s | seconds | peak PSS MiB, all processes "
        "| peak RSS MiB, largest process | bank GB | bits/param |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for q in result["quantize"]:
        print(
            f"| {q['scheme']} | {q['layout']} | {q['source_cache']} | {q['input_gb_per_s']:.3f} | {q['seconds']:.1f} | "
            f"{q['peak_pss_mib']:.0f} | {q['peak_process_rss_mib']:.0f} | {q['bank_bytes'] / 1e9:.3f} | "
            f"{q['bits_per_param']} |"
        )
    print(
        "\n| scheme | layout | page cache | level | fetch+fill p50 ms | p99 ms | fetch only p50 ms | p99 ms "
        "| bytes per read |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for f in result["fetch"]:
        reads = f["bytes_model"]["read_bytes_per_block"]
        for mode in ("warm", "cold"):
            if mode not in f:
                continue
            for name, stats in f[mode]["per_level"].items():
                size, fetched = reads[int(name.removeprefix("level"))], f[mode]["fetch_only"][name]
                print(
                    f"| {f['scheme']} | {f['layout']} | {mode} | {name} | {stats['p50_ms']} | {stats['p99_ms']} "
                    f"| {fetched['p50_ms']} | {fetched['p99_ms']} | {size} |"
                )
    print("\n| scheme | layout | measured bytes/swap | full path | sibling swap | expected random | level 0 resident |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for f in result["fetch"]:
        m = f["bytes_model"]
        print(
            f"| {f['scheme']} | {f['layout']} | {f['warm']['bytes_per_swap_mean']} | {m['full_path']} | "
            f"{m['sibling_leaf_swap']} | {m['expected_random_swap']} | {m['expected_random_swap_level0_resident']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/hm-paper-bank"))
    parser.add_argument("--scale", choices=["paper", "small", "tiny"], default="paper")
    parser.add_argument("--schemes", default="int8,int4-g32")
    parser.add_argument("--layouts", default="per-block", help="Comma-separated: per-block, per-level.")
    parser.add_argument("--paths", type=int, default=300, help="Random path swaps per fetch measurement.")
    parser.add_argument("--workers", type=int, default=0, help="Quantizer processes (0: one per core).")
    parser.add_argument("--warm", action="store_true", help="Also quantize with the source in the page cache.")
    parser.add_argument("--keep", action="store_true", help="Keep the source and the banks.")
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")
    args = parser.parse_args()
    if args.dir.exists() and any(args.dir.iterdir()):
        parser.error(f"--dir {args.dir} is not empty (it is deleted at the end: give a new or empty directory)")
    try:
        layouts, schemes = args.layouts.split(","), args.schemes.split(",")
        result = run(args.dir, args.scale, schemes, layouts, args.paths, args.workers, args.warm)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_tables(result)


if __name__ == "__main__":
    main()
