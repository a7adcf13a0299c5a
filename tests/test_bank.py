from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

from hm_export.bank import (
    FORMAT_VERSION,
    HEADER,
    INDEX_FILE,
    MAGIC,
    PAYLOAD_ALIGNMENT,
    BankError,
    BankReader,
    BlockHeader,
    schema_hash,
    write_bank,
)
from hm_export.checkpoint import save_checkpoint
from hm_export.config import MemoryConfig, ModelConfig
from hm_export.model import MemoryLM
from hm_export.router import MINILM_DIM, CentroidTree

MEMORY = MemoryConfig(branching=(2, 3), widths=(4, 3), layers=(0, 2))


def make_checkpoint(directory: Path, storage_dtype: str = "float32", memory: MemoryConfig = MEMORY) -> MemoryLM:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=8, d_model=16, n_layers=3, n_heads=2, n_kv_heads=1, ffn_hidden=32, max_seq_len=8, memory=memory
    )
    model = MemoryLM(cfg)
    with torch.no_grad():
        for down in model.bank.down:  # D starts at zero: give it values so the round trip means something
            down.normal_()
    rng = np.random.default_rng(0)
    tree = CentroidTree(
        memory, [rng.standard_normal((memory.nodes_at(lv), MINILM_DIM)) for lv in range(memory.num_levels)]
    )
    tokenizer = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    save_checkpoint(directory, model, tree, tokenizer, storage_dtype=storage_dtype)
    return model


def blocks(memory: MemoryConfig) -> list[tuple[int, int]]:
    return [(lv, i) for lv in range(memory.num_levels) for i in range(memory.nodes_at(lv))]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MemoryLM]:
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    return directory, make_checkpoint(directory)


@pytest.fixture
def bank(tmp_path: Path, checkpoint: tuple[Path, MemoryLM]) -> Path:
    write_bank(tmp_path / "bank", checkpoint[0])
    return tmp_path / "bank"


def test_float32_round_trip_is_bit_exact(bank: Path, checkpoint: tuple[Path, MemoryLM]) -> None:
    model, reader = checkpoint[1], BankReader(bank)
    for level, node in blocks(MEMORY):
        block = reader.read_block(level, node)
        for name in ("gate", "up", "down"):
            array = getattr(block, name)
            assert array.dtype == np.float32
            expected = getattr(model.bank, name)[level][node].detach().float().numpy()
            np.testing.assert_array_equal(array.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("storage_dtype", ["float32", "bfloat16"])
def test_float16_matches_half(tmp_path: Path, storage_dtype: str) -> None:
    model = make_checkpoint(tmp_path / "ckpt", storage_dtype)
    write_bank(tmp_path / "bank", tmp_path / "ckpt", scheme="float16")
    reader = BankReader(tmp_path / "bank")
    assert reader.index.scheme == "float16"
    for level, node in blocks(MEMORY):
        block = reader.read_block(level, node)
        for name in ("gate", "up", "down"):
            stored = getattr(model.bank, name)[level][node].detach().to(getattr(torch, storage_dtype))
            np.testing.assert_array_equal(getattr(block, name), stored.half().float().numpy())


def test_block_header_and_alignment(bank: Path) -> None:
    index = BankReader(bank).index
    d, layers = index.d_model, len(MEMORY.layers)
    for entry in index.blocks:
        data = (bank / entry.file).read_bytes()
        header = BlockHeader._make(HEADER.unpack_from(data))
        width = MEMORY.widths[entry.level]
        assert entry.file == f"level{entry.level}/node{entry.node:06d}.hmb"
        assert header.magic == MAGIC == b"HMBK" and header.version == FORMAT_VERSION == 2
        assert header.header_length == HEADER.size
        assert (header.scheme_id, header.level, header.node) == (1, entry.level, entry.node)
        assert (header.layers, header.d_model, header.width) == (layers, d, width)
        assert header.payload_offset == entry.offset == PAYLOAD_ALIGNMENT and entry.offset % 4096 == 0
        assert header.payload_length == entry.length == 3 * layers * d * width * 4 == len(data) - entry.offset
        assert header.crc32 == entry.crc32 == zlib.crc32(data[entry.offset :])
        assert data[HEADER.size : entry.offset] == bytes(entry.offset - HEADER.size)


def test_index_contents(bank: Path) -> None:
    raw = json.loads((bank / INDEX_FILE).read_text())
    assert (raw["format"], raw["format_version"], raw["scheme"]) == ("hm-export-bank", 2, "float32")
    model = {"d_model": 16, "memory_layers": [0, 2], "branching": [2, 3], "widths": [4, 3], "nodes": [2, 6]}
    assert raw["model"] == model
    assert [(b["level"], b["node"]) for b in raw["blocks"]] == blocks(MEMORY)
    assert raw["schema_hash"] == BankReader(bank).schema_hash == schema_hash(16, MEMORY, "float32")


def test_rewrite_is_idempotent_and_leaves_no_temp_files(bank: Path, checkpoint: tuple[Path, MemoryLM]) -> None:
    before = {p: p.read_bytes() for p in bank.rglob("*") if p.is_file()}
    write_bank(bank, checkpoint[0], progress=True)
    after = {p: p.read_bytes() for p in bank.rglob("*") if p.is_file()}
    assert after == before
    assert len(after) == 1 + len(blocks(MEMORY))
    assert not [p for p in bank.rglob("*") if p.name.endswith(".tmp")]


def test_failed_write_leaves_no_temp_files(
    tmp_path: Path, checkpoint: tuple[Path, MemoryLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("hm_export.bank.quantize.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_bank(tmp_path / "bank", checkpoint[0])
    assert [p for p in (tmp_path / "bank").rglob("*") if p.is_file()] == []


def test_schema_hash_tracks_layout(tmp_path: Path, checkpoint: tuple[Path, MemoryLM]) -> None:
    base = schema_hash(16, MEMORY, "float32")
    assert schema_hash(16, MEMORY, "float16") != base
    assert schema_hash(16, MemoryConfig((2, 3), (4, 4), (0, 2)), "float32") != base
    assert schema_hash(16, MemoryConfig((2, 3), (4, 3), (0, 1)), "float32") != base
    assert schema_hash(32, MEMORY, "float32") != base
    wider = MemoryConfig(branching=(2, 3), widths=(4, 5), layers=(0, 2))
    make_checkpoint(tmp_path / "ckpt", memory=wider)
    assert write_bank(tmp_path / "bank", tmp_path / "ckpt").schema_hash == schema_hash(16, wider, "float32") != base
    assert write_bank(tmp_path / "bank16", checkpoint[0], scheme="float16").schema_hash != base


def edit_index(bank: Path, edit: dict[str, object], block: int | None = None) -> None:
    path = bank / INDEX_FILE
    raw = json.loads(path.read_text())
    (raw if block is None else raw["blocks"][block]).update(edit)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"format": "something-else"}, "format"),
        ({"format_version": 1}, "format_version 1 is not supported"),
        ({"scheme": "int3"}, "unknown scheme 'int3'"),
        ({"schema_hash": "0" * 64}, "schema_hash"),
    ],
)
def test_index_errors(bank: Path, edit: dict[str, object], message: str) -> None:
    edit_index(bank, edit)
    with pytest.raises(BankError, match=message) as info:
        BankReader(bank)
    assert str(bank / INDEX_FILE) in str(info.value)


