"""Level-aware block cache with background prefetch, and the slot filler built on it.

:class:`BlockCache` hands out block payloads (still encoded: int4 blocks stay int4 in RAM):

* **resident levels** (the shallow ones, ``policy.resident_levels``): a block read once is kept for the
  life of the cache (:meth:`BlockCache.preload` reads whole levels up front);
* **deeper levels**: an LRU of blocks under ``policy.cache_bytes`` (0 = stream: every miss is read into
  one preallocated, 4 KiB-aligned buffer per level and nothing is kept);
* **prefetch**: :meth:`BlockCache.prefetch` reads a path's missing blocks on a background thread (file
  reads and CRC-32 release the GIL) while the current context is still running; a later ``get`` of a
  block being prefetched waits for it instead of reading it twice.

Every block read from storage is one read of its header page + payload, checked against the index and,
unless ``policy.verify`` is off (trusted storage), CRC-32 and sha256 checked; cached blocks are not re-checked.

:class:`SlotFiller` owns the slot buffers of a :class:`~hm_export.slot.SlotContract` and makes them hold a
path: only levels whose node changed are touched, and each is dequantized straight from the block payload
into its level's row/column ranges (no intermediate float block).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hm_export.bank import PAYLOAD_ALIGNMENT, BankError, BankReader, aligned_buffer
from hm_export.bank.schemes import Destination
from hm_export.formats.slot_contract import SlotContract
from hm_export.kernels.strategies import DEFAULT_STRATEGY, QuantizedLevelWriter, SlotLayout, get_strategy
from hm_export.model import LayerMemory
from hm_export.slot import empty_slot

BlockKey = tuple[int, int]  # (level, node)


@dataclass(frozen=True)
class CachePolicy:
    """``resident_levels``: levels ``0 .. resident_levels-1`` are kept once read; ``cache_bytes``: LRU cap
    (header pages included) for deeper levels; ``verify``: CRC-32 and sha256 check of blocks read from storage."""

    resident_levels: int = 1
    cache_bytes: int = 256 << 20
    verify: bool = True


@dataclass(frozen=True)
class Fetched:
    """A block payload and where it came from.  ``bytes_read``: storage bytes this block cost (0 when it was
    already in RAM; for a prefetched block, what the prefetch read, counted once)."""

    payload: memoryview
    source: str  # "resident", "cache", "prefetch" or "storage"
    bytes_read: int


@dataclass
class CacheStats:
    hits: int = 0
    prefetch_hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    evictions: int = 0


@dataclass
class _Held:
    """A block kept in RAM: its buffer (header page + payload) and storage bytes not yet charged to a get."""

    buffer: np.ndarray
    unclaimed: int = 0

    @property
    def payload(self) -> memoryview:
        return memoryview(self.buffer)[PAYLOAD_ALIGNMENT:]


class BlockCache:
    """Block payloads of one bank by ``(level, node)``.  ``get`` is for one consumer thread; ``prefetch``
    may be called from any thread."""

    def __init__(self, reader: BankReader, policy: CachePolicy | None = None) -> None:
        self.reader, self.policy = reader, policy or CachePolicy()
        levels = reader.index.memory.num_levels
        self._size = [reader.block_size(level) for level in range(levels)]
        self._scratch = [aligned_buffer(size) for size in self._size]  # streaming reads land here
        self._resident: dict[BlockKey, _Held] = {}
        self._lru: OrderedDict[BlockKey, _Held] = OrderedDict()
        self._lru_bytes = 0
        self._staged: dict[BlockKey, _Held] = {}  # prefetched blocks of levels that are not cached
        self._pending: dict[BlockKey, threading.Event] = {}
        self._lock = threading.Lock()
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="hm-prefetch")
        self.stats = CacheStats()

    def is_resident(self, level: int) -> bool:
        return level < self.policy.resident_levels

    def _keeps(self, level: int) -> bool:
        return self.is_resident(level) or self._size[level] <= self.policy.cache_bytes

    @property
    def resident_bytes(self) -> int:
        return sum(held.buffer.nbytes for held in self._resident.values())

    @property
    def cached_bytes(self) -> int:
        return self._lru_bytes

    def _read(self, key: BlockKey, buffer: np.ndarray) -> memoryview:
        payload = self.reader.read_into(*key, buffer, verify=self.policy.verify)
        with self._lock:
            self.stats.bytes_read += buffer.nbytes
        return payload

    def _lookup(self, key: BlockKey) -> tuple[_Held | None, str, threading.Event | None]:
        """Under the lock: a held block and its source, or the event of a prefetch reading it."""
        if key in self._resident:
            return self._resident[key], "resident", None
        if key in self._lru:
            self._lru.move_to_end(key)
            return self._lru[key], "cache", None
        if key in self._staged:
            return self._staged.pop(key), "prefetch", None
        return None, "", self._pending.get(key)

    def _keep(self, key: BlockKey, held: _Held) -> None:
        """Under the lock: hold a block read from storage (resident, LRU with eviction, or staged)."""
        if self.is_resident(key[0]):
            self._resident[key] = held
        elif self._keeps(key[0]):
            self._lru[key] = held
            self._lru_bytes += held.buffer.nbytes
            while self._lru_bytes > self.policy.cache_bytes:
                _, evicted = self._lru.popitem(last=False)
                self._lru_bytes -= evicted.buffer.nbytes
                self.stats.evictions += 1
        else:
            self._staged[key] = held

    def get(self, level: int, node: int) -> Fetched:
        """The payload of block ``(level, node)``: from RAM, from a prefetch, or one read from storage.

        A streamed payload (level not cached) lives in the level's scratch buffer until the next ``get`` of
        that level; a held one stays valid while referenced (eviction only drops the cache's reference).
        """
        key = (level, node)
        while True:
            with self._lock:
                held, source, pending = self._lookup(key)
                if held is not None:
                    read, held.unclaimed = held.unclaimed, 0
                    if read:
                        source = "prefetch"
                        self.stats.prefetch_hits += 1
                    else:
                        self.stats.hits += 1
                    return Fetched(held.payload, source, read)
            if pending is None:
                break
            pending.wait()  # a prefetch is reading it; if that failed, the read below raises the error
        with self._lock:
            self.stats.misses += 1
        if not self._keeps(level):
            return Fetched(self._read(key, self._scratch[level]), "storage", self._size[level])
        held = _Held(aligned_buffer(self._size[level]))
        self._read(key, held.buffer)
        with self._lock:
            self._keep(key, held)
        return Fetched(held.payload, "storage", self._size[level])

    def prefetch(self, path: Sequence[int]) -> Future[int]:
        """Read the blocks of ``path`` that are not in RAM on the background thread; the future gives the
        bytes read (or raises the first read error).  Staged blocks of earlier prefetches are dropped."""
        with self._lock:
            keys = [(level, int(node)) for level, node in enumerate(path)]
            self._staged = {key: held for key, held in self._staged.items() if key in keys}
            todo = [k for k in keys if self._lookup_quiet(k) is None]
            events = {key: self._pending.setdefault(key, threading.Event()) for key in todo}
        return self._prefetcher.submit(self._prefetch, events)

    def _lookup_quiet(self, key: BlockKey) -> object | None:
        """Under the lock: anything (held block or pending read) for ``key``, without touching LRU order."""
        return self._resident.get(key) or self._lru.get(key) or self._staged.get(key) or self._pending.get(key)

    def _prefetch(self, events: dict[BlockKey, threading.Event]) -> int:
        total = 0
        try:
            for key, event in events.items():
                held = _Held(aligned_buffer(self._size[key[0]]), self._size[key[0]])
                try:
                    self._read(key, held.buffer)
                    with self._lock:
                        self._keep(key, held)
                finally:
                    self._release(key, event)
                total += held.unclaimed
        finally:
            for key, event in events.items():  # after an error: release whoever waits on the rest
                self._release(key, event)
        return total

    def _release(self, key: BlockKey, event: threading.Event) -> None:
        with self._lock:
            if self._pending.get(key) is event:
                del self._pending[key]
        event.set()

    def preload(self, levels: Sequence[int] | None = None) -> int:
        """Read every block of ``levels`` (default: the resident ones) into RAM now; returns bytes read."""
        before = self.stats.bytes_read
        for level in range(self.policy.resident_levels) if levels is None else levels:
            if not self._keeps(level):
                raise BankError(f"level {level} is neither resident nor fits the cache ({self.policy})")
            for node in range(self.reader.index.memory.nodes_at(level)):
                self.get(level, node)
        return self.stats.bytes_read - before

    def close(self) -> None:
        self._prefetcher.shutdown(wait=True)
        with self._lock:
            self._resident.clear()
            self._lru.clear()
            self._staged.clear()
            self._lru_bytes = 0


@dataclass(frozen=True)
class SlotUpdate:
    """What a path switch cost: the levels rewritten, the payload bytes dequantized into the slot
    (``bytes_read``), the bytes read from storage for it (``storage_bytes``: header pages included, 0 for
    blocks already in RAM), where each changed level's block came from, and per changed level the seconds
    of fetch + fill (``level_seconds``) and of the fetch alone (``fetch_seconds``; the rest is dequantizing)."""

    path: tuple[int, ...]
    levels_changed: tuple[int, ...]
    bytes_read: int
    seconds: float
    storage_bytes: int = 0
    sources: tuple[str, ...] = ()
    level_seconds: tuple[float, ...] = ()
    fetch_seconds: tuple[float, ...] = ()


def slot_destination(contract: SlotContract, slot: Sequence[torch.Tensor], level: int) -> Destination:
    """(layer index, matrix) -> the numpy view of ``slot`` that a level-``level`` block's matrix fills.

    ``gate``/``up`` ``[d, r]`` land in columns of ``gate_up [1, d, 2R]``, ``down [r, d]`` in rows of
    ``down [1, R, d]``: the views share memory with the slot tensors, so decoding into them fills the slot.
    """
    views: dict[tuple[int, str], np.ndarray] = {}
    for tensor, buffer in zip(contract.tensors, slot):
        array = buffer.numpy()[0]  # batch axis dropped
        for (lo, hi), source in zip(tensor.level_ranges[level], tensor.sources):
            index = [slice(None)] * array.ndim
            index[tensor.hidden_axis - 1] = slice(lo, hi)
            views[(tensor.memory_index, source)] = array[tuple(index)]
    return lambda layer, matrix: views[(layer, matrix)]


class SlotFiller:
    """Slot buffers for a contract, filled level by level from a bank through a :class:`BlockCache`.

    ``layout`` is the slot strategy the contract was made for (default: float32 slot): a float slot gets each
    block dequantized into it, a quantized one (:mod:`hm_export.kernels.strategies`) the block's codes and scales.
    """

    def __init__(
        self,
        contract: SlotContract,
        reader: BankReader,
        policy: CachePolicy | None = None,
        layout: SlotLayout | None = None,
    ) -> None:
        index = reader.index
        shape = (index.d_model, index.memory.widths, index.memory.branching, index.memory.layers)
        if shape != (contract.d_model, contract.widths, contract.branching, contract.memory_layers):
            raise BankError(f"{reader.bank_dir}: bank layout does not match the slot contract")
        self.layout = layout or SlotLayout(get_strategy(DEFAULT_STRATEGY))
        if contract.dtype != self.layout.name:
            raise BankError(f"slot dtype {contract.dtype!r} does not match slot strategy {self.layout.strategy.name!r}")
        self.contract, self.memory = contract, index.memory
        self.slot = empty_slot(contract)
        self.blocks = BlockCache(reader, policy)
        if self.layout.strategy.quantized:
            self._fill_level: Callable[[int, memoryview], None] = QuantizedLevelWriter(
                contract, self.layout, reader, self.slot
            )
        else:
            if contract.dtype == "float16" and any(s.name == "bfloat16" for s in reader.schemes):
                raise BankError(f"{reader.bank_dir}: a bfloat16 bank cannot fill a float16 slot (re-export the bank)")
            destinations = [slot_destination(contract, self.slot, lv) for lv in range(self.memory.num_levels)]
            self._fill_level = lambda level, payload: reader.decode_into(level, payload, destinations[level])
        self.path: list[int | None] = [None] * self.memory.num_levels

    def float_memory(self) -> list[LayerMemory]:
        """The slot's memory as float32 ``(gate_up, down)`` per memory layer (dequantized codes)."""
        return self.layout.float_memory(self.slot)

    def program_memory(self) -> list[LayerMemory | Callable[[Tensor], Tensor]]:
        """The slot's memory as the program computes with it (:meth:`SlotLayout.program_memory`)."""
        return self.layout.program_memory(self.slot)

    def set_path(self, path: Sequence[int]) -> SlotUpdate:
        """Make the slot hold ``path``'s memory, fetching and dequantizing only the levels whose node changed."""
        path = self.memory.validate_path(path)
        start = time.perf_counter()
        changed, sources, seconds, fetch_seconds, payload_bytes, storage_bytes = [], [], [], [], 0, 0
        for level, node in enumerate(path):
            if self.path[level] == node:
                continue
            level_start = time.perf_counter()
            self.path[level] = None  # a failure below leaves this level marked as not loaded
            fetched = self.blocks.get(level, node)
            fetch_seconds.append(time.perf_counter() - level_start)
            self._fill_level(level, fetched.payload)
            self.path[level] = node
            changed.append(level)
            sources.append(fetched.source)
            seconds.append(time.perf_counter() - level_start)
            payload_bytes += len(fetched.payload)
            storage_bytes += fetched.bytes_read
        return SlotUpdate(
            path,
            tuple(changed),
            payload_bytes,
            time.perf_counter() - start,
            storage_bytes,
            tuple(sources),
            tuple(seconds),
            tuple(fetch_seconds),
        )

    def prefetch(self, path: Sequence[int]) -> Future[int]:
        """Start reading ``path``'s blocks in the background (see :meth:`BlockCache.prefetch`)."""
        return self.blocks.prefetch(self.memory.validate_path(path))

    def close(self) -> None:
        self.blocks.close()
