"""Reading blocks: one aligned read of a block's header page + payload into a caller's buffer.

Three ways to get the bytes, selectable per reader (``read_mode``) and compared in
``scripts/bench_bank.py``: ``pread`` (``os.preadv`` into the buffer: one syscall, no file position),
``readinto`` (buffered-off file object: ``seek`` + ``readinto``) and ``mmap`` (map the block's range, copy
it into the buffer, unmap).  Level packs keep their file open; per-block files are opened per read.
"""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path

import numpy as np

from hm_export.bank.format import (
    INDEX_FILE,
    PAYLOAD_ALIGNMENT,
    BankIndex,
    BlockEntry,
    check_header,
    payload_crc32,
    payload_sha256,
)
from hm_export.bank.schemes import BlockArrays, Destination
from hm_export.errors import BankError
from hm_export.safeio import ContainedTree

READ_MODES = ("pread", "readinto", "mmap")


def aligned_buffer(size: int, alignment: int = PAYLOAD_ALIGNMENT) -> np.ndarray:
    """A zero-filled uint8 array of ``size`` bytes whose data starts on an ``alignment`` boundary."""
    raw = np.zeros(size + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + size]


def _read_pread(fd: int, view: memoryview, position: int) -> int:
    return os.preadv(fd, [view], position)


def _read_readinto(fd: int, view: memoryview, position: int) -> int:
    with open(fd, "rb", buffering=0, closefd=False) as handle:
        handle.seek(position)
        return handle.readinto(view) or 0


def _read_mmap(fd: int, view: memoryview, position: int) -> int:
    available = max(0, min(len(view), os.fstat(fd).st_size - position))
    if available:
        with mmap.mmap(fd, available, access=mmap.ACCESS_READ, offset=position) as mapped:
            view[:available] = mapped
    return available


_READERS = {"pread": _read_pread, "readinto": _read_readinto, "mmap": _read_mmap}


