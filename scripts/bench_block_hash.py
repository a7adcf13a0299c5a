"""What the per-block sha256 (bank format 3) costs on a block read, in Python (docs/bank-benchmarks.md).

Usage: ``python scripts/bench_block_hash.py [--scheme int4-g32] [--rounds 9] [--dir /tmp/hm-hash-bank] [--json]``

Writes one level pack per level of the paper's 160M configuration (35 layers, d 512, widths 256 / 64 / 16;
``--nodes`` blocks per level, random payloads, the format's own headers and index), then reads every block
with ``BankReader.read_into(verify=False)`` (header checks only; page cache warm), then times the CRC-32 and
the sha256 of the payload just read, interleaved block by block.  It prints the median time per block of
an unverified read, a CRC-only verified read (format 2) and a CRC + sha256 verified read (format 3's
``verify=True``), and the ratio of the last two: the price of authenticating a block, paid once per block
load (the block cache keeps loaded blocks; nothing is hashed per token).
"""

from __future__ import annotations

import argparse
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
        with BankReader(bank) as reader:
            for level in range(memory.num_levels):
                buffer = aligned_buffer(reader.block_size(level))
                nodes = range(memory.nodes_at(level))
                payloads = {}

                def read(node: int, level: int = level, buffer=buffer, payloads=payloads) -> None:
                    payloads[node] = reader.read_into(level, node, buffer, verify=False)

                def crc32(node: int, payloads=payloads) -> None:
                    bank_format.payload_crc32(payloads[node])

                def sha256(node: int, payloads=payloads) -> None:
                    bank_format.payload_sha256(payloads[node])

                times: dict[str, list[float]] = {"read": [], "crc32": [], "sha256": []}
                for _ in range(args.rounds):
                    for node in nodes:  # each step on the block just read, as read_into(verify=True) does
                        for name, step in zip(times, (read, crc32, sha256)):
                            start = time.perf_counter()
                            step(node)
                            times[name].append(time.perf_counter() - start)
                ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
                medians = {
                    "unverified": ms["read"],
                    "crc32": ms["read"] + ms["crc32"],
                    "crc32+sha256": ms["read"] + ms["crc32"] + ms["sha256"],
                }
                results.append(
                    {
                        "level": level,
                        "payload_bytes": reader.block_size(level) - bank_format.PAYLOAD_ALIGNMENT,
                        "ms_per_block": {name: round(ms, 3) for name, ms in medians.items()},
                        "sha256_over_crc32_read": round(medians["crc32+sha256"] / medians["crc32"], 2),
                        "sha256_over_unverified_read": round(medians["crc32+sha256"] / medians["unverified"], 2),
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
            f"crc32 {ms['crc32']:.3f} ms, crc32+sha256 {ms['crc32+sha256']:.3f} ms per block read; "
            f"x{r['sha256_over_crc32_read']} the CRC-only verified read, x{r['sha256_over_unverified_read']} unverified"
        )


if __name__ == "__main__":
    main()
