"""Bank directory format: block header, file names, ``index.json``, schema hash (docs/bank-format.md).

::

    <bank_dir>/index.json                 format, schemes, model dims, schema hash, one entry per block
    <bank_dir>/level{l}/node{i:06d}.hmb   layout "per-block": one file per block (4 KiB header page + payload)
    <bank_dir>/level{l}.hmp               layout "per-level": the blocks of a level back to back, each
                                          a 4 KiB header page + payload padded to 4 KiB

Either way a block is one contiguous, 4 KiB-aligned range ``[offset - 4096, offset + length)`` of its file:
its header page followed by its payload, fetched with one read.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

from isal import isal_zlib

from hm_export.bank.schemes import SCHEMES, Scheme, check_preset, resolve_preset
from hm_export.config import LIMITS, ConfigError, MemoryConfig
from hm_export.errors import BankError
from hm_export.formats import MAX_JSON_BYTES, Fields, read_format_json
from hm_export.safeio import read_capped

FORMAT_NAME = "hm-export-bank"
FORMAT_VERSION = 3  # 3: a per-block sha256 in the index (2 had only the CRC-32, which a forger can keep)
INDEX_FILE = "index.json"
MAGIC = b"HMBK"
PAYLOAD_ALIGNMENT = 4096  # header page size; payloads start (and, in level packs, blocks start) on this boundary
LAYOUTS = ("per-block", "per-level")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# magic, version, header_length, scheme_id, level, node, layers, group_size, d_model, width, reserved,
# payload_offset, payload_length, crc32: every field at its natural alignment, little-endian.
HEADER = struct.Struct("<4sHHHHIHHIIIQQI")


class BlockHeader(NamedTuple):
    magic: bytes
    version: int
    header_length: int
    scheme_id: int
    level: int
    node: int
    layers: int
    group_size: int
    d_model: int
    width: int
    reserved: int
    payload_offset: int  # absolute offset of the payload in its file; the header sits 4096 bytes before it
    payload_length: int
    crc32: int


def payload_crc32(payload: bytes | memoryview) -> int:
    """CRC-32 of a block payload: zlib's polynomial and values, computed by ISA-L (PCLMULQDQ on x86, PMULL
    on ARMv8), about 4x zlib's speed here, so a verified read is no longer bound by the checksum."""
    return isal_zlib.crc32(payload)


def payload_sha256(payload: bytes | memoryview) -> str:
    """sha256 (lowercase hex) of a block payload, as the index records it: the CRC-32 catches damage, this
    authenticates the block (the index is covered by the manifest's sha256 and the bundle's seal).  hashlib's
    OpenSSL code (SHA-NI / ARMv8 where present), once per block read."""
    return hashlib.sha256(payload).hexdigest()


def block_file(level: int, node: int) -> str:
    return f"level{level}/node{node:06d}.hmb"


def pack_file(level: int) -> str:
    return f"level{level}.hmp"