class BankReader:
    """Reads blocks of a bank directory after validating its ``index.json``.

    Thread-safe: concurrent reads of different blocks (e.g. a prefetch thread) share the open level packs.
    """

    def __init__(
        self,
        bank_dir: Path | str,
        read_mode: str = "pread",
        index_bytes: int | None = None,
        check_files: bool = True,
        index_sha256: str | None = None,
    ) -> None:
        """``index_bytes``: the size a bundle manifest declares for ``index.json`` (its read is capped by it);
        ``check_files``: check at open that each level's first block is on disk as the index says (see
        :meth:`_check_level_files`; ``bank check`` reports each block instead); ``index_sha256``: the index's
        digest as pinned by a manifest whose signature was verified against a trusted key (the opener passes it
        only then).  With it the index is authenticated (:attr:`authenticated`) and verified reads also check
        each payload's sha256; without it they check the CRC-32 only (see :meth:`read_into`).

        Block files are opened below ``bank_dir`` through no symlink and must be regular files (a FIFO in
        place of a block is refused, not waited on)."""
        if read_mode not in READ_MODES:
            raise BankError(f"unknown read mode {read_mode!r}, expected one of {list(READ_MODES)}")
        self.bank_dir = Path(bank_dir)
        self.index = BankIndex.load(self.bank_dir / INDEX_FILE, exact=index_bytes, sha256=index_sha256)
        self.index_sha256 = index_sha256
        self._tree = ContainedTree(self.bank_dir, "bank", BankError)
        self.schemes = self.index.level_schemes
        self.read_mode = read_mode
        self._read = _READERS[read_mode]
        self._packs: dict[str, int] = {}
        self._lock = threading.Lock()
        self._seek_lock = threading.Lock()
        if check_files:
            self._check_level_files()

    def _check_level_files(self) -> None:
        """Each level's first block is really on disk, as large as the index says: buffers sized from the index
        (block cache, slot) are then bounded by data in the bank, whatever the index claims.  (Every other block
        is checked when it is read.)"""
        for level in range(self.index.memory.num_levels):
            first = self.index.entry(level, 0)
            need = first.offset + first.length
            if self.index.layout == "per-level":
                have = os.fstat(self._pack_fd(first)).st_size
            else:
                fd = self._tree.open(first.file, f"block file (level {level}, node 0)")
                have = os.fstat(fd).st_size
                os.close(fd)
            if have < need:
                raise BankError(
                    f"{self.bank_dir / first.file}: {have} bytes, the index needs {need} (truncated, or an index "
                    "that does not describe this bank)"
                )

    @property
    def authenticated(self) -> bool:
        """Whether the index was checked against a digest from a signed manifest (verified reads check sha256s)."""
        return self.index_sha256 is not None

    @property
    def schema_hash(self) -> str:
        return self.index.schema_hash

    def block_size(self, level: int) -> int:
        """Bytes one read of a level-``level`` block fetches: header page + payload."""
        return PAYLOAD_ALIGNMENT + self.index.entry(level, 0).length

    def _where(self, entry: BlockEntry) -> str:
        return f"{self.bank_dir / entry.file}: block (level {entry.level}, node {entry.node})"

    def _pack_fd(self, entry: BlockEntry) -> int:
        with self._lock:
            if entry.file in self._packs:
                return self._packs[entry.file]
        fd = self._tree.open(entry.file, f"level {entry.level} pack")
        with self._lock:
            if entry.file in self._packs:  # another thread opened it meanwhile
                os.close(fd)
            else:
                self._packs[entry.file] = fd
            return self._packs[entry.file]

    def read_into(self, level: int, node: int, buffer: np.ndarray | memoryview, verify: bool = True) -> memoryview:
        """Read block ``(level, node)`` with one read into ``buffer``; return its payload (a view of ``buffer``).

        The header is always checked against the index; ``verify`` also checks the payload's CRC-32 (damage) and,
        when the index is :attr:`authenticated`, its sha256 (a payload edited to keep its CRC-32).  Without a
        trusted key whoever can edit a block can rewrite the index, manifest and seal to match, so the sha256
        would add cost (it bounds the read: ~1.2 GB/s) and no security; damage is what the CRC-32 catches.
        """
        entry = self.index.entry(level, node)
        path, size = self.bank_dir / entry.file, PAYLOAD_ALIGNMENT + entry.length
        view = memoryview(buffer).cast("B")[:size]
        if len(view) != size:
            raise BankError(f"{self._where(entry)}: buffer of {len(view)} bytes, the block needs {size}")
        packed = self.index.layout == "per-level"
        what = f"block file (level {level}, node {node})"
        fd = self._pack_fd(entry) if packed else self._tree.open(entry.file, what)
        try:
            actual = size if packed else os.fstat(fd).st_size
            if actual != size:
                got = actual
            elif packed and self.read_mode == "readinto":  # seek + read share the file position
                with self._seek_lock:
                    got = self._read(fd, view, entry.offset - PAYLOAD_ALIGNMENT)
            else:
                got = self._read(fd, view, entry.offset - PAYLOAD_ALIGNMENT)
        except OSError as exc:
            raise BankError(f"{path}: cannot read block (level {level}, node {node}): {exc.strerror}") from None
        finally:
            if not packed:
                os.close(fd)
        if got != size:
            what = "truncated pack" if packed else "wrong size"
            raise BankError(f"{path}: {what} for block (level {level}, node {node}), expected {size} bytes, got {got}")
        check_header(view, self.index.expected_header(entry), path)
        payload = view[PAYLOAD_ALIGNMENT:]
        if verify and (crc := payload_crc32(payload)) != entry.crc32:
            raise BankError(
                f"{self._where(entry)}: checksum mismatch (payload crc32 {crc:#010x}, index {entry.crc32:#010x})"
            )
        if verify and self.authenticated and (digest := payload_sha256(payload)) != entry.sha256:
            raise BankError(
                f"{self._where(entry)}: checksum mismatch (payload sha256 {digest[:16]}..., index "
                f"{entry.sha256[:16]}...): the block was edited after export"
            )
        return payload

    def decode_into(self, level: int, payload: memoryview, destination: Destination) -> None:
        """Dequantize a level-``level`` payload straight into ``destination(layer, matrix)`` arrays."""
        memory = self.index.memory
        self.schemes[level].decode_block_into(
            payload, len(memory.layers), self.index.d_model, memory.widths[level], destination
        )

    def read_block(self, level: int, node: int, verify: bool = True) -> BlockArrays:
        """The float32 arrays of one block (allocates; loaders use :meth:`read_into` + :meth:`decode_into`)."""
        payload = self.read_into(level, node, aligned_buffer(self.block_size(level)), verify)
        memory = self.index.memory
        return self.schemes[level].decode_block(payload, len(memory.layers), self.index.d_model, memory.widths[level])

    def close(self) -> None:
        with self._lock:
            for fd in self._packs.values():
                os.close(fd)
            self._packs.clear()
        self._tree.close()

    def __enter__(self) -> BankReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
