"""Shared helpers of the bank scripts: synthetic checkpoints, page-cache eviction, RSS sampling, percentiles.

Imported by ``scripts/paper_scale_bank.py`` and ``scripts/bench_bank.py`` (the scripts folder is on
``sys.path`` when they run).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hm_export.checkpoint import FORMAT_NAME, FORMAT_VERSION, bank_file, expected_bank_shapes
from hm_export.config import MemoryConfig, ModelConfig

# The paper's 160M configuration (Pouransari et al. 2025): 35 layers, d = 512, memory on every layer,
# levels of 16 / 256 / 4096 nodes with block widths 256 / 64 / 16: 4.6B bank parameters.
SCALES: dict[str, dict[str, Any]] = {
    "paper": {"d_model": 512, "n_layers": 35, "branching": (16, 16, 16), "widths": (256, 64, 16)},
    # Same blocks (and slot), 1/95 of the parameters: for the "RSS does not grow with the bank" comparison.
    "small": {"d_model": 512, "n_layers": 35, "branching": (1, 2, 16), "widths": (256, 64, 16)},
    # Unit-test size: three levels, a few KB; and its "small" counterpart.
    "tiny": {"d_model": 32, "n_layers": 2, "branching": (2, 2, 2), "widths": (64, 32, 16)},
    "tiny-small": {"d_model": 32, "n_layers": 2, "branching": (1, 2, 2), "widths": (64, 32, 16)},
}
SMALL_OF = {"paper": "small", "tiny": "tiny-small"}


def scale_config(scale: str) -> ModelConfig:
    spec = SCALES[scale]
    return bank_config(spec["d_model"], MemoryConfig(spec["branching"], spec["widths"], tuple(range(spec["n_layers"]))))


def bank_config(d: int, memory: MemoryConfig) -> ModelConfig:
    """A model config around a bank (the anchor fields only need to be valid: the bank scripts never run it)."""
    layers = memory.layers[-1] + 1
    return ModelConfig(
        vocab_size=32000, d_model=d, n_layers=layers, n_heads=d // 64 or 1, n_kv_heads=d // 64 or 1,
        ffn_hidden=4 * d, max_seq_len=1024, memory=memory,
    )  # fmt: skip


def _bf16(values: np.ndarray) -> np.ndarray:
    bits = values.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")


def _synthetic_nodes(job: tuple[int, str, tuple[int, ...], int, int, float]) -> bytes:
    """bf16 bytes of nodes ``[first, last)`` of one tensor: Gaussian, per-node seeded, with a few outliers."""
    seed, _name, shape, first, last, std = job
    out = []
    for node in range(first, last):
        rng = np.random.default_rng([seed, node])
        values = rng.standard_normal(shape, dtype=np.float32) * std
        values.reshape(-1)[rng.integers(0, values.size, values.size // 4096)] *= 8  # heavy-ish tails
        out.append(_bf16(values).tobytes())
    return b"".join(out)


def write_synthetic_checkpoint(directory: Path, cfg: ModelConfig, seed: int = 0, workers: int | None = None) -> int:
    """Write ``config.json`` and ``bank_level{l}.safetensors`` (bf16) streaming, node by node; return bytes.

    The safetensors header is written by hand and the tensor data appended in chunks, so memory stays at
    a few blocks whatever the bank size.  Only what the quantizer reads is written (no anchor, router or
    tokenizer): this is a bank source, not a loadable model.
    """
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": cfg.to_dict(),
        "storage_dtype": "bfloat16",
        "router": {"embedder": "all-MiniLM-L6-v2", "dim": 384, "pooling": "mean", "normalize": True},
        "files": {"bank": [bank_file(lv) for lv in range(cfg.memory.num_levels)]},
        "metadata": {"synthetic": True, "seed": seed},
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    total = 0
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        for level in range(cfg.memory.num_levels):
            shapes = expected_bank_shapes(cfg, level)
            header, offset = {}, 0
            for name, shape in shapes.items():
                size = int(np.prod(shape)) * 2
                header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
                offset += size
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            path = directory / bank_file(level)
            with open(path, "wb") as handle:
                handle.write(struct.pack("<Q", len(raw)) + raw)
                for index, (name, shape) in enumerate(shapes.items()):
                    nodes, per_chunk = shape[0], max(1, (8 << 20) // (int(np.prod(shape[1:])) * 2))
                    std = cfg.d_model**-0.5 if name != "down" else 0.2 * shape[2] ** -0.5
                    jobs = [
                        (seed * 1000 + level * 10 + index, name, shape[1:], first, min(nodes, first + per_chunk), std)
                        for first in range(0, nodes, per_chunk)
                    ]
                    for chunk in pool.map(_synthetic_nodes, jobs):
                        handle.write(chunk)
            total += path.stat().st_size
    return total


def evict_page_cache(paths: list[Path]) -> None:
    """Drop the page cache of these files (posix_fadvise DONTNEED): the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def _tree_memory_kib(pid: int) -> tuple[int, int]:
    """(sum of PSS, largest RSS) over ``pid`` and its descendants, KiB.  PSS (proportional set size) counts
    pages shared by forked workers once, so the sum is the tree's real footprint."""
    pss, rss, todo = 0, 0, [pid]
    while todo:
        current = todo.pop()
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text().splitlines()
            pss += next(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))
            rss = max(rss, next(int(line.split()[1]) for line in rollup if line.startswith("Rss:")))
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return pss, rss


@dataclass
class Measured:
    result: Any
    peak_tree_pss_mib: float  # all processes together
    peak_process_rss_mib: float  # the largest single process
    seconds: float


def run_measured(code: str, *args: str, interval: float = 0.02) -> Measured:
    """Run ``python -c code args`` and sample the memory of its whole process tree; the code prints JSON last."""
    start = time.perf_counter()
    scripts = str(Path(__file__).resolve().parent)  # so the code can import benchlib
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [scripts, os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=env)
    peak_pss = peak_rss = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_pss, peak_rss
        while not stop.is_set():
            pss, rss = _tree_memory_kib(process.pid)
            peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
            stop.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = process.communicate()
    stop.set()
    sampler.join()
    if process.returncode:
        raise RuntimeError(f"measured subprocess failed with exit code {process.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    return Measured(result, round(peak_pss / 1024, 1), round(peak_rss / 1024, 1), time.perf_counter() - start)


def seconds_per_call(call: Callable[[], object], count: int) -> float:
    """Mean wall time of ``count`` back-to-back calls of ``call``."""
    start = time.perf_counter()
    for _ in range(count):
        call()
    return (time.perf_counter() - start) / count


def percentiles(values: list[float], scale: float = 1e3) -> dict[str, float]:
    """p50 / p99 / mean / max of ``values`` (seconds) in milliseconds."""
    array = np.asarray(values) * scale
    return {
        "n": len(values),
        "p50_ms": round(float(np.percentile(array, 50)), 3),
        "p99_ms": round(float(np.percentile(array, 99)), 3),
        "mean_ms": round(float(array.mean()), 3),
        "max_ms": round(float(array.max()), 3),
    }


def random_paths(memory: MemoryConfig, count: int, seed: int = 0) -> Iterator[tuple[int, ...]]:
    """Uniformly random leaves of the tree, as root-to-leaf node paths."""
    rng = np.random.default_rng(seed)
    leaves = memory.nodes_at(memory.num_levels - 1)
    for leaf in rng.integers(0, leaves, count):
        path, node = [], int(leaf)
        for level in reversed(range(memory.num_levels)):
            path.append(node)
            node //= memory.branching[level]
        yield tuple(reversed(path))
