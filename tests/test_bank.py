from __future__ import annotations

import hashlib
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_checkpoint, tiny_config, tiny_model, tiny_tokenizer, tiny_tree
from tokenizers import Tokenizer, models

from hm_export.bank import (
    FORMAT_VERSION,
    HEADER,
    INDEX_FILE,
    MAGIC,
    PAYLOAD_ALIGNMENT,
    SCHEMES,
    BankError,
    BankReader,
    BlockHeader,
    quantize_bank,
    resolve_preset,
    schema_hash,
    write_bank,
)
from hm_export.bank.tools import check_bank, inspect_bank
from hm_export.checkpoint import save_checkpoint
from hm_export.config import MemoryConfig, ModelConfig
from hm_export.fuzz import crc_patch
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
        assert header.magic == MAGIC == b"HMBK" and header.version == FORMAT_VERSION == 3
        assert header.header_length == HEADER.size
        assert (header.scheme_id, header.level, header.node) == (1, entry.level, entry.node)
        assert (header.layers, header.d_model, header.width) == (layers, d, width)
        assert header.payload_offset == entry.offset == PAYLOAD_ALIGNMENT and entry.offset % 4096 == 0
        assert header.payload_length == entry.length == 3 * layers * d * width * 4 == len(data) - entry.offset
        assert header.crc32 == entry.crc32 == zlib.crc32(data[entry.offset :])
        assert entry.sha256 == hashlib.sha256(data[entry.offset :]).hexdigest()
        assert data[HEADER.size : entry.offset] == bytes(entry.offset - HEADER.size)


def test_index_contents(bank: Path) -> None:
    raw = json.loads((bank / INDEX_FILE).read_text())
    assert (raw["format"], raw["format_version"], raw["scheme"]) == ("hm-export-bank", 3, "float32")
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
        ({"format_version": 2}, r"version 2 bank has no per-block sha256 .*re-create it with `hm-export bank"),
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


def forge_block(path: Path) -> bytes:
    """Edit a payload byte of the block at ``path`` keeping its CRC-32 (4 bytes solved for); return the original."""
    data = bytearray(original := path.read_bytes())
    payload = bytearray(data[PAYLOAD_ALIGNMENT:])
    want = zlib.crc32(payload)
    payload[3] ^= 0xFF
    payload[8:12] = crc_patch(bytes(payload), 8, want)
    assert zlib.crc32(payload) == want and bytes(payload) != data[PAYLOAD_ALIGNMENT:]
    data[PAYLOAD_ALIGNMENT:] = payload
    path.write_bytes(bytes(data))
    return original


def test_unauthenticated_crc_preserving_forgery_is_read_by_the_trust_model(bank: Path) -> None:
    """Without an index authenticated by a signed manifest, verified reads check the CRC-32 only: whoever can
    edit a block can rewrite the index too, so its sha256 would add cost and no security (docs/bank-format.md)."""
    pristine = BankReader(bank).read_block(1, 4)
    forge_block(block_path(bank))
    reader = BankReader(bank)
    assert not reader.authenticated
    forged = reader.read_block(1, 4)  # header and CRC-32 match: read
    assert any(not np.array_equal(a, b) for a, b in zip(pristine, forged, strict=True))


def test_authenticated_crc_preserving_forgery_is_refused(bank: Path) -> None:
    """With the index's digest from a signed manifest, the per-block sha256 refuses a CRC-preserving edit."""
    index_sha256 = hashlib.sha256((bank / INDEX_FILE).read_bytes()).hexdigest()
    path = block_path(bank)
    forge_block(path)
    reader = BankReader(bank, index_sha256=index_sha256)
    assert reader.authenticated
    with pytest.raises(BankError, match=r"block \(level 1, node 4\): checksum mismatch \(payload sha256") as info:
        reader.read_block(1, 4)
    assert str(path) in str(info.value)
    reader.read_block(1, 4, verify=False)  # trusted storage: header checks only
    report = check_bank(bank, index_sha256=index_sha256)
    assert [(f["level"], f["node"]) for f in report.failures] == [(1, 4)] and "sha256" in report.failures[0]["error"]
    assert check_bank(bank).ok  # unauthenticated: the CRC-32 matches


def test_authenticated_index_must_have_the_signed_digest(bank: Path) -> None:
    index = bank / INDEX_FILE
    digest = hashlib.sha256(index.read_bytes()).hexdigest()
    BankReader(bank, index_sha256=digest)
    with pytest.raises(BankError, match=r"sha256 .* differs from the signed manifest's") as info:
        BankReader(bank, index_sha256="0" * 64)
    assert str(index) in str(info.value)


