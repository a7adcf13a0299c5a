"""Checkpoint directory: exact round trips, reduced-precision storage, validation errors, atomic saves."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_WORDS, tiny_checkpoint, tiny_config, tiny_model, tiny_tokenizer, tiny_tree
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models

from hm_export.checkpoint import (
    FORMAT_NAME,
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from hm_export.router import MINILM_DIM

CONFIG_KEYS = {"format", "format_version", "model", "storage_dtype", "router", "files", "metadata"}


def test_round_trip_float32_is_bit_exact(tmp_path):
    cfg = tiny_config()
    path = tiny_checkpoint(tmp_path, seed=4, metadata={"run": "unit-test", "step": 12})
    model, tree = tiny_model(cfg, seed=4), tiny_tree(cfg.memory, MINILM_DIM, seed=4)
    assert any(torch.count_nonzero(d) > 0 for d in model.bank.down)  # the memory is not a no-op

    ckpt = load_checkpoint(str(path))
    assert ckpt.path == path and ckpt.config == cfg and ckpt.storage_dtype == "float32"
    assert ckpt.metadata == {"run": "unit-test", "step": 12}
    assert not ckpt.model.training

    expected, got = model.state_dict(), ckpt.model.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], tensor), name
    for level, centroids in enumerate(tree.centroids):
        assert ckpt.tree.centroids[level].dtype == np.float32
        np.testing.assert_array_equal(ckpt.tree.centroids[level], centroids)

    text = "the cat sat on the mat ."
    assert ckpt.tokenizer.encode(text).ids == tiny_tokenizer().encode(text).ids == [1, 3, 5, 6, 1, 7, 10]
    tokens = torch.tensor([ckpt.tokenizer.encode(text).ids])
    with torch.no_grad():
        assert torch.equal(
            ckpt.model.forward_path(tokens, torch.tensor([1, 4])), model.forward_path(tokens, torch.tensor([1, 4]))
        )


def test_config_json_and_files_on_disk(tmp_path):
    cfg = tiny_config()
    path = tiny_checkpoint(tmp_path, storage_dtype="float16")
    config = json.loads((path / "config.json").read_text())
    assert set(config) == CONFIG_KEYS
    assert config["format"] == FORMAT_NAME == "hm-export-checkpoint" and config["format_version"] == FORMAT_VERSION == 1
    assert config["model"] == json.loads(json.dumps(cfg.to_dict()))
    assert config["storage_dtype"] == "float16"
    assert config["router"] == {"embedder": "all-MiniLM-L6-v2", "dim": MINILM_DIM, "pooling": "mean", "normalize": True}
    assert config["files"] == {
        "anchor": "anchor.safetensors",
        "bank": ["bank_level0.safetensors", "bank_level1.safetensors"],
        "router": "router.safetensors",
        "tokenizer": "tokenizer.json",
    }
    assert config["metadata"] == {}
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [
            "config.json",
            "anchor.safetensors",
            "bank_level0.safetensors",
            "bank_level1.safetensors",
            "router.safetensors",
            "tokenizer.json",
        ]
    )
    # Tensor names, shapes and stored dtypes of every file.
    d, n_mem = cfg.d_model, len(cfg.memory.layers)
    expected_files = {
        "bank_level0.safetensors": {"gate": (2, n_mem, d, 8), "up": (2, n_mem, d, 8), "down": (2, n_mem, 8, d)},
        "bank_level1.safetensors": {"gate": (6, n_mem, d, 4), "up": (6, n_mem, d, 4), "down": (6, n_mem, 4, d)},
        "router.safetensors": {"level0": (2, MINILM_DIM), "level1": (6, MINILM_DIM)},
    }
    for name, shapes in expected_files.items():
        with safe_open(str(path / name), framework="pt") as handle:
            assert {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()} == shapes
            dtypes = {handle.get_slice(k).get_dtype() for k in handle.keys()}
            assert dtypes == ({"F32"} if name.startswith("router") else {"F16"})
    with safe_open(str(path / "anchor.safetensors"), framework="pt") as handle:
        anchor = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    assert anchor["embed.weight"] == (64, 32) and anchor["norm.weight"] == (32,)
    assert anchor["blocks.1.attn.wk.weight"] == (2 * 8, 32) and anchor["blocks.0.ffn.down.weight"] == (32, 64)
    assert len(anchor) == 1 + 1 + cfg.n_layers * 9  # embed, final norm, per block 2 norms + 4 attn + 3 ffn
    assert not any(k.startswith("bank.") or "rope" in k or "mask" in k for k in anchor)


@pytest.mark.parametrize(("storage_dtype", "dtype"), [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_reduced_precision_storage_equals_rounding(tmp_path, storage_dtype, dtype):
    cfg = tiny_config()
    path = tiny_checkpoint(tmp_path, storage_dtype=storage_dtype, seed=2)
    model, tree = tiny_model(cfg, seed=2), tiny_tree(cfg.memory, MINILM_DIM, seed=2)
    ckpt = load_checkpoint(path)
    assert ckpt.storage_dtype == storage_dtype
    got = ckpt.model.state_dict()
    changed = 0
    for name, tensor in model.state_dict().items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], tensor.to(dtype).float()), name
        changed += not torch.equal(got[name], tensor)
    assert changed > 0  # the rounding really happened
    for level, centroids in enumerate(tree.centroids):  # the router is always stored in float32
        np.testing.assert_array_equal(ckpt.tree.centroids[level], centroids)


def test_save_rejects_unknown_storage_dtype(tmp_path):
    cfg = tiny_config()
    with pytest.raises(CheckpointError, match=r"storage dtype 'int8' is not one of"):
        save_checkpoint(
            tmp_path / "ckpt", tiny_model(cfg), tiny_tree(cfg.memory), tiny_tokenizer(), storage_dtype="int8"
        )
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ validation


def edit_config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        edit(config)
        (path / "config.json").write_text(json.dumps(config))

    return apply


def edit_tensors(file: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        tensors = load_file(str(path / file))
        edit(tensors)
        save_file(tensors, str(path / file))

    return apply


def truncate(file: str) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        data = (path / file).read_bytes()
        (path / file).write_bytes(data[: len(data) // 2])

    return apply


def delete(file: str) -> Callable[[Path], None]:
    return lambda path: (path / file).unlink()


def set_model(key: str, value) -> Callable[[Path], None]:
    return edit_config(lambda c: c["model"].__setitem__(key, value))


def set_memory(key: str, value) -> Callable[[Path], None]:
    return edit_config(lambda c: c["model"]["memory"].__setitem__(key, value))


def big_tokenizer(path: Path) -> None:
    words = [*TINY_WORDS, *(f"w{i}" for i in range(100))]
    Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")).save(
        str(path / "tokenizer.json")
    )


CASES = {
    # name: (corruption, file named in the message, message pattern)
    "missing config.json": (delete("config.json"), "config.json", r"missing \(not an hm-export checkpoint directory\)"),
    "config.json not JSON": (lambda p: (p / "config.json").write_text("{not json"), "config.json", r"not valid JSON"),
    "config.json not an object": (
        lambda p: (p / "config.json").write_text("[1, 2]"),
        "config.json",
        r"expected a JSON object, got list",
    ),
    "unknown format": (
        edit_config(lambda c: c.__setitem__("format", "gguf")),
        "config.json",
        r"format is 'gguf', expected 'hm-export-checkpoint'",
    ),
    "unknown format_version": (
        edit_config(lambda c: c.__setitem__("format_version", 2)),
        "config.json",
        r"format_version 2 is not supported \(this hm-export reads 1\)",
    ),
    "missing format_version": (
        edit_config(lambda c: c.pop("format_version")),
        "config.json",
        r"format_version None is not supported",
    ),
    "unknown storage_dtype": (
        edit_config(lambda c: c.__setitem__("storage_dtype", "int8")),
        "config.json",
        r"storage_dtype 'int8' not in",
    ),
    "n_heads not dividing d_model": (
        set_model("n_heads", 5),
        "config.json",
        r"invalid model config: d_model 32 is not divisible by n_heads 5",
    ),
    "n_kv_heads not dividing n_heads": (
        set_model("n_kv_heads", 3),
        "config.json",
        r"invalid model config: n_heads 4 is not divisible by n_kv_heads 3",
    ),
    "n_kv_heads zero": (
        set_model("n_kv_heads", 0),
        "config.json",
        r"invalid model config: n_kv_heads must be an integer in \[1, 1024\], got 0",
    ),
    "wrong architecture": (
        set_model("architecture", "llama"),
        "config.json",
        r"invalid model config: architecture 'llama' is neither 'hm-anchor' nor a Hugging Face host",
    ),
    "unknown Hugging Face family": (
        set_model("architecture", "hf-mamba"),
        "config.json",
        r"invalid model config: architecture 'hf-mamba' needs the host's transformers config",
    ),
    "unknown model field": (
        set_model("n_experts", 8),
        "config.json",
        r"invalid model config: model config does not match ModelConfig",
    ),
    "missing memory": (
        edit_config(lambda c: c["model"].pop("memory")),
        "config.json",
        r"invalid model config: .*memory",
    ),
    "missing model": (edit_config(lambda c: c.pop("model")), "config.json", r"invalid model config: 'model'"),
    "memory layer beyond n_layers": (
        set_memory("layers", [0, 2]),
        "config.json",
        r"invalid model config: memory.layers \(0, 2\) exceed n_layers 2",
    ),
    "negative memory layer": (
        set_memory("layers", [-1, 0]),
        "config.json",
        r"invalid model config: memory.layers \(-1, 0\) must be",
    ),
    "branching/widths mismatch": (
        set_memory("widths", [8]),
        "config.json",
        r"invalid model config: memory.branching \(2, 3\) and memory.widths",
    ),
    "wrong bank tensor shape": (
        edit_tensors(
            "bank_level1.safetensors", lambda t: t.__setitem__("down", t["down"].transpose(-1, -2).contiguous())
        ),
        "bank_level1.safetensors",
        r"tensor 'down' has shape \(6, 2, 32, 4\), expected \(6, 2, 4, 32\)",
    ),
    "wrong anchor tensor shape": (
        edit_tensors("anchor.safetensors", lambda t: t.__setitem__("blocks.0.attn.wk.weight", torch.zeros(32, 32))),
        "anchor.safetensors",
        r"tensor 'blocks.0.attn.wk.weight' has shape \(32, 32\), expected \(16, 32\)",
    ),
    "bank shape from a different tree": (
        edit_tensors("bank_level0.safetensors", lambda t: t.update({k: v[:1].clone() for k, v in t.items()})),
        "bank_level0.safetensors",
        r"tensor '(gate|up|down)' has shape \(1, ",
    ),
    "wrong router shape": (
        edit_tensors("router.safetensors", lambda t: t.__setitem__("level1", torch.zeros(5, MINILM_DIM))),
        "router.safetensors",
        r"tensor 'level1' has shape \(5, 384\), expected \(6, 384\)",
    ),
    "router dim disagrees with config": (
        edit_config(lambda c: c["router"].__setitem__("dim", 16)),
        "router.safetensors",
        r"tensor 'level0' has shape \(2, 384\), expected \(2, 16\)",
    ),
    "missing tensor": (
        edit_tensors("anchor.safetensors", lambda t: t.pop("norm.weight")),
        "anchor.safetensors",
        r"missing tensors \['norm.weight'\], unexpected tensors \[\]",
    ),
    "unexpected tensor": (
        edit_tensors("bank_level0.safetensors", lambda t: t.__setitem__("bias", torch.zeros(3))),
        "bank_level0.safetensors",
        r"missing tensors \[\], unexpected tensors \['bias'\]",
    ),
    "renamed tensor": (
        edit_tensors("bank_level1.safetensors", lambda t: t.__setitem__("gate_t", t.pop("gate"))),
        "bank_level1.safetensors",
        r"missing tensors \['gate'\], unexpected tensors \['gate_t'\]",
    ),
    "integer tensor": (
        edit_tensors("anchor.safetensors", lambda t: t.__setitem__("norm.weight", torch.ones(32, dtype=torch.int32))),
        "anchor.safetensors",
        r"tensor 'norm.weight' has dtype torch.int32, expected floating point",
    ),
    "missing bank file": (delete("bank_level1.safetensors"), "bank_level1.safetensors", r"missing$"),
    "missing anchor file": (delete("anchor.safetensors"), "anchor.safetensors", r"missing$"),
    "missing router file": (delete("router.safetensors"), "router.safetensors", r"missing$"),
    "truncated anchor file": (
        truncate("anchor.safetensors"),
        "anchor.safetensors",
        r"unreadable safetensors file \(.*\)",
    ),
    "truncated bank file": (
        truncate("bank_level0.safetensors"),
        "bank_level0.safetensors",
        r"unreadable safetensors file \(.*\)",
    ),
    "empty bank file": (
        lambda p: (p / "bank_level1.safetensors").write_bytes(b""),
        "bank_level1.safetensors",
        r"unreadable safetensors file",
    ),
    "missing tokenizer": (delete("tokenizer.json"), "tokenizer.json", r"cannot load tokenizer"),
    "corrupt tokenizer": (
        lambda p: (p / "tokenizer.json").write_text("{}"),
        "tokenizer.json",
        r"cannot load tokenizer",
    ),
    "tokenizer larger than the vocabulary": (
        big_tokenizer,
        "tokenizer.json",
        r"vocabulary 112 exceeds model vocab_size 64",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validation_errors_name_file_and_mismatch(tmp_path, case):
    corrupt, file, pattern = CASES[case]
    path = tiny_checkpoint(tmp_path)
    load_checkpoint(path)  # valid before the corruption
    corrupt(path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path / file}: "), message
    assert re.search(pattern, message), message


# ------------------------------------------------------------------------------------ atomic save


def leftovers(parent: Path, name: str = "ckpt") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != name)


def test_save_over_existing_directory_replaces_it_and_leaves_no_temp(tmp_path):
    cfg = tiny_config()
    path = tiny_checkpoint(tmp_path, seed=0)
    (path / "stale.txt").write_text("from an older run")
    path2 = tiny_checkpoint(tmp_path, seed=1, storage_dtype="float16")
    assert path2 == path
    assert leftovers(tmp_path) == []
    assert not (path / "stale.txt").exists()
    ckpt = load_checkpoint(path)
    assert ckpt.storage_dtype == "float16"
    expected = tiny_model(cfg, seed=1).state_dict()
    assert all(torch.equal(ckpt.model.state_dict()[n], t.half().float()) for n, t in expected.items())


class ExplodingTokenizer:
    def save(self, path: str) -> None:
        raise RuntimeError("disk full")


def test_failed_save_keeps_the_old_checkpoint_and_leaves_no_temp(tmp_path):
    cfg = tiny_config()
    path = tiny_checkpoint(tmp_path, seed=0)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, tiny_model(cfg, seed=1), tiny_tree(cfg.memory), ExplodingTokenizer())
    assert leftovers(tmp_path) == []
    ckpt = load_checkpoint(path)
    for name, tensor in tiny_model(cfg, seed=0).state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[name], tensor), name


def test_save_creates_missing_parent_directories(tmp_path):
    path = tiny_checkpoint(tmp_path / "runs" / "a", name="final")
    assert path == tmp_path / "runs" / "a" / "final"
    assert load_checkpoint(path).config == tiny_config()
    assert leftovers(path.parent, "final") == []
