"""Shared test fixtures: a tiny model configuration, model, tokenizer, router tree and checkpoint.

Plain functions (importable as ``from conftest import tiny_config, tiny_checkpoint, ...``):

* ``tiny_config(**overrides)``: vocab 64, d 32, 2 layers, 4 heads / 2 KV heads, FFN 64, 32 positions,
  memory branching (2, 3), widths (8, 4) on layers (0, 1); any field (or ``memory=MemoryConfig(...)``)
  can be overridden.
* ``tiny_model(cfg, seed)``: a deterministic ``MemoryLM`` with a NON-zero ``bank.down`` (a fresh model
  has ``down = 0``, so its memory would be a no-op).
* ``tiny_tokenizer()``: a whitespace WordLevel tokenizer with ``len(TINY_WORDS)`` tokens.
* ``tiny_tree(memory, dim, seed)``: a router tree with random unit-norm centroids.
* ``tiny_checkpoint(tmp_path, ...)``: saves all of the above with ``save_checkpoint``; returns the path.

Every test starts from ``torch.manual_seed(0)`` (autouse), so a test that draws unseeded inputs sees the same
numbers whatever ran before it.

Fixtures: ``tiny_cfg`` (the default config) and ``tiny_checkpoint_factory`` (``tiny_checkpoint`` bound to the
test's ``tmp_path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from hm_export.checkpoint import save_checkpoint
from hm_export.config import MemoryConfig, ModelConfig
from hm_export.model import MemoryLM
from hm_export.router import MINILM_DIM, CentroidTree

TINY_WORDS = ("[UNK]", "the", "a", "cat", "dog", "sat", "on", "mat", "memory", "tree", ".", ",")


@pytest.fixture(autouse=True)
def seeded_torch() -> None:
    torch.manual_seed(0)


def tiny_config(**overrides: Any) -> ModelConfig:
    fields: dict[str, Any] = {
        "vocab_size": 64,
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "ffn_hidden": 64,
        "max_seq_len": 32,
        "memory": MemoryConfig(branching=(2, 3), widths=(8, 4), layers=(0, 1)),
    }
    fields.update(overrides)
    return ModelConfig(**fields)


def randomize_bank_down(model: MemoryLM, generator: torch.Generator, scale: float = 1.0) -> None:
    """Give every bank ``down`` block random values so the memory changes the logits."""
    with torch.no_grad():
        for down in model.bank.down:
            r = down.shape[-2]
            down.copy_(torch.randn(down.shape, generator=generator) * scale * r**-0.5)


def tiny_model(cfg: ModelConfig | None = None, seed: int = 0, nonzero_memory: bool = True) -> MemoryLM:
    """Deterministic in ``seed`` (the global RNG is restored afterwards); eval mode."""
    cfg = cfg or tiny_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MemoryLM(cfg)
    if nonzero_memory:
        randomize_bank_down(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def tiny_tokenizer() -> Tokenizer:
    vocab = {word: index for index, word in enumerate(TINY_WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def tiny_tree(memory: MemoryConfig, dim: int = MINILM_DIM, seed: int = 0) -> CentroidTree:
    rng = np.random.default_rng(seed)
    centroids = []
    for level in range(memory.num_levels):
        c = rng.standard_normal((memory.nodes_at(level), dim)).astype(np.float32)
        centroids.append(c / np.linalg.norm(c, axis=1, keepdims=True))
    return CentroidTree(memory, centroids)


def tiny_checkpoint(
    tmp_path: Path,
    *,
    name: str = "ckpt",
    cfg: ModelConfig | None = None,
    seed: int = 0,
    storage_dtype: str = "float32",
    embed_dim: int = MINILM_DIM,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save ``tiny_model(cfg, seed)`` with ``tiny_tree(cfg.memory, embed_dim, seed)``; return the directory.

    Rebuild the saved model and tree with the same ``cfg``/``seed`` to compare against a load.
    """
    cfg = cfg or tiny_config()
    model = tiny_model(cfg, seed)
    tree = tiny_tree(cfg.memory, embed_dim, seed)
    return save_checkpoint(
        Path(tmp_path) / name, model, tree, tiny_tokenizer(), storage_dtype=storage_dtype, metadata=metadata
    )


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_config()


@pytest.fixture
def tiny_checkpoint_factory(tmp_path: Path):
    """``tiny_checkpoint_factory(**kwargs)`` == ``tiny_checkpoint(tmp_path, **kwargs)``."""

    def make(**kwargs: Any) -> Path:
        return tiny_checkpoint(tmp_path, **kwargs)

    return make


# Contexts of the decode/checks bundle: routing text plus the tokens of the prompt (tiny vocabulary).
DECODE_CONTEXTS = (
    {"text": "the cat sat on the mat . the dog sat on a tree", "context": "cats and mats"},
    {"text": "a memory tree , a dog , the cat", "context": "memory trees"},
    {"text": "the dog sat on the memory . a cat sat", "context": "a dog on a mat"},
    {"text": "mat , tree , memory , cat , dog , the", "context": "lists of words"},
)


