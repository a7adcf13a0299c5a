"""``hm-export bank inspect`` / ``check``: describe a bank, verify every block."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hm_export.bank.format import FORMAT_VERSION, PAYLOAD_ALIGNMENT, BlockEntry
from hm_export.bank.reader import BankReader, aligned_buffer
from hm_export.bank.schemes import bits_per_parameter
from hm_export.errors import BankError


def inspect_bank(bank_dir: Path | str) -> dict[str, Any]:
    """Format, layout, per-level schemes, block sizes and bytes on disk of a bank (reads only the index)."""
    with BankReader(bank_dir, check_files=False) as reader:
        index = reader.index
    mem, layers = index.memory, index.layers
    levels = []
    for level, scheme in enumerate(index.level_schemes):
        width, nodes = mem.widths[level], mem.nodes_at(level)
        length = index.entry(level, 0).length
        levels.append(
            {
                "level": level,
                "scheme": scheme.name,
                "scheme_id": scheme.id,
                "group_size": scheme.group_size,
                "nodes": nodes,
                "width": width,
                "params_per_block": 3 * layers * index.d_model * width,
                "payload_bytes_per_block": length,
                "read_bytes_per_block": PAYLOAD_ALIGNMENT + length,
                "bits_per_param": round(bits_per_parameter(scheme, layers, index.d_model, width), 4),
                "payload_bytes": nodes * length,
            }
        )
    files = [p for p in Path(bank_dir).rglob("*") if p.is_file()]
    return {
        "bank": str(bank_dir),
        "format_version": FORMAT_VERSION,
        "scheme": index.scheme,
        "layout": index.layout,
        "schema_hash": index.schema_hash,
        "d_model": index.d_model,
        "memory_layers": list(mem.layers),
        "branching": list(mem.branching),
        "widths": list(mem.widths),
        "blocks": len(index.blocks),
        "params": sum(lv["params_per_block"] * lv["nodes"] for lv in levels),
        "levels": levels,
        "read_bytes_per_path": sum(lv["read_bytes_per_block"] for lv in levels),
        "files": len(files),
        "bytes_on_disk": sum(p.stat().st_size for p in files),
    }


@dataclass
class CheckReport:
    bank: str
    blocks: int
    bytes_checked: int
    seconds: float
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def check_bank(
    bank_dir: Path | str,
    workers: int | None = None,
    blocks: Collection[tuple[int, int]] | None = None,
    index_sha256: str | None = None,
) -> CheckReport:
    """Read every block (or only the ``(level, node)`` of ``blocks``) once and verify its header and CRC-32
    (and sha256, with ``index_sha256`` from a signed manifest: see :class:`BankReader`); collect (not raise) the
    failures.

    An unreadable index raises :class:`BankError`.  Reads and CRCs release the GIL, so threads use every core.
    """
    start = time.perf_counter()
    local = threading.local()  # one reusable read buffer per thread and level
    with BankReader(bank_dir, check_files=False, index_sha256=index_sha256) as reader:

        def check(entry: BlockEntry) -> tuple[int, dict[str, Any] | None]:
            buffers: dict[int, np.ndarray] = local.__dict__.setdefault("buffers", {})
            if entry.level not in buffers:
                buffers[entry.level] = aligned_buffer(reader.block_size(entry.level))
            try:
                reader.read_into(entry.level, entry.node, buffers[entry.level], verify=True)
            except BankError as exc:
                return 0, {"level": entry.level, "node": entry.node, "file": entry.file, "error": str(exc)}
            return reader.block_size(entry.level), None

        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            wanted = None if blocks is None else set(blocks)
            entries = [e for e in reader.index.blocks if wanted is None or (e.level, e.node) in wanted]
            results = list(pool.map(check, entries))
    return CheckReport(
        str(bank_dir),
        len(results),
        sum(size for size, _ in results),
        round(time.perf_counter() - start, 3),
        [failure for _, failure in results if failure],
    )