def test_missing_index(tmp_path: Path) -> None:
    with pytest.raises(BankError, match="missing") as info:
        BankReader(tmp_path)
    assert str(tmp_path / INDEX_FILE) in str(info.value)


@pytest.mark.parametrize("file", ["/etc/passwd", "../outside.hmb", "level0/../../outside.hmb", "level0\\..\\x.hmb"])
def test_unsafe_paths_are_refused(bank: Path, file: str) -> None:
    edit_index(bank, {"file": file}, block=1)
    with pytest.raises(BankError, match="unsafe file path") as info:
        BankReader(bank)
    assert str(bank / INDEX_FILE) in str(info.value)


def block_path(bank: Path, level: int = 1, node: int = 4) -> Path:
    return bank / f"level{level}/node{node:06d}.hmb"


def test_missing_block(bank: Path) -> None:
    block_path(bank).unlink()
    with pytest.raises(BankError, match="missing") as info:
        BankReader(bank).read_block(1, 4)
    assert str(block_path(bank)) in str(info.value)


def test_truncated_block(bank: Path) -> None:
    path = block_path(bank)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(BankError, match=f"expected {len(data)} bytes, got {len(data) - 10}") as info:
        BankReader(bank).read_block(1, 4)
    assert str(path) in str(info.value)


def corrupt(path: Path, offset: int, value: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + len(value)] = value
    path.write_bytes(bytes(data))


def test_bad_magic(bank: Path) -> None:
    corrupt(block_path(bank), 0, b"NOPE")
    with pytest.raises(BankError, match="bad magic") as info:
        BankReader(bank).read_block(1, 4)
    assert str(block_path(bank)) in str(info.value)


def test_checksum_mismatch(bank: Path) -> None:
    corrupt(block_path(bank), PAYLOAD_ALIGNMENT + 5, b"\xff")
    reader = BankReader(bank)
    with pytest.raises(BankError, match="checksum mismatch") as info:
        reader.read_block(1, 4)
    assert str(block_path(bank)) in str(info.value)
    reader.read_block(1, 4, verify=False)  # header still matches; only the payload changed


def test_header_index_mismatch(bank: Path) -> None:
    # Another block of the same level and size put in the place of node 4: only the header tells.
    block_path(bank).write_bytes(block_path(bank, node=5).read_bytes())
    with pytest.raises(BankError, match="header does not match the index \\(node 5 != 4") as info:
        BankReader(bank).read_block(1, 4, verify=False)
    assert str(block_path(bank)) in str(info.value)


def test_out_of_range_block(bank: Path) -> None:
    with pytest.raises(BankError, match="no block"):
        BankReader(bank).read_block(1, 6)
