"""Streaming loader: slot filling straight from quantized blocks, level-only swaps, cache, prefetch, read modes."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_checkpoint, tiny_config, tiny_model

from hm_export.bank import PAYLOAD_ALIGNMENT, READ_MODES, BankError, BankReader, aligned_buffer, write_bank
from hm_export.bank.accuracy import load_dequantized_bank
from hm_export.config import MemoryConfig
from hm_export.export import ExportRecipe, export_bundle
from hm_export.model import MemoryLM, assemble_path
from hm_export.reference import level_memory_error
from hm_export.runtime_stubs.block_cache import BlockCache, CachePolicy, SlotFiller
from hm_export.runtime_stubs.loader import BundleLoader
from hm_export.slot import SlotContract, slot_tensors
from hm_export.verify import verify_bundle

MEMORY = MemoryConfig(branching=(2, 3), widths=(64, 8), layers=(0, 1))
CFG = tiny_config(d_model=64, n_heads=2, n_kv_heads=1, memory=MEMORY)
CONTRACT = SlotContract.for_model(CFG, seq_len=8)
LEAVES = [(i // 3, i) for i in range(MEMORY.nodes_at(1))]
STREAMING = CachePolicy(resident_levels=0, cache_bytes=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("cache"), cfg=CFG, seed=7)


@pytest.fixture(scope="module", params=["per-block", "per-level"])
def bank(request: pytest.FixtureRequest, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bank") / "bank"
    write_bank(directory, checkpoint, "mixed-int8-int4", layout=request.param, workers=1)
    return directory


def dequantized_model(bank: Path) -> MemoryLM:
    """The checkpoint's model with every bank block replaced by its dequantized value."""
    model = tiny_model(CFG, seed=7)
    load_dequantized_bank(model, BankReader(bank))
    return model


def block_bytes(bank: Path, level: int) -> int:
    return BankReader(bank).block_size(level)


def test_fill_equals_the_assembled_dequantized_path(bank: Path) -> None:
    model = dequantized_model(bank)
    filler = SlotFiller(CONTRACT, BankReader(bank), STREAMING)
    for path in LEAVES + LEAVES[::-1]:
        filler.set_path(path)
        for got, want in zip(filler.slot, slot_tensors(assemble_path(model, path))):
            assert torch.equal(got, want)
    # ...and the dequantized memory is the checkpoint's within each level's quantization noise: relative RMSE
    # ~ step / sqrt(12) of the scale (int8 level 0: absmax / 127 per column, ~0.006; int4-g32 level 1: absmax / 8
    # per group of 32 rows, ~0.07); a misplaced scale or block would be ~1.
    original = assemble_path(tiny_model(CFG, seed=7), filler.path)
    int8, int4 = level_memory_error(filler.float_memory(), original, MEMORY.widths)
    assert 0.003 < int8 < 0.01 and 0.04 < int4 < 0.1


def test_sibling_swap_touches_only_the_deepest_level(bank: Path) -> None:
    filler = SlotFiller(CONTRACT, BankReader(bank), STREAMING)
    first = filler.set_path((1, 3))
    assert first.levels_changed == (0, 1) and first.sources == ("storage", "storage")
    assert first.storage_bytes == block_bytes(bank, 0) + block_bytes(bank, 1)
    before = [t.clone() for t in filler.slot]
    update = filler.set_path((1, 4))
    assert update.levels_changed == (1,) and len(update.level_seconds) == len(update.fetch_seconds) == 1
    assert 0 < update.fetch_seconds[0] <= update.level_seconds[0] <= update.seconds
    assert update.bytes_read == filler.blocks.reader.index.entry(1, 4).length
    assert update.storage_bytes == block_bytes(bank, 1)
    r0, r1, width = 64, 8, 72
    gate_up, down = filler.slot[0], filler.slot[1]
    for lo, hi in ((0, r0), (width, width + r0)):  # level 0's gate and up columns: untouched
        assert torch.equal(gate_up[..., lo:hi], before[0][..., lo:hi])
    assert torch.equal(down[:, :r0], before[1][:, :r0])
    assert not torch.equal(gate_up[..., r0 : r0 + r1], before[0][..., r0 : r0 + r1])
    assert not torch.equal(down[:, r0:], before[1][:, r0:])
    again = filler.set_path((1, 4))
    assert again.levels_changed == () and again.bytes_read == again.storage_bytes == 0


