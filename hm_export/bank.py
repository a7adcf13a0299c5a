"""Per-block bank files: one file per memory-tree node, read on device with one aligned read.

::

    <bank_dir>/index.json                 format, scheme, model dims, schema hash, one entry per block
    <bank_dir>/level{l}/node{i:06d}.hmb   header (zero-padded to 4 KiB), then the payload

The payload of a block is, for each memory layer in order, ``gate [d, r]``, ``up [d, r]``,
``down [r, d]`` (slot layout, row-major) in the encoding of its :class:`Scheme`.  The byte layout is
documented in ``docs/bank-format.md``.  A scheme is a name, a numeric id stored in every header, an
``encode`` from float32 arrays to payload bytes and a ``decode`` back; new encodings (quantized ones)
are added to :data:`SCHEMES` without changing the reader or the writer.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from hm_export.checkpoint import CheckpointError, bank_file, expected_bank_shapes, read_config
from hm_export.config import ConfigError, MemoryConfig, ModelConfig

FORMAT_NAME = "hm-export-bank"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
MAGIC = b"HMBK"
PAYLOAD_ALIGNMENT = 4096  # the payload starts at this offset; readers may use aligned / direct I/O

# magic, version, header_length, scheme_id, level, node, layers, reserved0, d, r, reserved1,
# payload_offset, payload_length, crc32: every field at its natural alignment, little-endian.
HEADER = struct.Struct("<4sHHHHIHHIIIQQI")


class BankError(ValueError):
    """A bank directory or block file is missing, corrupt, or does not match its index."""


class BlockHeader(NamedTuple):
    magic: bytes
    version: int
    header_length: int
    scheme_id: int
    level: int
    node: int
    layers: int
    reserved0: int
    d_model: int
    width: int
    reserved1: int
    payload_offset: int
    payload_length: int
    crc32: int


class BlockArrays(NamedTuple):
    """One block, float32, slot layout: gate, up ``[layers, d, r]`` and down ``[layers, r, d]``."""

    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray


class Scheme(ABC):
    """A payload encoding: ``encode`` float32 block arrays to bytes, ``decode`` bytes back to float32."""

    name: str
    id: int

    @abstractmethod
    def payload_length(self, layers: int, d_model: int, width: int) -> int: ...

    @abstractmethod
    def encode(self, block: BlockArrays) -> bytes: ...

    @abstractmethod
    def decode(self, payload: memoryview, layers: int, d_model: int, width: int) -> BlockArrays: ...


class FloatScheme(Scheme):
    """Unquantized: per layer gate, up, down back to back in one little-endian float dtype."""

    def __init__(self, name: str, scheme_id: int, dtype: str) -> None:
        self.name, self.id, self.dtype = name, scheme_id, np.dtype(dtype)

    def payload_length(self, layers: int, d_model: int, width: int) -> int:
        return 3 * layers * d_model * width * self.dtype.itemsize

    def encode(self, block: BlockArrays) -> bytes:
        layers = block.gate.shape[0]
        per_layer = [block.gate.reshape(layers, -1), block.up.reshape(layers, -1), block.down.reshape(layers, -1)]
        return np.concatenate(per_layer, axis=1).astype(self.dtype).tobytes()

    def decode(self, payload: memoryview, layers: int, d_model: int, width: int) -> BlockArrays:
        values = np.frombuffer(payload, dtype=self.dtype).astype(np.float32, copy=False).reshape(layers, 3, -1)
        return BlockArrays(
            values[:, 0].reshape(layers, d_model, width),
            values[:, 1].reshape(layers, d_model, width),
            values[:, 2].reshape(layers, width, d_model),
        )


SCHEMES: dict[str, Scheme] = {s.name: s for s in (FloatScheme("float32", 1, "<f4"), FloatScheme("float16", 2, "<f2"))}


def get_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise BankError(f"unknown bank scheme {name!r}, expected one of {sorted(SCHEMES)}")
    return SCHEMES[name]


def schema_hash(d_model: int, memory: MemoryConfig, scheme: str) -> str:
    """sha256 (hex) of the canonical JSON of the fields that fix every block's byte layout."""
    fields = {
        "branching": list(memory.branching),
        "d_model": d_model,
        "format_version": FORMAT_VERSION,
        "memory_layers": list(memory.layers),
        "scheme": scheme,
        "widths": list(memory.widths),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def block_file(level: int, node: int) -> str:
    return f"level{level}/node{node:06d}.hmb"


@dataclass(frozen=True)
class BlockEntry:
    level: int
    node: int
    file: str  # relative to the bank directory, '/'-separated
    offset: int
    length: int
    scheme: str
    crc32: int


@dataclass(frozen=True)
class BankIndex:
    """The contents of ``index.json``; ``blocks`` is ordered level by level, node by node."""

    scheme: str
    d_model: int
    memory: MemoryConfig
    blocks: tuple[BlockEntry, ...]

    @property
    def schema_hash(self) -> str:
        return schema_hash(self.d_model, self.memory, self.scheme)

    def entry(self, level: int, node: int) -> BlockEntry:
        if not (0 <= level < self.memory.num_levels and 0 <= node < self.memory.nodes_at(level)):
            raise BankError(f"no block (level {level}, node {node}) in this bank")
        return self.blocks[sum(self.memory.nodes_at(lv) for lv in range(level)) + node]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "scheme": self.scheme,
            "schema_hash": self.schema_hash,
            "model": {
                "d_model": self.d_model,
                "memory_layers": list(self.memory.layers),
                "branching": list(self.memory.branching),
                "widths": list(self.memory.widths),
                "nodes": [self.memory.nodes_at(lv) for lv in range(self.memory.num_levels)],
            },
            "blocks": [vars(b) for b in self.blocks],
        }

    @classmethod
    def load(cls, path: Path) -> BankIndex:
        """Read and validate ``index.json``; every problem is a :class:`BankError` naming ``path``."""
        if not path.is_file():
            raise BankError(f"{path}: missing (not an hm-export bank directory)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BankError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            found = raw.get("format") if isinstance(raw, dict) else raw
            raise BankError(f"{path}: format is {found!r}, expected {FORMAT_NAME!r}")
        if raw.get("format_version") != FORMAT_VERSION:
            raise BankError(
                f"{path}: format_version {raw.get('format_version')!r} is not supported (this reader: {FORMAT_VERSION})"
            )
        if raw.get("scheme") not in SCHEMES:
            raise BankError(f"{path}: unknown scheme {raw.get('scheme')!r}, expected one of {sorted(SCHEMES)}")
        try:
            model = raw["model"]
            memory = MemoryConfig(tuple(model["branching"]), tuple(model["widths"]), tuple(model["memory_layers"]))
            index = cls(
                raw["scheme"],
                int(model["d_model"]),
                memory,
                tuple(BlockEntry(**{k: b[k] for k in BlockEntry.__dataclass_fields__}) for b in raw["blocks"]),
            )
            nodes = list(model["nodes"])
        except (ConfigError, KeyError, TypeError, ValueError) as exc:
            raise BankError(f"{path}: malformed index ({type(exc).__name__}: {exc})") from exc
        if nodes != [memory.nodes_at(lv) for lv in range(memory.num_levels)]:
            raise BankError(f"{path}: nodes per level {nodes} do not follow from branching {list(memory.branching)}")
        if raw.get("schema_hash") != index.schema_hash:
            raise BankError(
                f"{path}: schema_hash {raw.get('schema_hash')!r} does not match the fields ({index.schema_hash})"
            )
        index._check_blocks(path)
        return index

    def _check_blocks(self, path: Path) -> None:
        expected = [(lv, i) for lv in range(self.memory.num_levels) for i in range(self.memory.nodes_at(lv))]
        if [(b.level, b.node) for b in self.blocks] != expected:
            raise BankError(f"{path}: blocks must list each of the {len(expected)} (level, node) once, in order")
        scheme = SCHEMES[self.scheme]
        for b in self.blocks:
            where = f"{path}: block (level {b.level}, node {b.node})"
            if not _is_safe_relative(b.file):
                raise BankError(f"{where}: unsafe file path {b.file!r} (must stay inside the bank directory)")
            if b.scheme != self.scheme:
                raise BankError(f"{where}: scheme {b.scheme!r} differs from the bank scheme {self.scheme!r}")
            length = scheme.payload_length(len(self.memory.layers), self.d_model, self.memory.widths[b.level])
            if b.length != length:
                raise BankError(f"{where}: length {b.length}, expected {length}")
            if not isinstance(b.offset, int) or b.offset < HEADER.size or b.offset % PAYLOAD_ALIGNMENT:
                raise BankError(
                    f"{where}: payload offset {b.offset!r} is not a positive multiple of {PAYLOAD_ALIGNMENT}"
                )
            if not isinstance(b.crc32, int) or not 0 <= b.crc32 < 2**32:
                raise BankError(f"{where}: crc32 {b.crc32!r} is not a 32-bit unsigned integer")


def _is_safe_relative(file: object) -> bool:
    """A '/'-separated relative path of plain names (no '', '.', '..'): it cannot leave the bank directory."""
    return isinstance(file, str) and "\\" not in file and not {"", ".", ".."} & set(file.split("/"))


def _header(
    scheme: Scheme, level: int, node: int, layers: int, d_model: int, width: int, offset: int, length: int, crc: int
) -> BlockHeader:
    return BlockHeader(
        MAGIC, FORMAT_VERSION, HEADER.size, scheme.id, level, node, layers, 0, d_model, width, 0, offset, length, crc
    )


def _write_atomic(path: Path, chunks: list[bytes]) -> None:
    """Write ``chunks`` to a temp file next to ``path`` (umask permissions), then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.writelines(chunks)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _level_slices(path: Path, handle: Any, cfg: ModelConfig, level: int) -> dict[str, Any]:
    expected = expected_bank_shapes(cfg, level)
    if set(handle.keys()) != set(expected):
        raise CheckpointError(f"{path}: tensors {sorted(handle.keys())}, expected {sorted(expected)}")
    slices = {name: handle.get_slice(name) for name in expected}
    for name, shape in expected.items():
        if tuple(slices[name].get_shape()) != shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {slices[name].get_shape()}, expected {shape}")
        if slices[name].get_dtype() not in ("F64", "F32", "F16", "BF16"):
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {slices[name].get_dtype()}, expected a float")
    return slices


def write_bank(bank_dir: Path, checkpoint_dir: Path, scheme: str = "float32", progress: bool = False) -> BankIndex:
    """Write one block file per node from a checkpoint, streaming one node at a time; index.json last.

    Any existing ``index.json`` is removed first, so a reader never pairs an old index with new blocks.
    """
    codec = get_scheme(scheme)
    bank_dir, checkpoint_dir = Path(bank_dir), Path(checkpoint_dir)
    try:
        cfg = ModelConfig.from_dict(read_config(checkpoint_dir)["model"])
    except ConfigError as exc:
        raise CheckpointError(f"{checkpoint_dir / 'config.json'}: invalid model config: {exc}") from exc
    mem, layers = cfg.memory, len(cfg.memory.layers)
    bank_dir.mkdir(parents=True, exist_ok=True)
    (bank_dir / INDEX_FILE).unlink(missing_ok=True)
    blocks: list[BlockEntry] = []
    total = sum(mem.nodes_at(lv) for lv in range(mem.num_levels))
    with tqdm(total=total, disable=not progress, unit="block", desc="bank") as bar:
        for level in range(mem.num_levels):
            (bank_dir / f"level{level}").mkdir(exist_ok=True)
            source = checkpoint_dir / bank_file(level)
            if not source.is_file():
                raise CheckpointError(f"{source}: missing")
            with safe_open(str(source), framework="pt") as handle:
                slices = _level_slices(source, handle, cfg, level)
                for node in range(mem.nodes_at(level)):
                    arrays = BlockArrays(*(slices[name][node].float().numpy() for name in ("gate", "up", "down")))
                    payload = codec.encode(arrays)
                    crc = zlib.crc32(payload)
                    header = _header(
                        codec, level, node, layers, cfg.d_model, mem.widths[level], PAYLOAD_ALIGNMENT, len(payload), crc
                    )
                    name = block_file(level, node)
                    _write_atomic(bank_dir / name, [HEADER.pack(*header).ljust(PAYLOAD_ALIGNMENT, b"\0"), payload])
                    blocks.append(BlockEntry(level, node, name, PAYLOAD_ALIGNMENT, len(payload), scheme, crc))
                    bar.update()
    index = BankIndex(scheme, cfg.d_model, mem, tuple(blocks))
    _write_atomic(bank_dir / INDEX_FILE, [(json.dumps(index.to_dict(), indent=1) + "\n").encode()])
    return index


class BankReader:
    """Reads blocks of a bank directory after validating its ``index.json``."""

    def __init__(self, bank_dir: Path | str) -> None:
        self.bank_dir = Path(bank_dir)
        self.index = BankIndex.load(self.bank_dir / INDEX_FILE)
        self.scheme = SCHEMES[self.index.scheme]

    @property
    def schema_hash(self) -> str:
        return self.index.schema_hash

    def read_block(self, level: int, node: int, verify: bool = True) -> BlockArrays:
        """The float32 arrays of one block: one read of the whole file, header checked against the index.

        ``verify`` also checks the payload's crc32 (the header fields are always checked).
        """
        entry = self.index.entry(level, node)
        path = self.bank_dir / entry.file
        size = entry.offset + entry.length
        buffer = bytearray(size)
        try:
            handle = open(path, "rb", buffering=0)
        except FileNotFoundError as exc:
            raise BankError(f"{path}: block file missing (level {level}, node {node})") from exc
        with handle:
            actual = os.fstat(handle.fileno()).st_size
            got = handle.readinto(buffer) if actual == size else actual
        if got != size:
            raise BankError(f"{path}: wrong size, expected {size} bytes, got {got}")
        header = BlockHeader._make(HEADER.unpack_from(buffer))
        if header.magic != MAGIC:
            raise BankError(f"{path}: bad magic {header.magic!r}, expected {MAGIC!r} (not a bank block file)")
        layers, d_model, width = len(self.index.memory.layers), self.index.d_model, self.index.memory.widths[level]
        expected = _header(self.scheme, level, node, layers, d_model, width, entry.offset, entry.length, entry.crc32)
        if header != expected:
            bad = [f"{f} {a} != {e}" for f, a, e in zip(BlockHeader._fields, header, expected, strict=True) if a != e]
            raise BankError(f"{path}: header does not match the index ({', '.join(bad)})")
        payload = memoryview(buffer)[entry.offset :]
        if verify and zlib.crc32(payload) != entry.crc32:
            raise BankError(
                f"{path}: checksum mismatch (payload crc32 {zlib.crc32(payload):#010x}, index {entry.crc32:#010x})"
            )
        return self.scheme.decode(payload, layers, d_model, width)
