"""Bank loader benchmark (docs/bank-benchmarks.md), printed in one run:

* loader throughput / raw read throughput of the same bytes, warm page cache, per read mode
  (``pread``, ``readinto``, ``mmap``), CRC-32 verification off and on.  "Raw" is the least any reader
  does: ``open`` + one ``preadv`` of the block's range into a reused buffer + ``close``, no checks;
* dequantize throughput per scheme and level shape, straight into the slot's level ranges (the real fill);
* peak RSS of a fresh process serving random paths from the big bank vs from a bank ~1/95 its size with the
  same block shapes, for the streaming policy and for level 0 resident + a 256 MiB LRU.

Usage: ``python scripts/bench_bank.py [--bank BIG] [--small-bank SMALL] [--scale paper|tiny] [--json]``: a bank not
given (e.g. kept by ``scripts/paper_scale_bank.py --keep``) is synthesized under ``--dir`` and deleted after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import SMALL_OF, bank_config, files_under, run_measured, scale_config, write_synthetic_checkpoint

from hm_export.bank import PAYLOAD_ALIGNMENT, SCHEMES, BankReader, aligned_buffer, quantize_bank
from hm_export.bank.schemes import BlockArrays
from hm_export.config import ModelConfig
from hm_export.runtime_stubs.block_cache import BlockCache, CachePolicy, slot_destination
from hm_export.slot import SlotContract, empty_slot

SERVE = """
import json, sys, time
from benchlib import bank_config, random_paths
from hm_export.bank import BankReader
from hm_export.runtime_stubs.block_cache import CachePolicy, SlotFiller
from hm_export.slot import SlotContract
reader = BankReader(sys.argv[1])
memory = reader.index.memory
contract = SlotContract.for_model(bank_config(reader.index.d_model, memory), seq_len=1)
filler = SlotFiller(contract, reader, CachePolicy(int(sys.argv[2]), int(sys.argv[3])))
start = time.perf_counter()
for path in random_paths(memory, int(sys.argv[4]), seed=3):
    filler.set_path(path)
seconds = time.perf_counter() - start
status = open("/proc/self/status").read().splitlines()
hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mib": round(hwm / 1024, 1), "serve_seconds": round(seconds, 2),
                  "resident_mib": round(filler.blocks.resident_bytes / 2**20, 1),
                  "lru_mib": round(filler.blocks.cached_bytes / 2**20, 1)}))
"""
POLICIES = {"streaming": (0, 0), "level0-resident+256MB-LRU": (1, 256 << 20)}


def _gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3)


def raw_read(reader: BankReader, keys: list[tuple[int, int]]) -> float:
    """Seconds to read the blocks' byte ranges with open + one preadv + close each, no checks."""
    buffer = memoryview(aligned_buffer(max(reader.block_size(lv) for lv, _ in keys)))
    start = time.perf_counter()
    for level, node in keys:
        entry = reader.index.entry(level, node)
        fd = os.open(reader.bank_dir / entry.file, os.O_RDONLY)
        os.preadv(fd, [buffer[: PAYLOAD_ALIGNMENT + entry.length]], entry.offset - PAYLOAD_ALIGNMENT)
        os.close(fd)
    return time.perf_counter() - start


def loader_read(bank: Path, keys: list[tuple[int, int]], mode: str, verify: bool) -> float:
    """Seconds for the streaming loader (no cache: one read per block into its level buffer) to fetch the blocks."""
    with BankReader(bank, mode) as reader:
        cache = BlockCache(reader, CachePolicy(resident_levels=0, cache_bytes=0, verify=verify))
        start = time.perf_counter()
        for key in keys:
            cache.get(*key)
        seconds = time.perf_counter() - start
        cache.close()
    return seconds


def throughput(bank: Path, max_bytes: int, repeats: int) -> dict[str, Any]:
    """Loader vs raw reads of the same blocks (every level, index order, up to ``max_bytes``), warm cache."""
    reader = BankReader(bank)
    keys, total = [], 0
    for entry in reader.index.blocks:
        size = PAYLOAD_ALIGNMENT + entry.length
        if total + size > max_bytes:
            break
        keys.append((entry.level, entry.node))
        total += size
    raw_read(reader, keys)  # warm the page cache
    raw = min(raw_read(reader, keys) for _ in range(repeats))
    rows = []
    for mode in ("pread", "readinto", "mmap"):
        for verify in (False, True):
            seconds = min(loader_read(bank, keys, mode, verify) for _ in range(repeats))
            rows.append(
                {"mode": mode, "verify": verify, "gb_per_s": _gbps(total, seconds), "ratio": round(raw / seconds, 3)}
            )
    return {"blocks": len(keys), "bytes": total, "raw_gb_per_s": _gbps(total, raw), "loader": rows}


