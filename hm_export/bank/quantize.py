"""Streaming, parallel, resumable quantizer: checkpoint bank -> bank directory.

The checkpoint's ``bank_level{l}.safetensors`` are read level by level, one node's slice of each tensor
at a time (``os.pread`` of byte ranges computed from the safetensors header: no mmap, no whole tensor in
memory), so a worker holds O(one block).  Blocks are quantized by a process pool (one worker per core).

Crash safety and resumption:

* ``index.json`` is removed before the first block and written (temp + rename) last: a directory with an
  ``index.json`` is a complete bank; anything else is not a bank.
* per-block files are written to a temp file and renamed into place; level packs are written into a
  ``.level{l}.hmp.partial`` file (payload first, header page last) that is renamed when the level is done.
* ``.quantize-state.json`` records the job's fingerprint (source checkpoint, schemes, layout, format
  version).  A rerun with the same fingerprint keeps every block already on disk whose header matches and
  whose payload CRC-32 is right, and quantizes the rest; a different fingerprint starts over.  So a rerun
  after a crash finishes the job, and a rerun of a finished job rewrites nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hm_export.atomic import write_atomic
from hm_export.bank.format import (
    FORMAT_VERSION,
    INDEX_FILE,
    LAYOUTS,
    PAYLOAD_ALIGNMENT,
    BankIndex,
    BlockEntry,
    block_file,
    block_stride,
    check_header,
    header_page,
    make_header,
    pack_file,
    payload_crc32,
    payload_sha256,
)
from hm_export.bank.schemes import SCHEMES, BlockArrays, resolve_preset
from hm_export.checkpoint import CheckpointError, bank_file, expected_bank_shapes, read_config
from hm_export.config import ConfigError, ModelConfig
from hm_export.console import progress_bar
from hm_export.errors import BankError

STATE_FILE = ".quantize-state.json"
SOURCE_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


@dataclass(frozen=True)
class SourceTensor:
    """Where one node's slice of a checkpoint bank tensor lies in its safetensors file."""

    dtype: str  # safetensors dtype name
    start: int  # absolute file offset of node 0
    node_bytes: int