@pytest.fixture(scope="session")
def decode_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, bundle): the default tiny model exported once per session to ExecuTorch, ONNX and Core ML
    with decode programs, golden checks on ``DECODE_CONTEXTS`` and the router programs (MiniLM per target: the
    session's only router export; other tests export with ``router_program=False``). A few minutes."""
    import json

    from hm_export.export import ExportRecipe, export_bundle

    work = tmp_path_factory.mktemp("decode_bundle")
    checkpoint = tiny_checkpoint(work, name="ckpt", seed=3)
    contexts = work / "contexts.jsonl"
    contexts.write_text("".join(json.dumps(item) + "\n" for item in DECODE_CONTEXTS))
    recipe = ExportRecipe(targets=("executorch", "onnx", "coreml"), check_contexts=contexts, check_new_tokens=12)
    export_bundle(checkpoint, work / "bundle", recipe)
    return checkpoint, work / "bundle"


# The XNNPACK pipeline's passes, in order (what a bundle's manifest must record for its executorch target).
XNNPACK_PASS_NAMES = [
    "lift_memory_to_slot",
    "verify_slot_split",
    "fold_constant_subgraphs",
    "drop_aliases",
    "reduce_norm_means_to_4d",
    "expand_tanh_gelu",
    "check_slot_access",
]


def rehash(root: Path, *relative: str) -> None:
    """Record modified files' new sizes and sha256 in the manifest and reseal it (a tamperer who also edits the
    manifest)."""
    from hm_export.fuzz import rerecord

    rerecord(root, *relative)


def sign_and_edit_index(root: Path, work: Path) -> Path:
    """Sign bundle ``root`` with a new key (``work/key.pem``, ``work/key.pub``), then change one byte of its bank
    index's source fingerprint (same size, valid JSON, other bytes: caught only by the index's sha256); return
    the index path."""
    from hm_export.integrity import generate_key, sign_bundle

    generate_key(work / "key.pem", work / "key.pub")
    sign_bundle(root, work / "key.pem")
    index = root / "bank" / "index.json"
    text = index.read_text()
    at = text.index('"fingerprint": "') + len('"fingerprint": "')
    index.write_text(text[:at] + ("1" if text[at] == "0" else "0") + text[at + 1 :])
    return index


def rebank(
    bundle: Path, checkpoint: Path, out: Path, scheme: str, wrong_block: tuple[int, int, int] | None = None
) -> Path:
    """A copy of ``bundle`` (float32 slot) at ``out`` whose bank is rewritten from ``checkpoint`` with ``scheme``
    and whose golden checks are re-recorded on that bank, manifest updated: what an export with that bank writes
    (the programs of a float32 slot do not depend on the bank).

    ``wrong_block=(level, node, source)``: the bank is written from a copy of the checkpoint in which block
    ``(level, node)`` holds block ``(level, source)``'s values: a bank written wrong but consistently (valid
    checksums, index and schema; checks recorded from it), as a buggy exporter would write it.
    """
    import json
    import shutil

    from hm_export.bank import BankReader, write_bank
    from hm_export.checkpoint import load_checkpoint
    from hm_export.checks import CHECKS_FILE, EXPECTED_FILE, record_checks
    from hm_export.kernels.strategies import layout_from_record
    from hm_export.router import MiniLMEmbedder
    from hm_export.runtime_stubs.block_cache import SlotFiller
    from hm_export.slot import SlotContract

    shutil.copytree(bundle, out)
    ckpt = load_checkpoint(checkpoint)
    source = checkpoint
    if wrong_block is not None:
        level, node, other = wrong_block
        model = load_checkpoint(checkpoint).model
        with torch.no_grad():
            for name in ("gate", "up", "down"):
                blocks = getattr(model.bank, name)[level]
                blocks[node] = blocks[other]
        source = save_checkpoint(
            out.parent / f"{out.name}-source", model, ckpt.tree, ckpt.tokenizer, ckpt.storage_dtype
        )
    shutil.rmtree(out / "bank")
    index = write_bank(out / "bank", source, scheme, workers=1)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["bank"].update(scheme=scheme, levels=[s.name for s in index.level_schemes], schema_hash=index.schema_hash)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    body = json.loads((out / CHECKS_FILE).read_text())
    pairs = [(check["context"], check["prompt"]) for check in body["checks"]]
    contract = SlotContract.from_dict(manifest["slot"])
    filler = SlotFiller(contract, BankReader(out / "bank"), layout=layout_from_record(manifest["slot"]))
    new_tokens = len(body["checks"][0]["greedy"])
    record_checks(ckpt.model, ckpt.tree, MiniLMEmbedder(), filler, pairs, new_tokens, out, scheme)
    rehash(out, "bank/index.json", CHECKS_FILE, EXPECTED_FILE)
    return out
