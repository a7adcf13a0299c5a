"""The router program in the bundle (``router/``): all-MiniLM-L6-v2 exported per target with its tokenizer.

The session's ``decode_bundle`` (conftest: ExecuTorch, ONNX and Core ML) carries the router programs, so they
are exported once per session.  Its ExecuTorch and ONNX programs are run here and must give the Python
MiniLM's embeddings (cosine >= 0.9999) and routes on contexts of 2 to 256 word pieces (the dynamic token
axis); the Core ML package is checked structurally (prediction needs macOS: scripts/check_coreml_macos.py
--router runs it there); the tokenizer in the bundle tokenizes as the embedder does (truncation to 256).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from hm_export.bundle import verify_files
from hm_export.errors import BundleError, HostUnsupported
from hm_export.router import MiniLMEmbedder
from hm_export.router_program import MAX_TOKENS, check_coreml_router, open_router_program
from hm_export.runtime_stubs.loader import read_tree

# Short, long (truncated at 256 word pieces), empty, accented, CJK, emoji and control characters.
CONTEXTS = (
    "Parse an email message",
    "",
    "naïve café résumé, Ångström: ÉCOLE",
    "日本語のテキストと中文字符 한국어",
    "emoji 🎉👍🏽 and tabs\tand\x07bells",
    "def server_bind(self):\n    self.socket.bind(self.server_address)\n" * 40,
    " ".join(f"word{i}" for i in range(400)),
)

pytestmark = pytest.mark.slow  # every test here needs the session's exported decode bundle


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder()


@pytest.fixture(scope="module")
def manifest(decode_bundle) -> dict:
    return json.loads((decode_bundle[1] / "manifest.json").read_text())


def test_manifest_states_the_router_programs_io_and_tokenizer(decode_bundle, manifest):
    router = manifest["router"]
    assert set(router["programs"]) == {"executorch", "onnx", "coreml"}
    assert router["programs"]["executorch"]["files"] == {"program": "router/minilm.pte"}
    assert router["tokenizer"]["file"] == "router/tokenizer.json" and router["tokenizer"]["max_tokens"] == MAX_TOKENS
    (inputs,), (outputs,) = router["program_io"]["inputs"], router["program_io"]["outputs"]
    assert inputs["name"] == "input_ids" and inputs["dtype"] == "int64" and inputs["tokens"] == [2, MAX_TOKENS]
    assert outputs == {"name": "context_embedding", "dtype": "float32", "shape": [1, router["dim"]]}
    for file in ["router/tokenizer.json", "router/minilm.pte", "router/minilm.onnx", "router/minilm.onnx.data"]:
        assert file in manifest["files"]
    assert any(f.startswith("router/minilm.mlpackage/") for f in manifest["files"])
    verify_files(decode_bundle[1], manifest)  # sizes and sha256 of the router files too


def test_bundle_tokenizer_tokenizes_as_the_embedder(decode_bundle, embedder):
    tokenizer = Tokenizer.from_file(str(decode_bundle[1] / "router" / "tokenizer.json"))
    for context in CONTEXTS:
        assert tokenizer.encode(context).ids == embedder.tokenizer.encode(context).ids
    assert len(tokenizer.encode(CONTEXTS[-1]).ids) == MAX_TOKENS


@pytest.mark.parametrize("target", ["executorch", "onnx"])
def test_router_program_embeds_and_routes_as_python_minilm(decode_bundle, embedder, target):
    bundle = decode_bundle[1]
    program = open_router_program(bundle, target)
    got, want = program.embed(CONTEXTS), embedder.embed(CONTEXTS)
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalised inside the program
    tree = read_tree(bundle)
    np.testing.assert_array_equal(tree.route(got), tree.route(want))


def test_coreml_router_is_checked_structurally(decode_bundle, manifest):
    entry = manifest["router"]["programs"]["coreml"]
    package = decode_bundle[1] / entry["files"]["package"]
    structure = check_coreml_router(package)
    assert structure["problems"] == [] and structure["ops"] == entry["ops"]
    assert entry["precision"] == "float32" and structure["ops"].get("matmul", 0) + structure["ops"].get("linear", 0) > 0
    with pytest.raises(HostUnsupported):
        open_router_program(decode_bundle[1], "coreml")


def test_missing_router_program_is_a_clear_error(tmp_path: Path, decode_bundle):
    with pytest.raises(BundleError, match="no executorch-coreml router program"):
        open_router_program(decode_bundle[1], "executorch-coreml")