def read_safetensors_header(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The raw JSON header of a safetensors file and its parsed form (``__metadata__`` dropped)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            raw = handle.read(length)
        header = json.loads(raw)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing") from exc
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file ({exc})") from exc
    if len(raw) != length or not isinstance(header, dict):
        raise CheckpointError(f"{path}: truncated or malformed safetensors header")
    header.pop("__metadata__", None)
    return raw, header


def level_sources(path: Path, cfg: ModelConfig, level: int) -> dict[str, SourceTensor]:
    """Validate a level's safetensors file (names, shapes, float dtypes, size) and locate its tensors."""
    raw, header = read_safetensors_header(path)
    expected = expected_bank_shapes(cfg, level)
    if set(header) != set(expected):
        raise CheckpointError(f"{path}: tensors {sorted(header)}, expected {sorted(expected)}")
    data_start, size = 8 + len(raw), path.stat().st_size
    sources = {}
    for name, shape in expected.items():
        info = header[name]
        if tuple(info.get("shape", ())) != shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {info.get('shape')}, expected {shape}")
        if info.get("dtype") not in SOURCE_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {info.get('dtype')}, expected a float")
        begin, end = info["data_offsets"]
        itemsize = np.dtype(SOURCE_DTYPES[info["dtype"]]).itemsize
        if end - begin != int(np.prod(shape)) * itemsize or data_start + end > size:
            raise CheckpointError(f"{path}: tensor {name!r} data {begin}..{end} does not fit its shape or the file")
        sources[name] = SourceTensor(info["dtype"], data_start + begin, (end - begin) // shape[0])
    return sources


def read_node(fd: int, tensor: SourceTensor, node: int, shape: tuple[int, ...]) -> np.ndarray:
    """One node's slice of a checkpoint tensor as float32, read with one ``pread``."""
    raw = os.pread(fd, tensor.node_bytes, tensor.start + node * tensor.node_bytes)
    values = np.frombuffer(raw, SOURCE_DTYPES[tensor.dtype]).reshape(shape)
    if tensor.dtype == "BF16":  # bfloat16 is the top half of a float32
        bits = values.astype(np.uint32)
        bits <<= 16
        return bits.view(np.float32)
    return values.astype(np.float32)


def source_fingerprint(checkpoint_dir: Path, levels: int) -> str:
    """sha256 over config.json and each bank file's safetensors header, size and mtime."""
    digest = hashlib.sha256((checkpoint_dir / "config.json").read_bytes())
    for level in range(levels):
        path = checkpoint_dir / bank_file(level)
        stat = path.stat()
        digest.update(read_safetensors_header(path)[0] + f"|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs to produce (or keep) one block; plain data so it pickles cheaply."""

    level: int
    node: int
    source: str
    tensors: tuple[SourceTensor, ...]  # gate, up, down
    scheme: str
    layers: int
    d_model: int
    width: int
    target: str  # per-block: the block file; per-level: the level's partial pack
    offset: int  # payload offset in ``target``
    packed: bool
    resume: bool


def _existing_digests(job: _Job) -> tuple[int, str] | None:
    """The CRC-32 and sha256 of a complete, valid block already at the job's place, or None."""
    scheme = SCHEMES[job.scheme]
    size = PAYLOAD_ALIGNMENT + scheme.payload_length(job.layers, job.d_model, job.width)
    try:
        with open(job.target, "rb") as handle:
            if not job.packed and os.fstat(handle.fileno()).st_size != size:
                return None
            data = os.pread(handle.fileno(), size, job.offset - PAYLOAD_ALIGNMENT)
    except FileNotFoundError:
        return None
    if len(data) != size:
        return None
    crc = payload_crc32(memoryview(data)[PAYLOAD_ALIGNMENT:])
    expected = make_header(
        scheme, job.level, job.node, job.layers, job.d_model, job.width, job.offset, size - PAYLOAD_ALIGNMENT, crc
    )
    try:
        check_header(data, expected, job.target)
    except BankError:
        return None
    return crc, payload_sha256(memoryview(data)[PAYLOAD_ALIGNMENT:])


def _quantize(job: _Job) -> tuple[tuple[int, str], bool, int]:
    """Worker: ((crc32, sha256), resumed, source bytes read) for one block, writing it unless already valid."""
    if job.resume and (digests := _existing_digests(job)) is not None:
        return digests, True, 0
    shapes = ((job.layers, job.d_model, job.width),) * 2 + ((job.layers, job.width, job.d_model),)
    fd = os.open(job.source, os.O_RDONLY)
    try:
        arrays = [read_node(fd, tensor, job.node, shape) for tensor, shape in zip(job.tensors, shapes)]
    finally:
        os.close(fd)
    for name, array in zip(("gate", "up", "down"), arrays):
        if not np.isfinite(array).all():
            raise BankError(f"{job.source}: non-finite values in {name} of node {job.node} (level {job.level})")
    scheme = SCHEMES[job.scheme]
    try:
        payload = scheme.encode_block(BlockArrays(*arrays))
    except BankError as exc:
        raise BankError(f"{job.source}: node {job.node}: {exc}") from exc
    crc = payload_crc32(payload)
    header = make_header(scheme, job.level, job.node, job.layers, job.d_model, job.width, job.offset, len(payload), crc)
    if job.packed:
        fd = os.open(job.target, os.O_WRONLY)
        try:  # payload first, header last: a torn write never yields a block that checks out
            os.pwrite(fd, payload, job.offset)
            os.pwrite(fd, header_page(header), job.offset - PAYLOAD_ALIGNMENT)
        finally:
            os.close(fd)
    else:
        write_atomic(Path(job.target), [header_page(header), payload])
    return (crc, payload_sha256(payload)), False, sum(t.node_bytes for t in job.tensors)


@dataclass
class QuantizeReport:
    """What a quantize run did.  ``source_bytes`` counts only blocks quantized by this run."""

    bank: str
    scheme: str
    level_schemes: list[str]
    layout: str
    blocks: int
    blocks_written: int
    blocks_resumed: int
    source_bytes: int
    bank_bytes: int
    seconds: float
    workers: int
    index: BankIndex = field(repr=False)

    @property
    def source_gb_per_s(self) -> float:
        return self.source_bytes / self.seconds / 1e9 if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        body = {k: v for k, v in asdict(self).items() if k != "index"}
        return {**body, "source_gb_per_s": round(self.source_gb_per_s, 3), "schema_hash": self.index.schema_hash}


def _previous_fingerprint(bank_dir: Path) -> str | None:
    for name, key in ((STATE_FILE, ("fingerprint",)), (INDEX_FILE, ("source", "fingerprint"))):
        try:
            value: Any = json.loads((bank_dir / name).read_text())
            for part in key:
                value = value[part]
            return str(value)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _remove_bank_files(bank_dir: Path, everything: bool) -> None:
    """Remove temp files of interrupted runs; with ``everything``, also all blocks, packs and the index."""
    patterns = ["level*/.*.tmp", ".*.tmp"]
    if everything:
        patterns += [INDEX_FILE, "level*/node*.hmb", "level*.hmp", ".level*.hmp.partial"]
    for pattern in patterns:
        for path in bank_dir.glob(pattern):
            path.unlink()
    for directory in bank_dir.glob("level*/"):
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()


def quantize_bank(
    bank_dir: Path | str,
    checkpoint_dir: Path | str,
    scheme: str = "float32",
    *,
    layout: str = "per-block",
    workers: int | None = None,
    progress: bool = False,
) -> QuantizeReport:
    """Write (or finish writing) the bank of ``checkpoint_dir`` into ``bank_dir`` with preset ``scheme``.

    ``workers`` processes quantize blocks (default: one per core; 1 runs in this process).
    """
    if layout not in LAYOUTS:
        raise BankError(f"unknown bank layout {layout!r}, expected one of {list(LAYOUTS)}")
    start = time.perf_counter()
    bank_dir, checkpoint_dir = Path(bank_dir), Path(checkpoint_dir)
    try:
        cfg = ModelConfig.from_dict(read_config(checkpoint_dir)["model"])
    except ConfigError as exc:
        raise CheckpointError(f"{checkpoint_dir / 'config.json'}: invalid model config: {exc}") from exc
    mem = cfg.memory
    names = resolve_preset(scheme, mem.num_levels)
    sources = [level_sources(checkpoint_dir / bank_file(lv), cfg, lv) for lv in range(mem.num_levels)]
    job_key = [source_fingerprint(checkpoint_dir, mem.num_levels), names, layout, FORMAT_VERSION]
    fingerprint = hashlib.sha256(json.dumps(job_key).encode()).hexdigest()

    bank_dir.mkdir(parents=True, exist_ok=True)
    resume = _previous_fingerprint(bank_dir) == fingerprint
    _remove_bank_files(bank_dir, everything=not resume)
    write_atomic(bank_dir / STATE_FILE, [json.dumps({"fingerprint": fingerprint}).encode()])
    (bank_dir / INDEX_FILE).unlink(missing_ok=True)

    workers = workers or os.cpu_count() or 1
    total = sum(mem.nodes_at(lv) for lv in range(mem.num_levels))
    entries: list[BlockEntry] = []
    written = resumed = source_bytes = 0
    with (
        ProcessPoolExecutor(workers) if workers > 1 else _InProcess() as pool,
        progress_bar(total=total, enabled=progress, unit="block", desc=f"quantize {scheme}") as bar,
    ):
        for level in range(mem.num_levels):
            jobs = _level_jobs(bank_dir, checkpoint_dir, cfg, level, names[level], sources[level], layout, resume)
            for job, ((crc, sha), was_resumed, read) in zip(jobs, pool.map(_quantize, jobs, chunksize=4)):
                file = pack_file(level) if job.packed else block_file(level, job.node)
                length = SCHEMES[job.scheme].payload_length(job.layers, job.d_model, job.width)
                entries.append(BlockEntry(level, job.node, file, job.offset, length, job.scheme, crc, sha))
                resumed += was_resumed
                written += not was_resumed
                source_bytes += read
                bar.update()
                bar.set_postfix_str(f"{source_bytes / max(time.perf_counter() - start, 1e-9) / 1e9:.2f} GB/s in")
            if layout == "per-level":
                os.replace(_partial_pack(bank_dir, level), bank_dir / pack_file(level))

    index = BankIndex(scheme, cfg.d_model, mem, layout, tuple(entries), fingerprint)
    write_atomic(bank_dir / INDEX_FILE, [(json.dumps(index.to_dict(), indent=1) + "\n").encode()])
    (bank_dir / STATE_FILE).unlink()
    bank_bytes = sum(p.stat().st_size for p in bank_dir.rglob("*") if p.is_file())
    return QuantizeReport(
        str(bank_dir),
        scheme,
        list(names),
        layout,
        total,
        written,
        resumed,
        source_bytes,
        bank_bytes,
        round(time.perf_counter() - start, 3),
        workers,
        index,
    )


def write_bank(
    bank_dir: Path | str, checkpoint_dir: Path | str, scheme: str = "float32", progress: bool = False, **options: Any
) -> BankIndex:
    """:func:`quantize_bank`, returning only the index (``options``: ``layout``, ``workers``)."""
    return quantize_bank(bank_dir, checkpoint_dir, scheme, progress=progress, **options).index


class _InProcess:
    """The ``map`` of an executor, run in this process (``workers=1``: no pool, easy to debug)."""

    def map(self, fn: Callable[[_Job], Any], jobs: list[_Job], chunksize: int = 1) -> Iterator[Any]:
        return map(fn, jobs)

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _partial_pack(bank_dir: Path, level: int) -> Path:
    return bank_dir / f".{pack_file(level)}.partial"


def _level_jobs(
    bank_dir: Path,
    checkpoint_dir: Path,
    cfg: ModelConfig,
    level: int,
    scheme: str,
    sources: dict[str, SourceTensor],
    layout: str,
    resume: bool,
) -> list[_Job]:
    """One job per node of ``level``; prepares the level's directory or (sized, possibly resumed) partial pack."""
    mem, packed = cfg.memory, layout == "per-level"
    layers, width, nodes = len(mem.layers), mem.widths[level], mem.nodes_at(level)
    stride = block_stride(SCHEMES[scheme].payload_length(layers, cfg.d_model, width))
    partial = _partial_pack(bank_dir, level)
    if packed:
        if (bank_dir / pack_file(level)).exists():  # finished by an earlier run: reopen so bad blocks get rewritten
            os.replace(bank_dir / pack_file(level), partial)
        with open(partial, "ab") as handle:
            handle.truncate(nodes * stride)
    else:
        (bank_dir / f"level{level}").mkdir(exist_ok=True)
    tensors = (sources["gate"], sources["up"], sources["down"])
    return [
        _Job(
            level,
            node,
            str(checkpoint_dir / bank_file(level)),
            tensors,
            scheme,
            layers,
            cfg.d_model,
            width,
            str(partial if packed else bank_dir / block_file(level, node)),
            node * stride + PAYLOAD_ALIGNMENT if packed else PAYLOAD_ALIGNMENT,
            packed,
            resume,
        )
        for node in range(nodes)
    ]
