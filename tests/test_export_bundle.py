"""End to end: a tiny checkpoint exported once to an ExecuTorch bundle, then loaded, checked and attacked.

The module fixtures export two bundles (about 10 s each): the tiny model of the brief, and the same anchor
with a 28x larger bank, which shows that the program does not grow with the bank.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import XNNPACK_PASS_NAMES, tiny_checkpoint, tiny_config, tiny_model, tiny_tree

from hm_export import __version__
from hm_export.bank import BankError, BankReader, schema_hash
from hm_export.bundle import BundleError, write_manifest
from hm_export.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from hm_export.config import MemoryConfig, ModelConfig
from hm_export.errors import UsageError
from hm_export.export import ExportRecipe, export_bundle
from hm_export.model import assemble_path
from hm_export.router import MINILM_DIM, MiniLMEmbedder
from hm_export.runtime_stubs.block_cache import SlotFiller
from hm_export.runtime_stubs.loader import BundleLoader, ContextRouter, OpenBundle, TargetPrograms, complete
from hm_export.slot import SlotContract, slot_tensors
from hm_export.verify import verify_bundle

SEQ = 16
CFG = tiny_config(max_seq_len=SEQ)  # memory (2, 3) x widths (8, 4) on layers (0, 1)
BIG_CFG = tiny_config(max_seq_len=SEQ, memory=MemoryConfig((16, 16), (8, 4), (0, 1)))
PROGRAM = "executorch/decode.pte"  # the target's one program (prefill, decode, window logits)
PROGRAM_MARGIN = 64 * 1024  # RoPE tables, KV-cache buffers' metadata, XNNPACK graph, 4 KiB segment padding
NO_ROUTER = ExportRecipe(router_program=False)  # the router program is tested on the session decode bundle

pytestmark = pytest.mark.slow  # every test here needs an exported bundle or a C++ build


def leaves(memory: MemoryConfig) -> list[tuple[int, int]]:
    k = memory.branching[1]
    return [(leaf // k, leaf) for leaf in range(memory.nodes_at(1))]


def anchor_fp32_bytes(cfg: ModelConfig) -> int:
    d, hd = cfg.d_model, cfg.head_dim
    attention = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2
    per_layer = attention + 3 * d * cfg.ffn_hidden + 2 * d
    return 4 * (cfg.vocab_size * d + cfg.n_layers * per_layer + d)


def bank_fp32_bytes(cfg: ModelConfig) -> int:
    mem = cfg.memory
    return 4 * sum(mem.nodes_at(level) * cfg.block_params(level) for level in range(mem.num_levels))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export_bundle")


@pytest.fixture(scope="module")
def checkpoint_dir(workdir: Path) -> Path:
    return tiny_checkpoint(workdir, name="ckpt", cfg=CFG, seed=0)


@pytest.fixture(scope="module")
def ckpt(checkpoint_dir: Path) -> Checkpoint:
    return load_checkpoint(checkpoint_dir)


@pytest.fixture(scope="module")
def exported(workdir: Path, checkpoint_dir: Path):
    bundle = workdir / "bundle"
    report = export_bundle(checkpoint_dir, bundle, NO_ROUTER)
    return bundle, report


@pytest.fixture(scope="module")
def bundle(exported) -> Path:
    return exported[0]


@pytest.fixture(scope="module")
def manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


@pytest.fixture(scope="module")
def loader(bundle: Path) -> BundleLoader:
    return BundleLoader(bundle)


@pytest.fixture(scope="module")
def big_bundle(workdir: Path, ckpt: Checkpoint) -> Path:
    """The same anchor weights with 272 bank blocks instead of 8."""
    model = tiny_model(BIG_CFG, seed=1)
    anchor = {n: t for n, t in ckpt.model.state_dict().items() if not n.startswith("bank.")}
    missing, unexpected = model.load_state_dict(anchor, strict=False)
    assert not unexpected and all(n.startswith("bank.") for n in missing)
    checkpoint = save_checkpoint(
        workdir / "big_ckpt", model, tiny_tree(BIG_CFG.memory), ckpt.tokenizer, storage_dtype="float32"
    )
    bundle = workdir / "big_bundle"
    export_bundle(checkpoint, bundle, NO_ROUTER)
    return bundle


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


def edit_manifest(root: Path, edit) -> None:
    """A consistent edit: the manifest rewritten and its seal (bundle.sig) recomputed, as a tamperer would."""
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    write_manifest(root, manifest)


class FakeEmbedder:
    """Fixed unit vectors per text, so routing needs no MiniLM."""

    dim = MINILM_DIM

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors
        self.calls: list[list[str]] = []

    def embed(self, texts):
        self.calls.append(list(texts))
        return np.stack([self.vectors[t] for t in texts]).astype(np.float32)


@torch.no_grad()
def eager_logits(ckpt: Checkpoint, tokens: list[int], path: tuple[int, ...]) -> torch.Tensor:
    padded = torch.zeros(1, SEQ, dtype=torch.long)
    padded[0, : len(tokens)] = torch.tensor(tokens)
    return ckpt.model.forward_path(padded, torch.tensor(path))[0, : len(tokens)]


# --- manifest -----------------------------------------------------------------------------------------


def test_manifest_describes_the_bundle(bundle, manifest, exported):
    _, report = exported
    assert manifest["format"] == "hm-export-bundle" and manifest["format_version"] == 1
    assert ModelConfig.from_dict(manifest["model"]) == CFG
    assert manifest["io"] == {
        "inputs": ["tokens", "mem0_gate_up", "mem0_down", "mem1_gate_up", "mem1_down"],
        "outputs": ["logits"],
    }
    assert manifest["tokenizer"] == {"file": "tokenizer.json"}
    assert manifest["router"]["file"] == "router.safetensors" and manifest["router"]["dim"] == MINILM_DIM
    records = manifest["targets"]["executorch"]["decode"]["pipeline"]["passes"]  # the target's one program
    assert manifest["targets"]["executorch"]["decode"]["pipeline"]["name"] == "xnnpack_slot"
    assert [r["name"] for r in records] == XNNPACK_PASS_NAMES
    assert all(r["nodes_before"] == previous["nodes_after"] for previous, r in itertools.pairwise(records))
    assert report.slot_schema_hash == manifest["slot"]["schema_hash"]


def test_manifest_slot_contract(manifest):
    slot = manifest["slot"]
    assert slot["seq_len"] == SEQ and slot["d_model"] == 32 and slot["dtype"] == "float32"
    assert slot["tokens"] == {"name": "tokens", "shape": [1, SEQ], "dtype": "int64"}
    assert slot["schema_hash"] == SlotContract.for_model(CFG, SEQ).schema_hash
    tensors = {t["name"]: t for t in slot["tensors"]}
    assert list(tensors) == ["mem0_gate_up", "mem0_down", "mem1_gate_up", "mem1_down"]
    for layer in (0, 1):
        gate_up, down = tensors[f"mem{layer}_gate_up"], tensors[f"mem{layer}_down"]
        # R = 8 + 4 = 12: gate in columns [0, 12), up in [12, 24); level 0 at [0, 8), level 1 at [8, 12).
        assert gate_up["shape"] == [1, 32, 24] and gate_up["hidden_axis"] == 2
        assert gate_up["level_ranges"] == [[[0, 8], [12, 20]], [[8, 12], [20, 24]]]
        assert gate_up["sources"] == ["gate", "up"]
        assert down["shape"] == [1, 12, 32] and down["hidden_axis"] == 1
        assert down["level_ranges"] == [[[0, 8]], [[8, 12]]]
        assert down["sources"] == ["down"]
        assert gate_up["layer"] == down["layer"] == layer


def test_manifest_files_match_their_sizes_and_hashes(bundle, manifest):
    files = manifest["files"]
    assert set(files) == {
        "tokenizer.json",
        "router.safetensors",
        "bank/index.json",
        PROGRAM,  # the one program: no full-window program next to it
        "checks/checks.json",
        "checks/expected.safetensors",
    }
    for relative, record in files.items():
        data = (bundle / relative).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, relative
    assert manifest["targets"]["executorch"]["decode"]["files"] == {"program": PROGRAM}


def test_manifest_versions_bank_and_delegation(bundle, manifest):
    versions = manifest["versions"]
    assert versions["hm-export"] == __version__
    for package in ("torch", "executorch", "tokenizers", "safetensors"):
        assert versions[package] == metadata.version(package)
    bank = manifest["bank"]
    assert bank["scheme"] == "float32" and bank["dir"] == "bank"
    assert bank["schema_hash"] == schema_hash(32, CFG.memory, "float32") == BankReader(bundle / "bank").schema_hash
    delegation = manifest["targets"]["executorch"]["decode"]["delegation"]
    assert delegation["backend"] == "xnnpack"
    assert delegation["slot_inputs_delegated"] is True
    assert delegation["delegated_subgraphs"] >= 1 and delegation["delegated_nodes"] > 100
    assert (
        manifest["source"]["config_sha256"]
        == hashlib.sha256((bundle.parent / "ckpt/config.json").read_bytes()).hexdigest()
    )


# --- the program holds the anchor only ------------------------------------------------------------------


def test_program_size_is_the_anchor_not_the_bank(bundle, big_bundle, ckpt):
    assert anchor_fp32_bytes(CFG) == 4 * sum(p.numel() for p in ckpt.model.anchor_parameters())
    big_bank = bank_fp32_bytes(BIG_CFG)
    assert PROGRAM_MARGIN * 10 < big_bank  # the margin could not hide the bank
    small_pte = (bundle / PROGRAM).read_bytes()
    big_pte = (big_bundle / PROGRAM).read_bytes()
    assert len(big_pte) < anchor_fp32_bytes(BIG_CFG) + PROGRAM_MARGIN
    assert len(small_pte) < anchor_fp32_bytes(CFG) + PROGRAM_MARGIN
    # Same anchor, 28x the bank: the program is byte for byte the same.
    assert bank_fp32_bytes(BIG_CFG) > 25 * bank_fp32_bytes(CFG)
    assert big_pte == small_pte
    bank_on_disk = sum(p.stat().st_size for p in (big_bundle / "bank").rglob("*") if p.is_file())
    assert bank_on_disk > big_bank > 2 * len(big_pte)


def test_program_contains_no_bank_weights(bundle, ckpt):
    pte = (bundle / PROGRAM).read_bytes()
    model = ckpt.model
    # Positive control: the anchor's weights are stored as plain float32 bytes, so a search can find them.
    assert model.blocks[0].attn.wq.weight.detach().numpy().astype("<f4").tobytes() in pte
    for level in range(CFG.memory.num_levels):
        for node in range(CFG.memory.nodes_at(level)):
            for name in ("gate", "up", "down"):
                blocks = getattr(model.bank, name)[level][node].detach().numpy().astype("<f4")
                for matrix in blocks:  # one memory layer each
                    assert matrix.tobytes() not in pte, (name, level, node)
                    assert np.ascontiguousarray(matrix.T).tobytes() not in pte, (name, level, node)
                    assert not any(row.tobytes() in pte for row in matrix), (name, level, node)
    # Nor the slot values of the example path the program was traced with.
    for tensor in slot_tensors(assemble_path(model, (0, 0))):
        assert not any(row.numpy().astype("<f4").tobytes() in pte for row in tensor[0])


# --- loader -------------------------------------------------------------------------------------------


def test_loader_matches_eager_on_every_leaf(bundle, ckpt):
    loader = BundleLoader(bundle)  # a fresh slot: the first set_path fills every level
    rng = torch.Generator().manual_seed(11)
    full = torch.randint(0, CFG.vocab_size, (SEQ,), generator=rng).tolist()
    short = full[:5]
    previous = None
    for path in leaves(CFG.memory):
        update = loader.set_path(path)
        expected_levels = (1,) if previous and previous[0] == path[0] else (0, 1)
        assert update.path == path and update.levels_changed == expected_levels
        # The slot now holds exactly the assembled memory of `path`, level updates included.
        for got, want in zip(loader.slot, slot_tensors(assemble_path(ckpt.model, path))):
            assert torch.equal(got, want)
        for tokens in (full, short):
            got, want = loader.logits(tokens), eager_logits(ckpt, tokens, path)
            assert got.shape == (len(tokens), CFG.vocab_size)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
        previous = path


def test_set_path_reads_only_the_changed_level(loader):
    first = loader.set_path((1, 3))
    assert first.levels_changed in ((0, 1), (1,))  # depends on what an earlier test left in the slot
    before = [t.clone() for t in loader.slot]
    update = loader.set_path((1, 4))
    assert update.levels_changed == (1,)
    assert update.bytes_read == loader.bank.index.entry(1, 4).length == 3 * 2 * 32 * 4 * 4
    # Level 0's ranges are untouched; level 1's ranges changed.
    gate_up, down = loader.slot[0], loader.slot[1]
    assert torch.equal(gate_up[..., 0:8], before[0][..., 0:8]) and torch.equal(down[:, 0:8], before[1][:, 0:8])
    assert not torch.equal(gate_up[..., 8:12], before[0][..., 8:12])
    again = loader.set_path((1, 4))
    assert again.levels_changed == () and again.bytes_read == 0


def test_different_paths_give_different_logits(loader):
    tokens = list(range(1, 11))
    loader.set_path((0, 0))
    first = loader.logits(tokens).clone()
    loader.set_path((1, 5))
    second = loader.logits(tokens)
    assert (first - second).abs().max() > 1e-2


def test_loader_routes_with_the_given_embedder(bundle, ckpt):
    centroids = ckpt.tree.centroids[0]
    embedder = FakeEmbedder({"alpha": centroids[0], "beta": centroids[1]})
    loader = BundleLoader(bundle, embedder=embedder)
    for text, vector in embedder.vectors.items():
        route = loader.route(text)
        assert route == tuple(int(n) for n in ckpt.tree.route(vector[None])[0])
        assert route[0] == (0 if text == "alpha" else 1)  # a level-0 centroid routes to its own node
        assert loader.route_and_set(text).path == route
    assert embedder.calls == [["alpha"], ["alpha"], ["beta"], ["beta"]]
    result = complete(loader, "beta", "the cat sat", max_new_tokens=4)
    assert result.context_path == loader.route("beta") and result.slot_update.levels_changed == ()
    # The continuation is the eager model's greedy continuation on the same path.
    tokens = ckpt.tokenizer.encode("the cat sat").ids
    for _ in range(4):
        tokens.append(int(eager_logits(ckpt, tokens, result.context_path)[-1].argmax()))
    assert result.prompt_tokens == 3 and result.new_tokens == tokens[3:]


def test_loader_pieces_compose_to_the_loader(bundle, ckpt):
    """open / route / fill / run used one by one give what BundleLoader gives (it only composes them)."""
    centroids = ckpt.tree.centroids[0]
    embedder = FakeEmbedder({"alpha": centroids[0], "beta": centroids[1]})
    opened = OpenBundle.open(bundle)
    path = ContextRouter(opened.tree, embedder).route("beta")
    filler = SlotFiller(opened.contract, opened.bank, layout=opened.layout)
    filler.set_path(path)
    programs = TargetPrograms(opened)
    programs.use_target("executorch")
    tokens = list(range(1, 11))
    loader = BundleLoader(bundle, embedder=embedder)
    loader.route_and_set("beta")
    assert loader.path == list(path) and opened.manifest == loader.manifest
    logits = programs.logits(tokens, filler.slot)
    torch.testing.assert_close(logits, loader.logits(tokens), rtol=0, atol=0)
    torch.testing.assert_close(logits, eager_logits(ckpt, tokens, path), rtol=0, atol=1e-4)


# --- tampering ----------------------------------------------------------------------------------------


def test_tampered_program_is_refused(bundle, tmp_path):
    root = copy_bundle(bundle, tmp_path)
    data = bytearray((root / PROGRAM).read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / PROGRAM).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"decode\.pte: sha256 does not match"):
        BundleLoader(root)


def test_missing_bank_block_is_named(bundle, tmp_path):
    root = copy_bundle(bundle, tmp_path)
    (root / "bank/level1/node000004.hmb").unlink()
    loader = BundleLoader(root)
    loader.set_path((0, 0))  # other blocks still load
    with pytest.raises(BankError, match=r"level1/node000004\.hmb: missing \(block file \(level 1, node 4\)\)"):
        loader.set_path((1, 4))


def test_edited_bank_schema_hash_is_refused(bundle, tmp_path):
    root = copy_bundle(bundle, tmp_path)
    edit_manifest(root, lambda m: m["bank"].update(schema_hash="0" * 64))
    with pytest.raises(BundleError, match="bank schema hash"):
        BundleLoader(root)


def test_edited_slot_shape_is_refused(bundle, tmp_path):
    root = copy_bundle(bundle, tmp_path)
    edit_manifest(root, lambda m: m["slot"]["tensors"][1].update(shape=[1, 13, 32]))
    with pytest.raises(BundleError, match=r"bad slot contract.*schema_hash"):
        BundleLoader(root)


def test_consistent_but_foreign_slot_contract_is_refused(bundle, tmp_path):
    root = copy_bundle(bundle, tmp_path)
    other = tiny_config(max_seq_len=SEQ, memory=MemoryConfig((2, 3), (4, 8), (0, 1)))
    edit_manifest(root, lambda m: m.update(slot=SlotContract.for_model(other, SEQ).to_dict()))
    with pytest.raises(BundleError, match="slot contract does not match the model config"):
        BundleLoader(root)


# --- atomic export ------------------------------------------------------------------------------------


def test_export_refuses_an_existing_bundle(bundle, checkpoint_dir):
    manifest = (bundle / "manifest.json").read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        export_bundle(checkpoint_dir, bundle, NO_ROUTER)
    assert (bundle / "manifest.json").read_bytes() == manifest


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_failed_export_leaves_nothing_behind(bundle, checkpoint_dir, tmp_path, monkeypatch):
    import hm_export.export as export_module

    real_write_bank = export_module.write_bank

    def emit_stub(target, support, model, layout, contract, out_dir, *args):  # lowering is not what this tests
        (out_dir / target.directory).mkdir()
        (out_dir / target.directory / "decode.pte").write_bytes(b"partial program")
        return {"files": {"program": f"{target.directory}/decode.pte"}}

    def failing_write_bank(bank_dir, *args, **kwargs):
        real_write_bank(bank_dir, *args, **kwargs)  # a real, complete bank lands in the temp dir...
        assert (bank_dir / "index.json").is_file()
        raise RuntimeError("disk full")  # ...and then the export fails

    monkeypatch.setattr(export_module, "_emit_decode", emit_stub)
    monkeypatch.setattr(export_module, "write_bank", failing_write_bank)

    out = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="disk full"):
        export_bundle(checkpoint_dir, out, NO_ROUTER)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []

    # Overwriting an existing bundle: a failure keeps the old one intact.
    existing = copy_bundle(bundle, tmp_path)
    before = {p.relative_to(existing): p.read_bytes() for p in existing.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="disk full"):
        export_bundle(checkpoint_dir, existing, NO_ROUTER, overwrite=True)
    after = {p.relative_to(existing): p.read_bytes() for p in existing.rglob("*") if p.is_file()}
    assert after == before
    assert _leftovers(tmp_path, "copy") == [] and sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_failed_rename_keeps_the_old_bundle(bundle, checkpoint_dir, tmp_path, monkeypatch):
    """The last step of an overwrite swaps directories; if moving the new one in fails, the old one stays."""
    import hm_export.atomic as atomic_module
    import hm_export.export as export_module

    def emit_stub(target, support, model, layout, contract, out_dir, *args):
        (out_dir / target.directory).mkdir()
        (out_dir / target.directory / "decode.pte").write_bytes(b"new program")
        return {"files": {"program": f"{target.directory}/decode.pte"}}

    monkeypatch.setattr(export_module, "_emit_decode", emit_stub)
    real_replace = atomic_module.os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(".copy.partial-"):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(atomic_module.os, "replace", failing_replace)
    existing = copy_bundle(bundle, tmp_path)
    before = {p.relative_to(existing): p.read_bytes() for p in existing.rglob("*") if p.is_file()}
    with pytest.raises(OSError, match="rename failed"):
        export_bundle(checkpoint_dir, existing, NO_ROUTER, overwrite=True)
    after = {p.relative_to(existing): p.read_bytes() for p in existing.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


# --- verify -------------------------------------------------------------------------------------------


def test_verify_bundle_passes_on_held_out_contexts(bundle, checkpoint_dir, ckpt, tmp_path):
    contexts = tmp_path / "contexts.jsonl"
    lines = [
        {"text": "the cat sat on the mat ."},
        {"text": "a dog sat on a tree , the memory", "context": "dogs and trees"},
        {"tokens": [1, 3, 5, 6, 1, 7, 10, 2, 4, 5, 6, 2, 9, 10, 1, 8, 11]},  # longer than seq_len: truncated
        {"text": "memory tree memory tree", "context_tokens": 2},  # scored after its first 2 tokens
    ]
    contexts.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    report = verify_bundle(bundle, checkpoint_dir, contexts)
    assert report.passed and report.contexts == 4
    assert [r.tokens for r in report.results] == [7, 9, SEQ, 4]
    assert [r.scored_tokens for r in report.results] == [6, 8, SEQ - 1, 2]
    texts = ["the cat sat on the mat .", "dogs and trees", ckpt.tokenizer.decode(lines[2]["tokens"]), lines[3]["text"]]
    routes = [tuple(int(n) for n in p) for p in ckpt.tree.route(MiniLMEmbedder().embed(texts))]
    assert [r.path for r in report.results] == routes
    assert report.distinct_paths == len(set(routes))
    for result, line in zip(report.results, lines):
        tokens = line.get("tokens") or ckpt.tokenizer.encode(line["text"]).ids
        tokens = tokens[:SEQ]
        want = eager_logits(ckpt, tokens, result.path)
        first = line.get("context_tokens", 1) - 1
        nll = torch.nn.functional.cross_entropy(want[first:-1], torch.tensor(tokens[first + 1 :]))
        assert result.perplexity["checkpoint"] == pytest.approx(float(nll.exp()), rel=1e-5)
        assert result.perplexity["bundle"] == pytest.approx(result.perplexity["checkpoint"], rel=1e-4)
        assert result.export.max_abs <= 1e-5 + 1e-4 * float(want.abs().max())
    assert report.export["max_abs"] > 0  # the program ran: XNNPACK is not bit-exact with eager


def test_loader_names_missing_manifest_sections(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    edit_manifest(copy, lambda manifest: manifest.pop("model"))
    with pytest.raises(BundleError, match=r"manifest.json: malformed manifest, missing \['model'\]"):
        BundleLoader(copy, target=None, verify=False)