def test_resident_level_and_lru_eviction(bank: Path) -> None:
    deep = block_bytes(bank, 1)
    filler = SlotFiller(CONTRACT, BankReader(bank), CachePolicy(resident_levels=1, cache_bytes=2 * deep))
    cache = filler.blocks
    sources = [filler.set_path(path).sources for path in [(0, 0), (1, 3), (0, 1), (1, 4)]]
    assert sources == [("storage", "storage"), ("storage", "storage"), ("resident", "storage"), ("resident", "storage")]
    assert cache.resident_bytes == 2 * block_bytes(bank, 0)  # both level-0 blocks kept
    assert cache.cached_bytes == 2 * deep and cache.stats.evictions == 2  # (1, 0) and (1, 3) evicted by the cap
    assert filler.set_path((1, 3)).sources == ("storage",)  # was evicted: read again
    update = filler.set_path((1, 4))
    assert update.sources == ("cache",) and update.storage_bytes == 0  # still in the LRU
    assert cache.stats.hits == 3 and cache.stats.misses == 7


def test_streaming_policy_keeps_nothing(bank: Path) -> None:
    filler = SlotFiller(CONTRACT, BankReader(bank), STREAMING)
    for path in [(0, 0), (1, 3), (0, 0)]:
        assert set(filler.set_path(path).sources) == {"storage"}
    assert filler.blocks.resident_bytes == filler.blocks.cached_bytes == 0
    with pytest.raises(BankError, match="neither resident nor fits the cache"):
        filler.blocks.preload([1])


def test_preload_reads_resident_levels_once(bank: Path) -> None:
    cache = BlockCache(BankReader(bank), CachePolicy(resident_levels=1, cache_bytes=0))
    assert cache.preload() == 2 * block_bytes(bank, 0)
    assert cache.get(0, 1).source == "resident" and cache.stats.misses == 2


def test_prefetch_then_set_path_only_dequantizes(bank: Path) -> None:
    filler = SlotFiller(CONTRACT, BankReader(bank), CachePolicy(resident_levels=1, cache_bytes=0))
    future = filler.prefetch((1, 5))
    assert future.result(timeout=10) == block_bytes(bank, 0) + block_bytes(bank, 1)
    update = filler.set_path((1, 5))
    assert update.sources == ("prefetch", "prefetch")  # level 0 kept (resident), level 1 staged
    assert update.storage_bytes == block_bytes(bank, 0) + block_bytes(bank, 1)  # charged once, to this swap
    assert filler.blocks.stats.misses == 0 and filler.blocks.stats.prefetch_hits == 2
    assert filler.prefetch((1, 5)).result(timeout=10) == block_bytes(bank, 1)  # level 0 already resident
    filler.set_path((0, 0))
    assert filler.set_path((1, 5)).sources == ("resident", "prefetch")
    expected = SlotFiller(CONTRACT, BankReader(bank), STREAMING)
    expected.set_path((1, 5))
    assert all(torch.equal(a, b) for a, b in zip(filler.slot, expected.slot))