@pytest.mark.parametrize("sha", ["0" * 63, "A" * 64, 7])
def test_index_sha256_field_checked(bank: Path, sha: object) -> None:
    edit_index(bank, {"sha256": sha}, block=3)
    with pytest.raises(BankError, match=r"block \(level 1, node 1\): sha256 .* is not 64 lowercase hex digits"):
        BankReader(bank)


def test_header_index_mismatch(bank: Path) -> None:
    # Another block of the same level and size put in the place of node 4: only the header tells.
    block_path(bank).write_bytes(block_path(bank, node=5).read_bytes())
    with pytest.raises(BankError, match="header does not match the index \\(node 5 != 4") as info:
        BankReader(bank).read_block(1, 4, verify=False)
    assert str(block_path(bank)) in str(info.value)


def test_out_of_range_block(bank: Path) -> None:
    with pytest.raises(BankError, match="no block"):
        BankReader(bank).read_block(1, 6)


# --- quantized schemes, presets, level packs, resumable quantizer, inspect / check / CLI ------------------

# d = 64 and level-0 width 64 give two int4 groups of 32 per column in every matrix of level 0; level 1's
# width 8 makes its down matrices a single (capped) group.
QMEM = MemoryConfig(branching=(2, 2), widths=(64, 8), layers=(0, 1))
QCFG = tiny_config(d_model=64, n_heads=2, n_kv_heads=1, memory=QMEM)
QBLOCKS = [(lv, i) for lv in range(2) for i in range(QMEM.nodes_at(lv))]


@pytest.fixture(scope="module")
def qckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MemoryLM]:
    root = tmp_path_factory.mktemp("qckpt")
    return tiny_checkpoint(root, cfg=QCFG, seed=3), tiny_model(QCFG, seed=3)


def reference(model: MemoryLM, name: str, level: int, node: int) -> np.ndarray:
    return getattr(model.bank, name)[level][node].detach().float().numpy()


def error_bound(matrix: np.ndarray, scheme: str) -> np.ndarray:
    """The largest |dequantized - original| each element may have under ``scheme`` (groups of rows per column,
    capped at the rows, the last group shorter when the group size does not divide them)."""
    rows = matrix.shape[0]
    group = SCHEMES[scheme].group_size or rows
    bounds = []
    for start in range(0, rows, group):
        part = matrix[start : start + group]
        high, low = part.max(0), part.min(0)
        amax = np.maximum(high, -low)
        # int4: one step, as the side opposite the group's extreme may clip by one code
        bound = 0.5 * amax / 127 if scheme == "int8" else amax / 8
        bounds.append(np.broadcast_to(bound * 1.01 + 1e-7, part.shape))
    return np.concatenate(bounds)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_every_scheme_round_trips_within_its_error_bound(
    tmp_path: Path, qckpt: tuple[Path, MemoryLM], scheme: str
) -> None:
    check_round_trip(tmp_path, qckpt[0], qckpt[1], scheme, QBLOCKS)


