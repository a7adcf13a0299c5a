"""What the per-block sha256 (bank format 3) costs on a block read, in Python (docs/bank-benchmarks.md).

Usage: ``python scripts/bench_block_hash.py [--scheme int4-g32] [--rounds 9] [--dir /tmp/hm-hash-bank] [--json]``

Writes one level pack per level of the paper's 160M configuration (35 layers, d 512, widths 256 / 64 / 16;
``--nodes`` blocks per level, random payloads, the format's own headers and index), then reads every block
three ways through ``BankReader.read_into``, interleaved block by block (page cache warm): unverified
(``verify=False``: header checks only), verified by an unkeyed reader (the CRC-32: what a bundle opened
without a trusted key checks) and verified by a keyed reader (``index_sha256`` given, as the loader does for a
bundle whose signature a trusted key verified: CRC-32 + sha256).  It prints the median time per block of
each and the ratios: the price of authenticating a block, paid once per block load and only with a key (the
block cache keeps loaded blocks; nothing is hashed per token).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import time
from pathlib import Path

from bench_verified_reads import D_MODEL, PAPER, write_synthetic_bank

from hm_export.bank import format as bank_format
from hm_export.bank.reader import BankReader, aligned_buffer
from hm_export.config import MemoryConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scheme", default="int4-g32")
    parser.add_argument("--nodes", type=int, default=4, help="blocks per level (level 0 has 16 in the paper)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/hm-hash-bank"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    memory = MemoryConfig((args.nodes, 1, 1), PAPER.widths, PAPER.layers)
    shutil.rmtree(args.dir, ignore_errors=True)
    bank = write_synthetic_bank(args.dir, args.scheme, memory, D_MODEL)
    results = []
    try:
        index_sha256 = hashlib.sha256((bank / "index.json").read_bytes()).hexdigest()
        with BankReader(bank) as reader, BankReader(bank, index_sha256=index_sha256) as keyed:
            for level in range(memory.num_levels):
                buffer = aligned_buffer(reader.block_size(level))
                nodes = range(memory.nodes_at(level))
                steps = {
                    "unverified": lambda node, level=level, buffer=buffer: reader.read_into(level, node, buffer, False),
                    "crc32": lambda node, level=level, buffer=buffer: reader.read_into(level, node, buffer, True),
                    "crc32+sha256": lambda node, level=level, buffer=buffer: keyed.read_into(level, node, buffer, True),
                }
                times: dict[str, list[float]] = {name: [] for name in steps}
                for _ in range(args.rounds):
                    for node in nodes:
                        for name, step in steps.items():
                            start = time.perf_counter()
                            step(node)
                            times[name].append(time.perf_counter() - start)
                medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
                results.append(
                    {
                        "level": level,
                        "payload_bytes": reader.block_size(level) - bank_format.PAYLOAD_ALIGNMENT,
                        "ms_per_block": {name: round(ms, 3) for name, ms in medians.items()},
                        "sha256_over_crc32_read": round(medians["crc32+sha256"] / medians["crc32"], 2),
                        "sha256_over_unverified_read": round(medians["crc32+sha256"] / medians["unverified"], 2),
                        "crc32_over_unverified_read": round(medians["crc32"] / medians["unverified"], 2),
                    }
                )
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    if args.json:
        print(json.dumps({"scheme": args.scheme, "rounds": args.rounds, "levels": results}, indent=2))
        return
    for r in results:
        ms = r["ms_per_block"]
        print(
            f"level {r['level']} ({r['payload_bytes'] / 1e6:.2f} MB payload): unverified {ms['unverified']:.3f} ms, "
            f"verified unkeyed (crc32) {ms['crc32']:.3f} ms, verified with a key (crc32+sha256) "
            f"{ms['crc32+sha256']:.3f} ms per block read; unkeyed x{r['crc32_over_unverified_read']} unverified, "
            f"keyed x{r['sha256_over_crc32_read']} unkeyed, x{r['sha256_over_unverified_read']} unverified"
        )


if __name__ == "__main__":
    main()