def dequantize(cfg: ModelConfig, schemes: list[str], repeats: int) -> list[dict[str, Any]]:
    """Decode one random block per (scheme, level shape) straight into a slot's level ranges; best of ``repeats``."""
    contract = SlotContract.for_model(cfg, seq_len=1)
    slot = empty_slot(contract)
    layers, d = len(cfg.memory.layers), cfg.d_model
    rng = np.random.default_rng(0)
    rows = []
    for level, width in enumerate(cfg.memory.widths):
        shapes = [(layers, d, width), (layers, d, width), (layers, width, d)]
        block = BlockArrays(*(rng.standard_normal(shape, dtype=np.float32) * 0.05 for shape in shapes))
        destination = slot_destination(contract, slot, level)
        for name in schemes:
            scheme = SCHEMES[name]
            payload = memoryview(scheme.encode_block(block))
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                scheme.decode_block_into(payload, layers, d, width, destination)
                best = min(best, time.perf_counter() - start)
            rows.append(
                {
                    "scheme": name,
                    "level": level,
                    "width": width,
                    "payload_bytes": len(payload),
                    "ms": round(best * 1e3, 3),
                    "out_gb_per_s": _gbps(3 * layers * d * width * 4, best),
                    "in_gb_per_s": _gbps(len(payload), best),
                }
            )
    return rows


def serving_rss(banks: dict[str, Path], paths: int) -> list[dict[str, Any]]:
    """Peak RSS (VmHWM) of a fresh process filling a slot with ``paths`` random paths, per bank and policy."""
    rows = []
    for policy, (resident, cache_bytes) in POLICIES.items():
        for name, bank in banks.items():
            measured = run_measured(SERVE, str(bank), str(resident), str(cache_bytes), str(paths))
            bank_bytes = sum(p.stat().st_size for p in files_under(bank))
            rows.append({"policy": policy, "bank": name, "bank_gb": round(bank_bytes / 1e9, 3), **measured.result})
    return rows


def synthesize(bank: Path, scale: str, scheme: str) -> Path:
    """Write a synthetic bf16 source at ``scale``, quantize it to ``bank`` with ``scheme``, drop the source."""
    source = bank.with_name(f"{bank.name}-source")
    write_synthetic_checkpoint(source, scale_config(scale))
    quantize_bank(bank, source, scheme)
    shutil.rmtree(source)
    return bank


def run(banks: dict[str, Path], schemes: list[str], max_bytes: int, repeats: int, paths: int) -> dict[str, Any]:
    index = BankReader(banks["big"]).index
    cfg = bank_config(index.d_model, index.memory)
    rss = serving_rss(banks, paths)
    by_policy = {row["policy"]: {} for row in rss}
    for row in rss:
        by_policy[row["policy"]][row["bank"]] = row["peak_rss_mib"]
    return {
        "bank": str(banks["big"]),
        "bank_scheme": index.scheme,
        "layout": index.layout,
        "read": throughput(banks["big"], max_bytes, repeats),
        "dequantize": dequantize(cfg, schemes, repeats),
        "serving_rss": rss,
        "rss_big_over_small": {p: round(v["big"] / v["small"], 3) for p, v in by_policy.items()},
    }


def print_tables(result: dict[str, Any]) -> None:
    read = result["read"]
    print(f"bank {result['bank']} ({result['bank_scheme']}, {result['layout']})")
    print(
        f"\nread: {read['blocks']} blocks, {read['bytes'] / 1e9:.3f} GB, raw {read['raw_gb_per_s']} GB/s (warm cache)"
    )
    print("| read mode | CRC-32 | loader GB/s | loader / raw |\n|---|---|---:|---:|")
    for row in read["loader"]:
        print(f"| {row['mode']} | {'on' if row['verify'] else 'off'} | {row['gb_per_s']} | {row['ratio']} |")
    print(
        "\n| scheme | level (width) | payload bytes | ms | GB/s out (fp32) | GB/s in |\n|---|---|---:|---:|---:|---:|"
    )
    for row in result["dequantize"]:
        print(
            f"| {row['scheme']} | {row['level']} ({row['width']}) | {row['payload_bytes']} | {row['ms']} | "
            f"{row['out_gb_per_s']} | {row['in_gb_per_s']} |"
        )
    print("\n| policy | bank | bank GB | peak RSS MiB | resident MiB | LRU MiB |\n|---|---|---:|---:|---:|---:|")
    for row in result["serving_rss"]:
        print(
            f"| {row['policy']} | {row['bank']} | {row['bank_gb']} | {row['peak_rss_mib']} | {row['resident_mib']} | "
            f"{row['lru_mib']} |"
        )
    print(f"\npeak RSS big / small: {result['rss_big_over_small']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bank", type=Path, help="The big bank (default: synthesize one at --scale).")
    parser.add_argument(
        "--small-bank", type=Path, help="Same blocks, ~1/100 of the nodes (default: synthesize one for --scale)."
    )
    parser.add_argument("--scale", choices=sorted(SMALL_OF), default="paper", help="Scale of synthesized banks.")
    parser.add_argument("--scheme", default="int4-g32", help="Scheme of synthesized banks.")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/hm-bench-bank"), help="Where to synthesize.")
    parser.add_argument("--schemes", default="float16,bfloat16,int8,int4-g32,int4-g128")
    parser.add_argument("--max-gb", type=float, default=2.0, help="Bytes read in the throughput test.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paths", type=int, default=500, help="Random paths served in the RSS test.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    banks, synthesized = {"big": args.bank, "small": args.small_bank}, []
    try:
        for name, scale in (("big", args.scale), ("small", SMALL_OF[args.scale])):
            if banks[name] is None:
                banks[name] = synthesize(args.dir / f"bank-{name}", scale, args.scheme)
                synthesized.append(banks[name])
        result = run(banks, args.schemes.split(","), int(args.max_gb * 1e9), args.repeats, args.paths)
    finally:
        for bank in synthesized:
            shutil.rmtree(bank, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_tables(result)


if __name__ == "__main__":
    main()
