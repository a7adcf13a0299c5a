"""Native verified-read throughput / raw read on a paper-scale bank (docs/native-runtime.md, "Verified reads").

Usage: ``python scripts/bench_verified_reads.py [--bank DIR | --dir /tmp/hm-read-bank] [--scheme int4-g32]
[--blocks 512] [--rounds 7] [--json]``

Without ``--bank`` it writes a bank in the paper's 160M configuration (35 layers, d 512, 16 / 256 / 4,096
nodes of widths 256 / 64 / 16: 4,368 blocks; int4-g32 is 2.6 GB) to ``--dir`` (deleted at the end unless
``--keep``): real headers, index and CRC-32s (the bank format's own writers), random payload bytes (the read
path never interprets them), per-level packs. ``--bank`` takes any bank instead, e.g. one that
scripts/paper_scale_bank.py --keep quantized. Then ``hm_bank_read`` reads the same random blocks raw,
verified as an unkeyed bundle reads them (CRC-32) and verified as a bundle opened with a trusted key reads them
(CRC-32 + sha256), interleaved, warm (page cache) and cold (each block's pages dropped first), and the ratios
verified / raw are printed: the target is >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path

from hm_export.bank.format import (
    BankIndex,
    BlockEntry,
    block_stride,
    header_page,
    make_header,
    pack_file,
    payload_crc32,
    payload_sha256,
)
from hm_export.bank.schemes import SCHEMES, resolve_preset
from hm_export.config import MemoryConfig
from hm_export.native import build_native_runner

ROOT = Path(__file__).resolve().parent.parent
PAPER = MemoryConfig(branching=(16, 16, 16), widths=(256, 64, 16), layers=tuple(range(35)))
D_MODEL = 512


def write_synthetic_bank(out: Path, scheme: str, memory: MemoryConfig = PAPER, d_model: int = D_MODEL) -> Path:
    """A bank in ``memory``'s shape with random payloads, one pack per level (streamed: one block in memory)."""
    out.mkdir(parents=True, exist_ok=False)
    blocks = []
    for level, name in enumerate(resolve_preset(scheme, memory.num_levels)):
        levels_scheme = SCHEMES[name]
        length = levels_scheme.payload_length(len(memory.layers), d_model, memory.widths[level])
        stride = block_stride(length)
        with open(out / pack_file(level), "wb") as pack:
            for node in range(memory.nodes_at(level)):
                payload = os.urandom(length)
                offset = node * stride + 4096
                crc = payload_crc32(payload)
                header = make_header(
                    levels_scheme, level, node, len(memory.layers), d_model, memory.widths[level], offset, length, crc
                )
                pack.seek(offset - 4096)
                pack.write(header_page(header) + payload)
                blocks.append(
                    BlockEntry(level, node, pack_file(level), offset, length, name, crc, payload_sha256(payload))
                )
            pack.truncate(memory.nodes_at(level) * stride)
    index = BankIndex(scheme, d_model, memory, "per-level", tuple(blocks), source="synthetic")
    (out / "index.json").write_text(json.dumps(index.to_dict()))
    BankIndex.load(out / "index.json")  # the format's own validation
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bank", type=Path, default=None)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/hm-read-bank"))
    parser.add_argument("--scheme", default="int4-g32")
    parser.add_argument(
        "--branching", default="16,16,16", help="the synthetic bank's tree (e.g. 8,2,2: 105 MB instead of 2.7 GB)"
    )
    parser.add_argument("--blocks", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build" / "native")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tool = build_native_runner(args.build_dir).parent / "hm_bank_read"
    branching = tuple(int(k) for k in args.branching.split(","))
    memory = MemoryConfig(branching, PAPER.widths, PAPER.layers)
    bank = args.bank or write_synthetic_bank(args.dir, args.scheme, memory)
    try:
        results = []
        for mode in ([], ["--cold"]):
            command = [str(tool), str(bank), "--blocks", str(args.blocks), "--rounds", str(args.rounds), *mode]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results.append(json.loads(done.stdout))
        bytes_total = sum(p.stat().st_size for p in bank.rglob("*") if p.is_file())
    finally:
        if args.bank is None and not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    if args.json:
        print(json.dumps({"bank_bytes": bytes_total, "results": results}, indent=2))
        return
    print(f"bank {bank}: {bytes_total / 1e9:.2f} GB")
    for r in results:
        print(
            f"{r['page_cache']}: raw {r['raw_gb_per_s']:.2f} GB/s; verified unkeyed ({r['crc32']}) "
            f"{r['verified_gb_per_s']:.2f} GB/s, ratio {r['ratio_median']:.3f} (min {r['ratio_min']:.3f}); "
            f"verified with a key (+ sha256) {r['verified_keyed_gb_per_s']:.2f} GB/s, ratio "
            f"{r['ratio_keyed_median']:.3f} (min {r['ratio_keyed_min']:.3f}); {r['rounds']} rounds of {r['blocks']} "
            "blocks"
        )


if __name__ == "__main__":
    main()