def block_stride(length: int) -> int:
    """Bytes a block takes in a level pack: its header page plus its payload padded to 4 KiB."""
    return PAYLOAD_ALIGNMENT + -(-length // PAYLOAD_ALIGNMENT) * PAYLOAD_ALIGNMENT


def schema_hash(d_model: int, memory: MemoryConfig, scheme: str) -> str:
    """sha256 (hex) of the canonical JSON of the fields that fix every block's byte layout.

    ``scheme`` is a preset or per-level list; the hash covers the resolved per-level scheme names, so
    equivalent spellings (``"int8"`` and ``"int8,int8"``) give the same hash.
    """
    fields = {
        "branching": list(memory.branching),
        "d_model": d_model,
        "format_version": FORMAT_VERSION,
        "memory_layers": list(memory.layers),
        "schemes": list(resolve_preset(scheme, memory.num_levels)),
        "widths": list(memory.widths),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class BlockEntry:
    level: int
    node: int
    file: str  # relative to the bank directory, '/'-separated
    offset: int  # absolute payload offset in the file (a multiple of 4096, >= 4096)
    length: int  # payload bytes
    scheme: str
    crc32: int
    sha256: str  # lowercase hex sha256 of the payload (format version 3)


@dataclass(frozen=True)
class LevelRecord:
    scheme: str
    scheme_id: int
    group_size: int


@dataclass(frozen=True)
class IndexModel:
    d_model: int
    memory_layers: list[int]
    branching: list[int]
    widths: list[int]
    nodes: list[int]  # derived from branching (checked)


@dataclass(frozen=True)
class IndexSource:
    fingerprint: str


@dataclass(frozen=True)
class IndexRecord:
    """``index.json`` as written (docs/bank-format.md; its JSON Schema: docs/schemas/bank-index.schema.json)."""

    format: str
    format_version: int
    scheme: str
    levels: list[LevelRecord]
    layout: str
    schema_hash: str
    model: IndexModel
    source: IndexSource
    blocks: list[BlockEntry]


@dataclass(frozen=True)
class BankIndex:
    """The contents of ``index.json``; ``blocks`` is ordered level by level, node by node."""

    scheme: str  # the preset or per-level list the bank was written with
    d_model: int
    memory: MemoryConfig
    layout: str
    blocks: tuple[BlockEntry, ...]
    source: str = ""  # fingerprint of the checkpoint it was quantized from (informational; used to resume)

    @cached_property
    def level_schemes(self) -> tuple[Scheme, ...]:
        return tuple(SCHEMES[name] for name in resolve_preset(self.scheme, self.memory.num_levels))

    @property
    def schema_hash(self) -> str:
        return schema_hash(self.d_model, self.memory, self.scheme)

    @property
    def layers(self) -> int:
        return len(self.memory.layers)

    def entry(self, level: int, node: int) -> BlockEntry:
        if not (0 <= level < self.memory.num_levels and 0 <= node < self.memory.nodes_at(level)):
            raise BankError(f"no block (level {level}, node {node}) in this bank")
        return self.blocks[sum(self.memory.nodes_at(lv) for lv in range(level)) + node]

    def expected_header(self, entry: BlockEntry) -> BlockHeader:
        scheme = self.level_schemes[entry.level]
        return make_header(
            scheme,
            entry.level,
            entry.node,
            self.layers,
            self.d_model,
            self.memory.widths[entry.level],
            entry.offset,
            entry.length,
            entry.crc32,
        )

    def record(self) -> IndexRecord:
        return IndexRecord(
            FORMAT_NAME,
            FORMAT_VERSION,
            self.scheme,
            [LevelRecord(s.name, s.id, s.group_size) for s in self.level_schemes],
            self.layout,
            self.schema_hash,
            IndexModel(
                self.d_model,
                list(self.memory.layers),
                list(self.memory.branching),
                list(self.memory.widths),
                [self.memory.nodes_at(lv) for lv in range(self.memory.num_levels)],
            ),
            IndexSource(self.source),
            list(self.blocks),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of ``index.json``."""
        return asdict(self.record())

    @classmethod
    def load(cls, path: Path, exact: int | None = None, sha256: str | None = None) -> BankIndex:
        """Read and validate ``index.json`` (of exactly ``exact`` bytes, when a manifest declares its size; whose
        bytes have the digest ``sha256``, when an authenticated manifest pins it: the bytes checked are the bytes
        parsed); every problem is a :class:`BankError` naming ``path``."""
        what = "a complete hm-export bank: no index, or quantization unfinished"
        try:
            data = None
            if sha256 is not None:
                data = read_capped(path, "bank index", MAX_JSON_BYTES, BankError, exact=exact)
                if (digest := hashlib.sha256(data).hexdigest()) != sha256:
                    raise BankError(
                        f"{path}: sha256 {digest[:16]}... differs from the signed manifest's {sha256[:16]}...: the "
                        "index was edited after export",
                        path=path,
                    )
            raw = read_format_json(path, FORMAT_NAME, FORMAT_VERSION, BankError, what, data=data, exact=exact)
        except BankError as exc:
            if exc.field != "format_version":
                raise
            raise BankError(
                f"{exc} -- a version 2 bank has no per-block sha256 (its blocks cannot be authenticated): re-create "
                "it with `hm-export bank quantize` (or re-export the bundle)",
                path=path,
                field="format_version",
            ) from None
        try:
            check_preset(raw.get("scheme"))
        except BankError as exc:
            raise BankError(f"{path}: {exc}") from exc
        if raw.get("layout") not in LAYOUTS:
            raise BankError(f"{path}: layout {raw.get('layout')!r} is not one of {list(LAYOUTS)}")
        try:
            model = raw["model"]
            memory = MemoryConfig(tuple(model["branching"]), tuple(model["widths"]), tuple(model["memory_layers"]))
            d_model = Fields(path, BankError).get(model, "d_model", "model.d_model", int, 1, LIMITS["d_model"])
            blocks = Fields(path, BankError).get(raw, "blocks", "blocks", list)
            if len(blocks) > LIMITS["nodes"]:
                raise BankError(f"{len(blocks)} blocks, more than {LIMITS['nodes']}")
            index = cls(
                raw["scheme"],
                d_model,
                memory,
                raw["layout"],
                tuple(BlockEntry(**{k: b[k] for k in BlockEntry.__dataclass_fields__}) for b in blocks),
                str(raw.get("source", {}).get("fingerprint", "")),
            )
            nodes, levels = list(model["nodes"]), list(raw["levels"])
            schemes = index.level_schemes
        except (BankError, ConfigError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BankError(f"{path}: malformed index ({type(exc).__name__}: {exc})") from exc
        if nodes != [memory.nodes_at(lv) for lv in range(memory.num_levels)]:
            raise BankError(f"{path}: nodes per level {nodes} do not follow from branching {list(memory.branching)}")
        if levels != index.to_dict()["levels"]:
            raise BankError(
                f"{path}: levels {levels} do not match scheme {index.scheme!r} ({[s.name for s in schemes]})"
            )
        if raw.get("schema_hash") != index.schema_hash:
            raise BankError(
                f"{path}: schema_hash {raw.get('schema_hash')!r} does not match the fields ({index.schema_hash})"
            )
        index._check_blocks(path)
        return index

    def _check_blocks(self, path: Path) -> None:
        expected = [(lv, i) for lv in range(self.memory.num_levels) for i in range(self.memory.nodes_at(lv))]
        if [(b.level, b.node) for b in self.blocks] != expected or not all(
            type(b.level) is int and type(b.node) is int for b in self.blocks
        ):
            raise BankError(f"{path}: blocks must list each of the {len(expected)} (level, node) once, in order")
        schemes = self.level_schemes
        for b in self.blocks:
            where = f"{path}: block (level {b.level}, node {b.node})"
            if not _is_safe_relative(b.file):
                raise BankError(f"{where}: unsafe file path {b.file!r} (must stay inside the bank directory)")
            scheme = schemes[b.level]
            if b.scheme != scheme.name:
                raise BankError(f"{where}: scheme {b.scheme!r} differs from its level's scheme {scheme.name!r}")
            length = scheme.payload_length(self.layers, self.d_model, self.memory.widths[b.level])
            if b.length != length:
                raise BankError(f"{where}: length {b.length}, expected {length}")
            if type(b.offset) is not int or not PAYLOAD_ALIGNMENT <= b.offset < 2**62 or b.offset % PAYLOAD_ALIGNMENT:
                raise BankError(
                    f"{where}: payload offset {b.offset!r} is not a positive multiple of {PAYLOAD_ALIGNMENT}"
                )
            if type(b.crc32) is not int or not 0 <= b.crc32 < 2**32:
                raise BankError(f"{where}: crc32 {b.crc32!r} is not a 32-bit unsigned integer")
            if not isinstance(b.sha256, str) or not _SHA256.match(b.sha256):
                raise BankError(f"{where}: sha256 {b.sha256!r} is not 64 lowercase hex digits")


def _is_safe_relative(file: object) -> bool:
    """A '/'-separated relative path of plain names (no '', '.', '..'): it cannot leave the bank directory."""
    return isinstance(file, str) and "\\" not in file and not {"", ".", ".."} & set(file.split("/"))


def make_header(
    scheme: Scheme, level: int, node: int, layers: int, d_model: int, width: int, offset: int, length: int, crc: int
) -> BlockHeader:
    return BlockHeader(
        MAGIC,
        FORMAT_VERSION,
        HEADER.size,
        scheme.id,
        level,
        node,
        layers,
        scheme.group_size,
        d_model,
        width,
        0,
        offset,
        length,
        crc,
    )


def header_page(header: BlockHeader) -> bytes:
    return HEADER.pack(*header).ljust(PAYLOAD_ALIGNMENT, b"\0")


def check_header(page: memoryview | bytes, expected: BlockHeader, path: Path | str) -> None:
    """Compare a block's header page (read from ``path``) with what the index says it must be."""
    header = BlockHeader._make(HEADER.unpack_from(page))
    if header == expected:
        return
    where = f"{path}: block (level {expected.level}, node {expected.node})"
    if header.magic != MAGIC:
        raise BankError(f"{where}: bad magic {header.magic!r}, expected {MAGIC!r} (not a bank block)")
    if header.version != expected.version:
        raise BankError(f"{where}: block format version {header.version}, this reader reads {expected.version}")
    bad = [f"{f} {a} != {e}" for f, a, e in zip(BlockHeader._fields, header, expected, strict=True) if a != e]
    raise BankError(f"{where}: header does not match the index ({', '.join(bad)})")