@pytest.mark.parametrize("scheme", ["int4-g64", "int4-g128", "int8"])
def test_groups_that_do_not_divide_the_rows(tmp_path: Path, scheme: str) -> None:
    # d = 96: groups of 64 rows leave a last group of 32; groups of 128 are capped at the 96 rows.
    memory = MemoryConfig(branching=(2,), widths=(80,), layers=(0,))
    cfg = tiny_config(d_model=96, n_heads=3, n_kv_heads=1, memory=memory)
    checkpoint = tiny_checkpoint(tmp_path, cfg=cfg, seed=5)
    check_round_trip(tmp_path, checkpoint, tiny_model(cfg, seed=5), scheme, [(0, 0), (0, 1)])
    groups = {"int8": 1, "int4-g64": 2, "int4-g128": 1}[scheme]  # scales per column
    codes = 96 * 80 // (1 if scheme == "int8" else 2)
    scales = -(-groups * 80 * 2 // 16) * 16
    assert SCHEMES[scheme].section_length(96, 80) == codes + scales


def check_round_trip(
    tmp_path: Path, checkpoint: Path, model: MemoryLM, scheme: str, blocks: list[tuple[int, int]]
) -> None:
    write_bank(tmp_path / "bank", checkpoint, scheme=scheme, workers=1)
    reader = BankReader(tmp_path / "bank")
    worst = 0.0
    for level, node in blocks:
        block = reader.read_block(level, node)
        for name in ("gate", "up", "down"):
            got, want = getattr(block, name), reference(model, name, level, node)
            assert got.dtype == np.float32 and got.shape == want.shape
            if scheme == "float32":
                np.testing.assert_array_equal(got, want)
            elif scheme in ("float16", "bfloat16"):
                expected = torch.from_numpy(want).to(getattr(torch, scheme)).float().numpy()
                np.testing.assert_array_equal(got, expected)  # round to nearest even, like torch
            else:
                for layer in range(got.shape[0]):
                    error = np.abs(got[layer] - want[layer])
                    assert (error <= error_bound(want[layer], scheme)).all(), (level, node, name, layer)
                worst = max(worst, float(np.abs(got - want).max()))
    if scheme.startswith("int"):
        assert worst > 0  # lossy, really quantized


def test_int_schemes_payload_follows_the_documented_layout(tmp_path: Path, qckpt: tuple[Path, MemoryLM]) -> None:
    """Decode level 0 node 1 of int8 and int4-g32 banks by hand, as docs/bank-format.md says."""
    d, r, layers = 64, 64, 2
    for scheme in ("int8", "int4-g32"):
        write_bank(tmp_path / scheme, qckpt[0], scheme=scheme, workers=1)
        reader = BankReader(tmp_path / scheme)
        entry = reader.index.entry(0, 1)
        payload = (tmp_path / scheme / entry.file).read_bytes()[entry.offset :]
        block, offset = reader.read_block(0, 1), 0
        for layer in range(layers):
            for name in ("gate", "up", "down"):
                rows, cols = (r, d) if name == "down" else (d, r)
                group = rows if scheme == "int8" else min(32, rows)
                count, groups = rows * cols, rows // group
                if scheme == "int8":
                    codes = np.frombuffer(payload, np.int8, count, offset).astype(np.float32)
                    code_bytes = count
                else:
                    packed = np.frombuffer(payload, np.uint8, count // 2, offset)
                    nibbles = np.empty(count, np.float32)
                    nibbles[0::2], nibbles[1::2] = packed & 15, packed >> 4  # element 2k in the low nibble
                    codes = nibbles - 8
                    code_bytes = count // 2
                offset += -(-code_bytes // 16) * 16
                scales = np.frombuffer(payload, "<f2", groups * cols, offset).astype(np.float32)
                offset += -(-groups * cols * 2 // 16) * 16
                values = codes.reshape(groups, group, cols) * scales.reshape(groups, 1, cols)
                np.testing.assert_array_equal(values.reshape(rows, cols), getattr(block, name)[layer])
        assert offset == len(payload) == entry.length


def test_presets_resolve_per_level() -> None:
    assert resolve_preset("int8", 3) == ("int8", "int8", "int8")
    assert resolve_preset("mixed-int8-int4", 3) == ("int8", "int4-g32", "int4-g32")
    assert resolve_preset("int8,bfloat16,int4-g128", 3) == ("int8", "bfloat16", "int4-g128")
    with pytest.raises(BankError, match="lists 2 levels, the memory has 3"):
        resolve_preset("int8,int4-g32", 3)
    for bad in ("int3", "int8,int5", "", "INT8", "int4-g16"):
        with pytest.raises(BankError, match="unknown scheme"):
            resolve_preset(bad, 3)
    assert (
        schema_hash(16, MEMORY, "int8") == schema_hash(16, MEMORY, "int8,int8") != schema_hash(16, MEMORY, "int4-g32")
    )


def test_mixed_preset_sets_scheme_and_group_per_level(tmp_path: Path, qckpt: tuple[Path, MemoryLM]) -> None:
    index = write_bank(tmp_path / "bank", qckpt[0], scheme="mixed-int8-int4", workers=1)
    raw = json.loads((tmp_path / "bank" / INDEX_FILE).read_text())
    assert raw["scheme"] == "mixed-int8-int4" and raw["layout"] == "per-block"
    assert raw["levels"] == [
        {"scheme": "int8", "scheme_id": 4, "group_size": 0},
        {"scheme": "int4-g32", "scheme_id": 5, "group_size": 32},
    ]
    for entry in index.blocks:
        header = BlockHeader._make(HEADER.unpack_from((tmp_path / "bank" / entry.file).read_bytes()))
        assert (header.scheme_id, header.group_size) == ((4, 0) if entry.level == 0 else (5, 32))
        assert entry.scheme == raw["levels"][entry.level]["scheme"]


def test_level_packs_hold_aligned_blocks_and_read_like_block_files(
    tmp_path: Path, qckpt: tuple[Path, MemoryLM]
) -> None:
    packed = write_bank(tmp_path / "packed", qckpt[0], scheme="int4-g32", layout="per-level", workers=1)
    loose = write_bank(tmp_path / "loose", qckpt[0], scheme="int4-g32", workers=1)
    assert sorted(p.name for p in (tmp_path / "packed").iterdir()) == ["index.json", "level0.hmp", "level1.hmp"]
    assert packed.layout == "per-level" and packed.schema_hash == loose.schema_hash
    packed_reader, loose_reader = BankReader(tmp_path / "packed"), BankReader(tmp_path / "loose")
    for level in range(2):
        entries = [packed.entry(level, n) for n in range(QMEM.nodes_at(level))]
        stride = PAYLOAD_ALIGNMENT + -(-entries[0].length // PAYLOAD_ALIGNMENT) * PAYLOAD_ALIGNMENT
        assert [e.offset for e in entries] == [n * stride + PAYLOAD_ALIGNMENT for n in range(len(entries))]
        data = (tmp_path / "packed" / f"level{level}.hmp").read_bytes()
        assert len(data) == len(entries) * stride
        for e in entries:
            header = BlockHeader._make(HEADER.unpack_from(data, e.offset - PAYLOAD_ALIGNMENT))
            assert (header.level, header.node, header.payload_offset, header.crc32) == (
                level,
                e.node,
                e.offset,
                e.crc32,
            )
            assert e.crc32 == loose.entry(level, e.node).crc32
            for a, b in zip(packed_reader.read_block(level, e.node), loose_reader.read_block(level, e.node)):
                np.testing.assert_array_equal(a, b)


@pytest.fixture
def pack(tmp_path: Path, qckpt: tuple[Path, MemoryLM]) -> Path:
    write_bank(tmp_path / "pack", qckpt[0], scheme="int8", layout="per-level", workers=1)
    return tmp_path / "pack"


def test_packed_corruption_names_the_block(pack: Path) -> None:
    entry = BankReader(pack).index.entry(1, 3)
    corrupt(pack / entry.file, entry.offset + 7, b"\x55")
    with pytest.raises(BankError, match=r"level1\.hmp: block \(level 1, node 3\): checksum mismatch"):
        BankReader(pack).read_block(1, 3)
    BankReader(pack).read_block(1, 2)  # its neighbours in the same pack are fine


def test_truncated_pack_names_the_block(pack: Path) -> None:
    entry = BankReader(pack).index.entry(1, 3)
    path = pack / entry.file
    path.write_bytes(path.read_bytes()[: entry.offset + 100])
    with pytest.raises(BankError, match=r"level1\.hmp: truncated pack for block \(level 1, node 3\)") as info:
        BankReader(pack).read_block(1, 3)
    assert f"expected {PAYLOAD_ALIGNMENT + entry.length} bytes, got {PAYLOAD_ALIGNMENT + 100}" in str(info.value)


@pytest.mark.parametrize("layout", ["per-block", "per-level"])
def test_wrong_block_version_names_the_block(tmp_path: Path, qckpt: tuple[Path, MemoryLM], layout: str) -> None:
    write_bank(tmp_path / "bank", qckpt[0], scheme="int4-g64", layout=layout, workers=1)
    entry = BankReader(tmp_path / "bank").index.entry(0, 1)
    corrupt(tmp_path / "bank" / entry.file, entry.offset - PAYLOAD_ALIGNMENT + 4, (7).to_bytes(2, "little"))
    with pytest.raises(BankError, match=r"block \(level 0, node 1\): block format version 7, this reader reads 3"):
        BankReader(tmp_path / "bank").read_block(0, 1)


def bank_files(bank: Path) -> dict[str, bytes]:
    return {str(p.relative_to(bank)): p.read_bytes() for p in sorted(bank.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout", ["per-block", "per-level"])
def test_interrupted_quantize_resumes_and_matches_a_clean_run(
    tmp_path: Path, qckpt: tuple[Path, MemoryLM], monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    import hm_export.bank.quantize as quantize_module

    clean = quantize_bank(tmp_path / "clean", qckpt[0], "mixed-int8-int4", layout=layout, workers=1)
    real, done = quantize_module._quantize, []

    def crash_after_three(job: object) -> object:
        if len(done) == 3:
            raise KeyboardInterrupt  # the process dies here (Ctrl-C, OOM kill, power cut...)
        done.append(job)
        return real(job)

    monkeypatch.setattr(quantize_module, "_quantize", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        quantize_bank(tmp_path / "bank", qckpt[0], "mixed-int8-int4", layout=layout, workers=1)
    monkeypatch.undo()
    with pytest.raises(BankError, match="missing"):  # not a bank until it is finished
        BankReader(tmp_path / "bank")
    assert (tmp_path / "bank" / ".quantize-state.json").is_file()
    leftover = tmp_path / "bank" / ("level1/.node000002.hmb.123.tmp" if layout == "per-block" else ".x.tmp")
    leftover.write_bytes(b"half a block from a killed worker")

    report = quantize_bank(tmp_path / "bank", qckpt[0], "mixed-int8-int4", layout=layout, workers=1)
    assert (report.blocks_resumed, report.blocks_written) == (3, len(QBLOCKS) - 3)
    assert bank_files(tmp_path / "bank") == bank_files(tmp_path / "clean")
    assert report.index == clean.index
    again = quantize_bank(tmp_path / "bank", qckpt[0], "mixed-int8-int4", layout=layout, workers=1)
    assert (again.blocks_resumed, again.blocks_written, again.source_bytes) == (len(QBLOCKS), 0, 0)
    assert bank_files(tmp_path / "bank") == bank_files(tmp_path / "clean")


def test_torn_pack_block_is_rewritten_on_resume(tmp_path: Path, qckpt: tuple[Path, MemoryLM]) -> None:
    quantize_bank(tmp_path / "clean", qckpt[0], "int8", layout="per-level", workers=1)
    bank = tmp_path / "bank"
    shutil.copytree(tmp_path / "clean", bank)
    # As if killed during level 1: its pack is still partial, the index not written yet.
    fingerprint = json.loads((bank / INDEX_FILE).read_text())["source"]["fingerprint"]
    (bank / ".quantize-state.json").write_text(json.dumps({"fingerprint": fingerprint}))
    (bank / INDEX_FILE).unlink()
    (bank / "level1.hmp").replace(bank / ".level1.hmp.partial")
    entry = BankReader(tmp_path / "clean").index.entry(1, 2)
    corrupt(bank / ".level1.hmp.partial", entry.offset + 3, b"\x00\x01\x02")  # payload torn, header intact
    report = quantize_bank(bank, qckpt[0], "int8", layout="per-level", workers=1)
    assert (report.blocks_resumed, report.blocks_written) == (len(QBLOCKS) - 1, 1)
    assert bank_files(bank) == bank_files(tmp_path / "clean")


def test_new_scheme_layout_or_checkpoint_starts_over(tmp_path: Path, qckpt: tuple[Path, MemoryLM]) -> None:
    bank = tmp_path / "bank"
    quantize_bank(bank, qckpt[0], "int8", workers=1)
    report = quantize_bank(bank, qckpt[0], "int4-g32", workers=1)
    assert report.blocks_resumed == 0 and BankReader(bank).index.scheme == "int4-g32"
    report = quantize_bank(bank, qckpt[0], "int4-g32", layout="per-level", workers=1)
    assert report.blocks_resumed == 0
    assert sorted(p.name for p in bank.iterdir()) == ["index.json", "level0.hmp", "level1.hmp"]  # no stale blocks
    other = tiny_checkpoint(tmp_path, name="other", cfg=QCFG, seed=4)
    report = quantize_bank(bank, other, "int4-g32", layout="per-level", workers=1)
    assert report.blocks_resumed == 0


def test_process_pool_gives_the_same_bank(tmp_path: Path, qckpt: tuple[Path, MemoryLM]) -> None:
    one = quantize_bank(tmp_path / "one", qckpt[0], "int4-g128", workers=1)
    two = quantize_bank(tmp_path / "two", qckpt[0], "int4-g128", workers=2)
    assert two.workers == 2 and one.index == two.index
    assert bank_files(tmp_path / "one") == bank_files(tmp_path / "two")
    assert two.source_bytes == sum(
        4 * 3 * len(QMEM.layers) * 64 * w * QMEM.nodes_at(lv) for lv, w in enumerate(QMEM.widths)
    )


def test_bfloat16_checkpoint_to_bfloat16_bank_is_bit_exact(tmp_path: Path) -> None:
    path = tiny_checkpoint(tmp_path, cfg=QCFG, seed=3, storage_dtype="bfloat16")
    write_bank(tmp_path / "bank", path, scheme="bfloat16", workers=1)
    reader, model = BankReader(tmp_path / "bank"), tiny_model(QCFG, seed=3)
    for level, node in QBLOCKS:
        for name in ("gate", "up", "down"):
            stored = getattr(model.bank, name)[level][node].detach().to(torch.bfloat16).float().numpy()
            np.testing.assert_array_equal(getattr(reader.read_block(level, node), name), stored)


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    model = tiny_model(QCFG, seed=3)
    with torch.no_grad():
        model.bank.up[1][2, 0, 5, 1] = float("nan")
    save_checkpoint(tmp_path / "ckpt", model, tiny_tree(QMEM), tiny_tokenizer())
    with pytest.raises(BankError, match=r"bank_level1\.safetensors: non-finite values in up of node 2 \(level 1\)"):
        write_bank(tmp_path / "bank", tmp_path / "ckpt", scheme="int8", workers=1)


def test_check_and_inspect(tmp_path: Path, qckpt: tuple[Path, MemoryLM]) -> None:
    bank = tmp_path / "bank"
    write_bank(bank, qckpt[0], scheme="mixed-int8-int4", workers=1)
    report = check_bank(bank)
    assert report.ok and report.blocks == len(QBLOCKS)
    summary = inspect_bank(bank)
    assert summary["blocks"] == len(QBLOCKS) and summary["files"] == 1 + len(QBLOCKS)
    assert summary["params"] == sum(p.numel() for p in qckpt[1].bank.parameters())
    assert [lv["scheme"] for lv in summary["levels"]] == ["int8", "int4-g32"]
    assert summary["bytes_on_disk"] == sum(len(b) for b in bank_files(bank).values())
    assert report.bytes_checked == sum(lv["read_bytes_per_block"] * lv["nodes"] for lv in summary["levels"])
    corrupt(bank / "level1/node000003.hmb", PAYLOAD_ALIGNMENT + 1, b"\xaa")
    (bank / "level0/node000000.hmb").unlink()
    report = check_bank(bank)
    assert not report.ok and [(f["level"], f["node"]) for f in report.failures] == [(0, 0), (1, 3)]
    assert "missing" in report.failures[0]["error"] and "checksum mismatch" in report.failures[1]["error"]


def test_bank_cli(tmp_path: Path, qckpt: tuple[Path, MemoryLM]) -> None:
    from click.testing import CliRunner

    from hm_export.cli import main

    bank = tmp_path / "bank"
    runner = CliRunner()
    result = runner.invoke(main, ["bank", "quantize", str(qckpt[0]), str(bank), "--scheme", "int4-g32", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["blocks_written"] == len(QBLOCKS) and report["level_schemes"] == ["int4-g32", "int4-g32"]
    result = runner.invoke(main, ["bank", "quantize", str(qckpt[0]), str(bank), "--scheme", "int4-g32", "--pack"])
    assert result.exit_code == 0 and "per-level" in result.output
    inspected = json.loads(runner.invoke(main, ["bank", "inspect", str(bank), "--json"]).output)
    assert inspected["layout"] == "per-level" and inspected["blocks"] == len(QBLOCKS)
    assert "int4-g32 blocks" in runner.invoke(main, ["bank", "inspect", str(bank)]).output
    checked = runner.invoke(main, ["bank", "check", str(bank), "--json"])
    assert checked.exit_code == 0 and json.loads(checked.output)["ok"]
    corrupt(bank / "level0.hmp", 2 * PAYLOAD_ALIGNMENT, b"\x01")
    checked = runner.invoke(main, ["bank", "check", str(bank)])
    assert checked.exit_code == 1 and "FAIL" in checked.output and "block (level 0, node 0)" in checked.output
    bad = runner.invoke(main, ["bank", "quantize", str(qckpt[0]), str(tmp_path / "x"), "--scheme", "int3"])
    assert bad.exit_code == 2 and "unknown scheme 'int3'" in bad.output


def test_export_recipe_checks_the_bank_scheme() -> None:
    from hm_export.export import ExportRecipe

    with pytest.raises(ValueError, match="unknown scheme 'int2'"):
        ExportRecipe(bank_scheme="int2")