def test_a_block_being_prefetched_is_read_once(bank: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reader = BankReader(bank)
    real, reads = reader.read_into, []

    def slow_read(level: int, node: int, buffer: np.ndarray, verify: bool = True) -> memoryview:
        reads.append((level, node, threading.current_thread().name))
        time.sleep(0.05)
        return real(level, node, buffer, verify)

    monkeypatch.setattr(reader, "read_into", slow_read)
    filler = SlotFiller(CONTRACT, reader, CachePolicy(resident_levels=0, cache_bytes=1 << 20))
    filler.prefetch((0, 2))
    update = filler.set_path((0, 2))  # starts while the prefetch is still reading: waits for it
    assert [(lv, n) for lv, n, _ in reads] == [(0, 0), (1, 2)]
    assert all(name.startswith("hm-prefetch") for _, _, name in reads)
    assert update.sources == ("prefetch", "prefetch") and filler.blocks.stats.misses == 0


def corrupt_block(bank: Path, level: int, node: int) -> tuple[Path, bytes]:
    entry = BankReader(bank).index.entry(level, node)
    path = bank / entry.file
    original = path.read_bytes()
    data = bytearray(original)
    data[entry.offset + 11] ^= 0xFF
    path.write_bytes(bytes(data))
    return path, original


def test_prefetch_errors_surface_and_a_failed_level_is_retried(bank: Path) -> None:
    filler = SlotFiller(CONTRACT, BankReader(bank), CachePolicy(resident_levels=1, cache_bytes=1 << 20))
    filler.set_path((0, 0))
    path, original = corrupt_block(bank, 1, 4)
    try:
        with pytest.raises(BankError, match=r"block \(level 1, node 4\): checksum mismatch"):
            filler.prefetch((1, 4)).result(timeout=10)
        with pytest.raises(BankError, match=r"block \(level 1, node 4\): checksum mismatch") as info:
            filler.set_path((1, 4))
        assert str(path) in str(info.value)
        assert filler.path == [1, None]  # level 0 changed, level 1 is marked as not loaded
    finally:
        path.write_bytes(original)
    assert filler.set_path((1, 4)).levels_changed == (1,)


def test_verification_can_be_switched_off(bank: Path) -> None:
    path, original = corrupt_block(bank, 1, 1)
    try:
        with pytest.raises(BankError, match="checksum mismatch"):
            SlotFiller(CONTRACT, BankReader(bank), STREAMING).set_path((0, 1))
        trusted = SlotFiller(CONTRACT, BankReader(bank), CachePolicy(0, 0, verify=False))
        assert trusted.set_path((0, 1)).levels_changed == (0, 1)
    finally:
        path.write_bytes(original)


@pytest.mark.parametrize("mode", READ_MODES)
def test_read_modes_read_the_same_bytes(bank: Path, mode: str) -> None:
    reference, reader = BankReader(bank), BankReader(bank, read_mode=mode)
    for entry in reference.index.blocks:
        want = reference.read_into(entry.level, entry.node, aligned_buffer(reference.block_size(entry.level)))
        buffer = aligned_buffer(reader.block_size(entry.level))
        assert buffer.ctypes.data % PAYLOAD_ALIGNMENT == 0
        got = reader.read_into(entry.level, entry.node, buffer)
        assert bytes(got) == bytes(want) and len(got) == entry.length
    reader.close()


def test_unknown_read_mode_and_mismatched_contract(bank: Path) -> None:
    with pytest.raises(BankError, match="unknown read mode 'aio'"):
        BankReader(bank, read_mode="aio")
    other = SlotContract.for_model(tiny_config(d_model=64, n_heads=2, n_kv_heads=1), seq_len=8)
    with pytest.raises(BankError, match="bank layout does not match the slot contract"):
        SlotFiller(other, BankReader(bank))


@pytest.mark.slow
def test_bundle_with_a_quantized_bank_runs_the_dequantized_memory(tmp_path: Path) -> None:
    """export --bank-scheme mixed-int8-int4 -> manifest records the levels; BundleLoader == eager on the
    dequantized bank, with prefetch and the cache in the loop.  Slow: an export."""
    cfg = tiny_config(max_seq_len=16, memory=MemoryConfig((2, 3), (32, 16), (0, 1)))
    checkpoint = tiny_checkpoint(tmp_path, cfg=cfg, seed=2)
    export_bundle(checkpoint, tmp_path / "bundle", ExportRecipe(bank_scheme="mixed-int8-int4", router_program=False))
    loader = BundleLoader(tmp_path / "bundle", cache=CachePolicy(resident_levels=1, cache_bytes=1 << 20))
    bank = loader.manifest.bank
    assert bank.scheme == "mixed-int8-int4" and list(bank.levels) == ["int8", "int4-g32"]
    model = tiny_model(cfg, seed=2)
    load_dequantized_bank(model, loader.bank)
    tokens = list(range(1, 12))
    for path in [(0, 1), (1, 4), (1, 5)]:
        loader.prefetch(path).result(timeout=10)
        update = loader.set_path(path)
        assert "storage" not in update.sources
        padded = torch.zeros(1, 16, dtype=torch.long)
        padded[0, : len(tokens)] = torch.tensor(tokens)
        with torch.no_grad():
            want = model.forward_path(padded, torch.tensor(path))[0, : len(tokens)]
        torch.testing.assert_close(loader.logits(tokens), want, rtol=0, atol=1e-4)
    # `hm-export verify` compares the program with the eager model on the dequantized bank: it passes.
    contexts = tmp_path / "contexts.jsonl"
    contexts.write_text("".join(json.dumps({"tokens": tokens, "context": c}) + "\n" for c in ("cats", "trees")))
    # `hm-export verify`: the program equals the eager model on the dequantized bank (export error), and that
    # memory is the checkpoint's within each level's bound (int8 0.02, int4 0.2).
    report = verify_bundle(tmp_path / "bundle", checkpoint, contexts)
    assert report.export["passed"] and report.export["max_abs"] < 1e-4 < report.quantization["max_abs"]
    assert report.memory["passed"] and report.tolerances.memory_rmse == (0.02, 0.2)
